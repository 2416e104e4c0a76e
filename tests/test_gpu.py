"""The GPU E-step computes what the CPU kernel computes.

Each check runs with NumPy as the array module, everywhere, and with CuPy where a
CUDA device is present. The tolerances are those of the CPU kernel's own paths
(test_kernel_paths.py): both compute the cross terms in single precision, in
different orders of summation.
"""

import dataclasses
import importlib.util

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from test_kernel_paths import _assert_same, problem  # noqa: F401 (a fixture)

from mlsubtomo import MissingDataMLClassifier, gpu, kernel
from mlsubtomo.masks import MissingCone, MissingWedge


def _cupy_or_skip():
    if importlib.util.find_spec("cupy") is None:
        pytest.skip("CuPy is not installed")
    try:
        return gpu.cuda_array_module()
    except RuntimeError as error:
        pytest.skip(str(error))


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    return np if request.param == "numpy" else _cupy_or_skip()


def _both(chunk, model, search, settings, xp, **kwargs):
    """The CPU kernel's result and the GPU E-step's, on the same problem."""
    expected = kernel.e_step(chunk, model, search, settings, **kwargs)
    got = gpu.e_step(chunk, model, search, settings, array_module=xp, **kwargs)
    return got, expected


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"pruning_threshold": 1e-3},
        {"interpolation_order": 3},
        {"rotation": "fourier"},
        {"orientation_block": 7},
    ],
    ids=["exhaustive", "pruned", "cubic", "fourier-rotation", "block-7"],
)
def test_gpu_e_step_matches_the_kernel(problem, xp, changes):  # noqa: F811
    chunk, model, search, settings, _ = problem
    settings = dataclasses.replace(settings, **changes)
    got, expected = _both(chunk, model, search, settings, xp)
    _assert_same(got, expected)


def test_batches_and_kept_transforms_change_nothing(problem, xp, monkeypatch):  # noqa: F811
    chunk, model, search, settings, reference = problem
    transforms = kernel.rotated_transforms(model.references, search.rotations, settings)
    # Room for about three particles per batch: the chunk of ten takes four.
    per_particle = (24 * np.count_nonzero(settings.mask_arrays.any(axis=0))
                    + 96 * len(search.shifts)) * 2 * settings.orientation_block
    monkeypatch.setattr(gpu, "_BATCH_BYTES", 3 * per_particle)
    got = gpu.e_step(chunk, model, search, settings, transforms=transforms, array_module=xp)
    _assert_same(got, reference)
    # The second pass rotating the references again, with none kept from the first.
    monkeypatch.setattr(gpu, "_KEPT_BYTES", 0)
    _assert_same(gpu.e_step(chunk, model, search, settings, array_module=xp), reference)


@pytest.mark.parametrize("per_class", [False, True], ids=["candidates", "class-candidates"])
def test_candidates_and_pair_masses_match(problem, xp, per_class):  # noqa: F811
    chunk, model, search, settings, _ = problem
    rng = np.random.default_rng(7)
    shape = (len(chunk), 2, len(search.rotations)) if per_class else (
        len(chunk), len(search.rotations))
    candidates = rng.random(shape) < 0.4
    candidates[..., 0] = True
    sparse = chunk.subset(np.arange(len(chunk)), candidates)
    got, expected = _both(sparse, model, search, settings, xp, keep_pairs=True)
    _assert_same(got, expected)
    np.testing.assert_array_equal(np.isinf(got.pair_log_mass), np.isinf(expected.pair_log_mass))
    finite = np.isfinite(expected.pair_log_mass)
    np.testing.assert_allclose(got.pair_log_mass[finite], expected.pair_log_mass[finite],
                               rtol=1e-6)


def test_an_empty_class_and_scores_only(problem, xp):  # noqa: F811
    chunk, model, search, settings, _ = problem
    emptied = dataclasses.replace(model, log_class_weights=np.array([0.0, -np.inf]))
    got, expected = _both(chunk, emptied, search, settings, xp)
    _assert_same(got, expected)
    assert np.all(got.best_class == 0)
    assert np.all(got.statistics.observation_counts[1] == 0)
    scores = gpu.e_step(chunk, model, search, settings, accumulate=False, array_module=xp)
    assert scores.statistics is None
    np.testing.assert_allclose(scores.log_likelihood, problem[4].log_likelihood, rtol=1e-6)


def test_fourier_crop_matches(xp):
    # Shifts counted in voxels of the full box (shift_period), fractions of the crop's.
    d, crop = 12, 8
    rng = np.random.default_rng(11)
    masks = [MissingWedge(-50, 65), MissingCone(40)]
    arrays = np.stack([m.observed(d, max_resolution=0.5) for m in masks])
    settings = kernel.KernelSettings(masks=masks, mask_arrays=arrays, orientation_block=4)
    volumes = rng.normal(size=(6, d, d, d)).astype(np.float32)
    chunk = kernel.prepare_particles(volumes, settings, np.arange(6) % 2)
    small, small_settings = kernel.crop_problem(chunk, settings, crop)
    shifts, log_prior = kernel.shift_window(1, 1.0)
    search = kernel.SearchSpace(Rotation.random(9, random_state=2).as_matrix(), shifts,
                                log_prior)
    refs = rng.normal(size=(2, crop, crop, crop)).astype(np.float32) * 0.5
    model = kernel.Model(refs, np.log([0.3, 0.7]), 1.3)
    got, expected = _both(small, model, search, small_settings, xp)
    _assert_same(got, expected)


_PARAMS = dict(angular_step=90, max_iter=3, tol=0, random_state=0, max_shift=1)


def _fit(device, data):
    return MissingDataMLClassifier(2, device=device, **_PARAMS).fit(data.volumes,
                                                                    masks=data.masks)


@pytest.fixture(scope="module")
def small_data(phantoms):
    from mlsubtomo.simulate import make_dataset

    return make_dataset(phantoms, 12, masks=MissingWedge(-60, 60), snr=0.5, random_state=0)


def test_estimator_on_the_gpu_path_fits_as_on_the_cpu(small_data, monkeypatch):
    cpu = _fit("cpu", small_data)
    # The GPU path of the estimator, run with NumPy where no device is present.
    monkeypatch.setattr(gpu, "cuda_array_module", lambda: np)
    _assert_same_fit(_fit("gpu", small_data), cpu)


def test_accelerated_fit_on_the_gpu_path_is_the_cpu_one(small_data, monkeypatch):
    # A Fourier crop, coarse-to-fine candidates and local refinement: the GPU E-step
    # sees cropped shifts, per-class candidates and keeps the pair masses.
    params = dict(_PARAMS, angular_step=45, max_iter=6, min_box_size=8, coarse_step=90.0,
                  local_refinement=50.0, pruning_threshold=1e-4, reference_rotation="fourier")

    def fit(device):
        return MissingDataMLClassifier(2, device=device, **params).fit(
            small_data.volumes, masks=small_data.masks)

    cpu = fit("cpu")
    monkeypatch.setattr(gpu, "cuda_array_module", lambda: np)
    on_gpu = fit("gpu")
    assert min(cpu.box_size_history_) < 12 and cpu.refinement_start_ is not None
    assert on_gpu.box_size_history_ == cpu.box_size_history_
    assert on_gpu.refinement_start_ == cpu.refinement_start_
    # Six iterations compound the single-precision differences of the cross terms
    # (about 4e-6 of the statistics per E-step at D = 32): 1e-4 of the references' range.
    _assert_same_fit(on_gpu, cpu, atol=1e-4 * np.abs(cpu.references_).max())


def test_a_cpu_run_resumes_on_the_gpu(small_data, monkeypatch, tmp_path):
    # Where the E-step runs is not a hyper-parameter of the model: a run interrupted
    # on a CPU node may go on on a GPU node.
    path = tmp_path / "run.ckpt"
    full = _fit("cpu", small_data)
    MissingDataMLClassifier(2, device="cpu", checkpoint_path=path,
                            **dict(_PARAMS, max_iter=2)).fit(small_data.volumes,
                                                             masks=small_data.masks)
    monkeypatch.setattr(gpu, "cuda_array_module", lambda: np)
    resumed = MissingDataMLClassifier(2, device="gpu", checkpoint_path=path, resume=True,
                                      **_PARAMS).fit(small_data.volumes, masks=small_data.masks)
    assert resumed.n_iter_ == full.n_iter_
    _assert_same_fit(resumed, full)


def test_estimator_on_a_cuda_device_fits_as_on_the_cpu(small_data):
    _cupy_or_skip()
    _assert_same_fit(_fit("gpu", small_data), _fit("cpu", small_data))


def _assert_same_fit(got, expected, atol=1e-5):
    np.testing.assert_array_equal(got.labels_, expected.labels_)
    np.testing.assert_allclose(got.references_, expected.references_, atol=atol)
    np.testing.assert_allclose(got.sigma_, expected.sigma_, rtol=1e-5)


def test_device_is_validated(small_data):
    volumes, masks = small_data.volumes, small_data.masks
    with pytest.raises(ValueError, match="device must be 'cpu' or 'gpu'"):
        MissingDataMLClassifier(device="tpu", max_iter=1).fit(volumes, masks=masks)
    if importlib.util.find_spec("cupy") is None:
        with pytest.raises(ImportError, match="CuPy"):
            MissingDataMLClassifier(device="gpu", max_iter=1).fit(volumes, masks=masks)
