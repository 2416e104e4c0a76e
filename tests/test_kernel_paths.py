"""The kernel's ways of computing one E-step agree with each other.

The FFT path with recomputed scores is the one the brute-force tests check
(test_engine_exact.py); the partial-DFT window, kept scores, threads and particle
chunks must reproduce it to float32 round-off.
"""

import dataclasses

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mlsubtomo import MissingDataMLClassifier, kernel
from mlsubtomo.fft import FFTBackend, frequency_grid
from mlsubtomo.masks import MissingCone, MissingWedge

D = 12
N = 10


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(3)
    volumes = rng.normal(size=(N, D, D, D)).astype(np.float32)
    references = rng.normal(size=(2, D, D, D)).astype(np.float32) * 0.5
    masks = [MissingWedge(-60, 60), MissingCone(45)]
    arrays = np.stack([m.observed(D, max_resolution=0.5) for m in masks])
    settings = kernel.KernelSettings(
        masks=masks, mask_arrays=arrays, pruning_threshold=0.0, shift_method="fft",
        keep_scores=False, orientation_block=5,
    )
    chunk = kernel.prepare_particles(volumes, settings, np.arange(N) % 2)
    shifts, log_prior = kernel.shift_window(2, 1.5)
    search = kernel.SearchSpace(
        Rotation.random(12, random_state=4).as_matrix(), shifts, log_prior
    )
    model = kernel.Model(references, np.log([0.4, 0.6]), 1.0)
    reference = kernel.e_step(chunk, model, search, settings)
    return chunk, model, search, settings, reference


def _assert_same(result, reference):
    np.testing.assert_allclose(result.log_likelihood, reference.log_likelihood, rtol=1e-6)
    np.testing.assert_allclose(
        result.class_log_posterior, reference.class_log_posterior, atol=1e-4
    )
    np.testing.assert_array_equal(result.best_class, reference.best_class)
    np.testing.assert_array_equal(result.best_rotation, reference.best_rotation)
    np.testing.assert_array_equal(result.best_shift, reference.best_shift)
    a, b = result.statistics, reference.statistics
    np.testing.assert_allclose(a.class_sums, b.class_sums, rtol=1e-5)
    scale = np.abs(b.data_sums).max()
    np.testing.assert_allclose(a.data_sums, b.data_sums, atol=1e-5 * scale)
    np.testing.assert_allclose(a.observation_counts, b.observation_counts, atol=1e-5)
    np.testing.assert_allclose(a.residual_sum, b.residual_sum, rtol=1e-5)
    np.testing.assert_allclose(a.shift_sum, b.shift_sum, rtol=1e-5)


@pytest.mark.parametrize(
    "changes",
    [
        {"shift_method": "window"},
        {"keep_scores": True},
        {"shift_method": "window", "keep_scores": True, "n_jobs": 2},
        {"n_jobs": 2, "orientation_block": 3},
    ],
    ids=["window", "kept-scores", "window-kept-threads", "threads"],
)
def test_e_step_variants_agree(problem, changes):
    chunk, model, search, settings, reference = problem
    result = kernel.e_step(chunk, model, search, dataclasses.replace(settings, **changes))
    _assert_same(result, reference)


def test_kept_scores_of_a_sparse_second_pass_equal_recomputed_ones(problem, monkeypatch):
    """The first pass keeps only the scores that its running best per particle leaves
    in play; where the threshold prunes (here it keeps 10 of each particle's 24 pairs,
    1.4 of them within a nat of its best), those must still be every score the second
    pass reads."""
    chunk, model, search, settings, _ = problem
    pruned = dataclasses.replace(settings, pruning_threshold=1e-3)
    kept_rows = []
    score_block = kernel._score_block

    def counting(*args):
        out = score_block(*args)
        kept_rows.append(len(out.relative))
        return out

    monkeypatch.setattr(kernel, "_score_block", counting)
    kept = kernel.e_step(chunk, model, search, dataclasses.replace(pruned, keep_scores=True))
    monkeypatch.undo()
    _assert_same(kept, kernel.e_step(chunk, model, search, pruned))
    n_pairs = N * 2 * len(search.rotations)
    assert 0 < sum(kept_rows) < n_pairs


def test_window_cross_terms_equal_fft_ones():
    rng = np.random.default_rng(0)
    backend = kernel.FFTBackend()
    for d, limit in [(12, 2), (13, 3), (16, 1)]:
        shifts, _ = kernel.shift_window(limit, 0.0)
        observed = MissingWedge(-60, 60).observed(d, max_resolution=0.5)[None]
        products = backend.rfftn(rng.normal(size=(3, d, d, d))) * observed
        fft, every = kernel._shift_sums(observed, shifts, backend, "fft")
        window, lines = kernel._shift_sums(observed, shifts, backend, "window")
        # A wedge about y observes whole y-lines or none: the window skips the rest.
        assert lines.shape[1] < 0.6 * every.shape[1]
        expected = fft.cross(every.compact(products))
        np.testing.assert_allclose(
            window.cross(lines.compact(products)), expected, atol=1e-4 * np.abs(expected).max()
        )
        gamma = rng.uniform(size=(3, len(shifts)))
        spread = np.stack([every.expand(s) for s in fft.spread(gamma)])
        np.testing.assert_allclose(
            window.spread(gamma), lines.compact(spread), atol=1e-5 * np.abs(spread).max()
        )


def test_lines_hold_every_observed_component():
    observed = np.stack([m.observed(D, max_resolution=0.5) for m in (
        MissingWedge(-60, 60), MissingCone(45)
    )])
    lines = kernel._Lines(observed)
    weights = observed * np.arange(1.0, observed[0].size + 1).reshape(observed.shape[1:])
    for w in weights:
        np.testing.assert_array_equal(lines.expand(lines.compact(w[None])[0]), w)
    np.testing.assert_array_equal(lines.expand(lines.compact(weights)), weights)


def test_fourier_rotation_of_a_blob_is_its_transform_through_trilinear_interpolation():
    # A Gaussian blob off centre turns into the same blob at the rotated centre, whose
    # transform is known; its spectrum is negligible beyond Nyquist (exp(-11) there).
    # The Fourier rotation samples it times the transfer of real-space trilinear
    # interpolation, sinc^2 per axis at the source frequency R^T q: what remains is the
    # aliasing of the padded box's periodic copies, 2-3.6% at D = 16 for a blob 3.7
    # voxels off centre. So it is the real-space rotation (2.3-3.4% from it) without
    # the aliasing of its interpolation; both are 5-7% from the ideal rotation.
    d = 16
    axis = np.arange(d) - d // 2
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")

    def blob(c):
        squared = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2
        return np.exp(-squared / (2 * 1.5**2)).astype(np.float32)

    centre = np.array([3.0, -2.0, 1.0])
    rotations = Rotation.random(5, random_state=2).as_matrix()
    masks = [MissingWedge(-60, 60)]
    observed = masks[0].observed(d, max_resolution=0.5)
    settings = kernel.KernelSettings(masks=masks, mask_arrays=observed[None], rotation="fourier")
    fourier = kernel.rotate_block(blob(centre)[None], rotations, settings)[0]
    real = kernel.rotate_block(
        blob(centre)[None], rotations, dataclasses.replace(settings, rotation="real")
    )[0] * observed
    q = np.stack([np.broadcast_to(f, observed.shape) for f in frequency_grid(d)], axis=-1)
    for r, matrix in enumerate(rotations):
        transfer = np.prod(np.sinc(q @ matrix / d) ** 2, axis=-1)
        exact = kernel.to_fourier(blob(matrix @ centre)[None])[0] * observed * transfer
        assert np.linalg.norm(fourier[r] - exact) / np.linalg.norm(exact) < 0.04
        assert np.linalg.norm(fourier[r] - real[r]) / np.linalg.norm(real[r]) < 0.04
        # Nothing outside the observed components.
        assert not np.any(fourier[r][~observed])


@pytest.mark.parametrize("rotation", ["real", "fourier"])
def test_rotations_ignore_a_constant_background(rotation):
    # Outside the box both rotations put the boundary mean, so adding a constant to a
    # reference adds only to the DC component of its rotations, which no mask observes.
    d = 12
    reference = np.random.default_rng(4).normal(size=(1, d, d, d)).astype(np.float32)
    rotations = Rotation.random(3, random_state=5).as_matrix()
    masks = [MissingWedge(-60, 60)]
    settings = kernel.KernelSettings(
        masks=masks, mask_arrays=masks[0].observed(d)[None], rotation=rotation
    )
    plain = kernel.rotate_block(reference, rotations, settings) * settings.mask_arrays[0]
    offset = kernel.rotate_block(reference + 0.3, rotations, settings) * settings.mask_arrays[0]
    np.testing.assert_allclose(offset, plain, atol=1e-4 * np.abs(plain).max())


def test_fourier_rotation_paths_agree(problem):
    chunk, model, search, settings, _ = problem
    fourier = dataclasses.replace(settings, rotation="fourier")
    reference = kernel.e_step(chunk, model, search, fourier)
    transforms = kernel.rotated_transforms(model.references, search.rotations, fourier)
    for changes in ({"shift_method": "window", "keep_scores": True}, {"n_jobs": 2}):
        changed = dataclasses.replace(fourier, **changes)
        _assert_same(kernel.e_step(chunk, model, search, changed), reference)
        _assert_same(
            kernel.e_step(chunk, model, search, changed, transforms=transforms), reference
        )


def test_window_needs_the_cube_of_shifts(problem):
    chunk, model, search, settings, _ = problem
    partial = dataclasses.replace(search, shifts=search.shifts[:5], log_shift_prior=np.zeros(5))
    with pytest.raises(ValueError, match="full cube of shifts"):
        kernel.e_step(chunk, model, partial, dataclasses.replace(settings, shift_method="window"))


def test_auto_shift_method_crossover_and_agreement_where_the_cube_nearly_fills_the_box(
    problem,
):
    # At D = 12 the measured crossover falls between L = 2 (window) and L = 3 (FFT).
    # The L = 3 cube spans 7 of the box's 12 voxels per axis, so its shifts reach far
    # round the periodic box: there too both methods must give the same step.
    chunk, model, search, settings, _ = problem
    chosen = {}
    for limit in (2, 3):
        shifts, _ = kernel.shift_window(limit, 1.5)
        chosen[limit] = type(
            kernel._shift_sums(settings.mask_arrays, shifts, FFTBackend(), "auto")[0]
        )
    assert chosen == {2: kernel._WindowShifts, 3: kernel._FourierShifts}
    shifts, log_prior = kernel.shift_window(3, 1.5)
    wide = dataclasses.replace(search, shifts=shifts, log_shift_prior=log_prior)
    reference = kernel.e_step(chunk, model, wide, settings)
    window = dataclasses.replace(settings, shift_method="window")
    _assert_same(kernel.e_step(chunk, model, wide, window), reference)


def test_correlation_search_paths_agree(problem):
    chunk, model, search, settings, _ = problem
    expected = kernel.correlation_search(chunk, model, search, settings)
    for changes in ({"shift_method": "window"}, {"n_jobs": 2, "orientation_block": 2}):
        changed = dataclasses.replace(settings, **changes)
        got = kernel.correlation_search(chunk, model, search, changed)
        np.testing.assert_allclose(
            got.class_log_posterior, expected.class_log_posterior, atol=1e-5
        )
        np.testing.assert_array_equal(got.best_rotation, expected.best_rotation)
        np.testing.assert_array_equal(got.best_shift, expected.best_shift)


def test_chunk_plan_respects_the_budget():
    # Scores kept when they fit, chunks shrink with the budget, never below one particle.
    size, keep, share = kernel.chunk_plan(200, 2, 3108, 343, 32, 4 * 2**30)
    assert keep and share and size == 200
    size, keep, _ = kernel.chunk_plan(2000, 4, 1372, 343, 64, 4 * 2**30)
    per_particle = 64 * 64 * 33 * 8 + 4 * 1372 * (21 + 343 * 4)
    assert keep and size * per_particle <= 4 * 2**30
    size, keep, share = kernel.chunk_plan(2000, 4, 1372, 250047, 64, 2**30)
    assert not keep and not share and size >= 1
    assert kernel.chunk_plan(5, 1, 1, 1, 8, 1.0)[0] == 1


def test_memory_budget_chunks_give_the_same_fit(phantoms):
    from mlsubtomo.simulate import make_dataset

    data = make_dataset(phantoms, 12, masks=MissingWedge(-60, 60), snr=0.5, random_state=0)
    params = dict(angular_step=90, max_iter=2, random_state=0, max_shift=1, pruning_threshold=0.0)
    whole = MissingDataMLClassifier(2, **params).fit(data.volumes, masks=data.masks)
    # A budget of a few particles' worth forces chunks of one or two particles.
    tiny = MissingDataMLClassifier(2, memory_budget=2e-4, **params).fit(
        data.volumes, masks=data.masks
    )
    np.testing.assert_array_equal(tiny.labels_, whole.labels_)
    np.testing.assert_allclose(tiny.references_, whole.references_, atol=1e-5)
    np.testing.assert_allclose(
        tiny.log_likelihood_history_, whole.log_likelihood_history_, rtol=1e-6
    )


def test_fourier_crop_is_the_full_problem_restricted_to_the_crop():
    # Data and references with nothing beyond |q| = 4 and the three cube rotations that
    # only permute the axes (exact at both sizes: a sign flip would move a face of an
    # even box out of it): the crop to 8 must reproduce the full problem at 12.
    d, crop = 12, 8
    rng = np.random.default_rng(5)
    keep = np.zeros(kernel.half_grid_shape(d), dtype=bool)
    keep[kernel.crop_index(d, crop)] = kernel.crop_ball(crop)

    def band_limited(shape):
        return kernel.to_real(kernel.to_fourier(rng.normal(size=shape)) * keep, d)

    masks = [MissingWedge(-50, 65), MissingCone(40)]
    arrays = np.stack([m.observed(d, max_resolution=0.5) for m in masks])
    settings = kernel.KernelSettings(masks=masks, mask_arrays=arrays, shift_method="window")
    chunk = kernel.prepare_particles(band_limited((8, d, d, d)), settings, np.arange(8) % 2)
    shifts, log_prior = kernel.shift_window(1, 1.0)
    cube = np.rint(Rotation.create_group("O").as_matrix())
    search = kernel.SearchSpace(cube[(cube >= 0).all(axis=(1, 2))], shifts, log_prior)
    assert len(search.rotations) == 3
    refs = band_limited((2, d, d, d)) * 0.7
    full = kernel.e_step(chunk, kernel.Model(refs, np.log([0.3, 0.7]), 1.3), search, settings)

    small, small_settings = kernel.crop_problem(chunk, settings, crop)
    index = (slice(None), *kernel.crop_index(d, crop))
    small_refs = kernel.to_real(kernel.to_fourier(refs)[index], crop)
    cropped = kernel.e_step(
        small, kernel.Model(small_refs, np.log([0.3, 0.7]), 1.3), search, small_settings
    )
    np.testing.assert_allclose(cropped.class_log_posterior, full.class_log_posterior, atol=1e-4)
    np.testing.assert_array_equal(cropped.best_rotation, full.best_rotation)
    np.testing.assert_array_equal(cropped.best_shift, full.best_shift)
    # Only the normalisation over the components left out differs.
    gap = (chunk.n_observed - small.n_observed) * np.log(np.sqrt(2 * np.pi) * 1.3)
    np.testing.assert_allclose(cropped.log_likelihood - gap, full.log_likelihood, rtol=1e-6)
    a = cropped.statistics.embedded(kernel.crop_index(d, crop), kernel.half_grid_shape(d))
    b = full.statistics
    scale = np.abs(b.data_sums).max()
    np.testing.assert_allclose(a.data_sums, b.data_sums, atol=1e-5 * scale)
    np.testing.assert_allclose(
        a.observation_counts, b.observation_counts * keep, atol=1e-6 * b.class_sums.max()
    )
    np.testing.assert_allclose(a.residual_sum, b.residual_sum, rtol=1e-5)


def test_min_box_size_grows_the_box_and_classifies(phantoms):
    from mlsubtomo import LinearDecay
    from mlsubtomo.metrics import class_purity
    from mlsubtomo.simulate import make_dataset

    # At SNR 1 the half sets agree to Nyquist, so the box grows 8 -> 12 -> 16; the
    # classes (which differ mostly in the GroES cap) are found as in the full box,
    # where this setting misclassifies at most 1 of 30.
    data = make_dataset(phantoms, 30, masks=MissingWedge(-60, 60), snr=1.0, random_state=2)
    est = MissingDataMLClassifier(
        2, angular_step=45, max_shift=1, max_iter=8, min_box_size=8, random_state=0,
        regularization=LinearDecay(5.0, 5),
    ).fit(data.volumes, masks=data.masks)
    assert est.box_size_history_[:3] == [8, 12, 16]
    assert est.box_size_history_[-1] == 16
    assert class_purity(data.labels, est.labels_) >= 0.9
    assert est.references_.shape == (2, 16, 16, 16)
    np.testing.assert_array_equal(est.predict(data.volumes, masks=data.masks), est.labels_)


def test_scores_of_a_cropped_fit_cover_the_whole_box(phantoms):
    import copy

    from mlsubtomo.simulate import make_dataset

    # One iteration in the box of 8 leaves the next crop (12) below the box (16). The
    # score must not depend on which crop the fit ended in: a grid search over
    # min_box_size compares these scores.
    data = make_dataset(phantoms, 12, masks=MissingWedge(-60, 60), snr=1.0, random_state=3)
    est = MissingDataMLClassifier(
        2, angular_step=60, max_shift=1, max_iter=1, min_box_size=8, random_state=0,
    ).fit(data.volumes, masks=data.masks)
    assert est._crop_size == 12
    whole = copy.deepcopy(est)
    whole._crop_size = 16
    scores = est.score_samples(data.volumes, masks=data.masks)
    np.testing.assert_array_equal(scores, whole.score_samples(data.volumes, masks=data.masks))
    # Not what the crop alone gives, which leaves out the components between it and
    # the band's edge.
    particles, settings = est._prepare_predict(data.volumes, data.masks)
    _, in_crop, _ = est._e_step(particles, settings, est._orientation_grid(), None, False)
    assert np.all(np.abs(scores - in_crop.log_likelihood) > 1.0)
