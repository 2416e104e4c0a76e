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


def test_window_cross_terms_equal_fft_ones():
    rng = np.random.default_rng(0)
    for d, limit in [(12, 2), (13, 3), (16, 1)]:
        shifts, _ = kernel.shift_window(limit, 0.0)
        backend = kernel.FFTBackend()
        products = kernel.FFTBackend().rfftn(rng.normal(size=(3, d, d, d)))
        fft = kernel._FourierShifts(d, shifts, backend)
        window = kernel._WindowShifts(d, limit)
        expected = fft.cross(products)
        np.testing.assert_allclose(
            window.cross(products), expected, atol=1e-4 * np.abs(expected).max()
        )
        gamma = rng.uniform(size=(3, len(shifts)))
        spread = fft.spread(gamma)
        np.testing.assert_allclose(window.spread(gamma), spread, atol=1e-5 * np.abs(spread).max())


def test_window_needs_the_cube_of_shifts(problem):
    chunk, model, search, settings, _ = problem
    partial = dataclasses.replace(search, shifts=search.shifts[:5], log_shift_prior=np.zeros(5))
    with pytest.raises(ValueError, match="full cube of shifts"):
        kernel.e_step(chunk, model, partial, dataclasses.replace(settings, shift_method="window"))


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
