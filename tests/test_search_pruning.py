"""Pruned searches: per-class candidates, the search-wide orientation prior, kept pair
masses, nearest grid orientations, coarse-to-fine global search and the class
restriction of local refinement.

Every comparison pits a pruned search against the exhaustive one it stands for: with
the orientation prior fixed at -log(R), a pruned search sums a subset of exactly the
same terms, so its results are those of the exhaustive search restricted to the
searched pairs.
"""

import dataclasses
import logging

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mlsubtomo import MissingDataMLClassifier, kernel
from mlsubtomo.fft import hermitian_multiplicity
from mlsubtomo.masks import MissingCone, MissingWedge
from mlsubtomo.metrics import class_purity
from mlsubtomo.sampling import (
    local_neighbourhood,
    nearest_grid_index,
    so3_grid,
    symmetry_group,
)
from mlsubtomo.simulate import make_dataset

D = 12
N = 8
K = 3
R = 12
BLOCK = 4  # orientation_block: R / BLOCK = 3 blocks
WEDGE = MissingWedge(-60, 60)


# ------------------------------------------------------------------ kernel fixtures


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(11)
    references = rng.normal(size=(K, D, D, D)).astype(np.float32) * 0.5
    # Particles made from the references, so that posteriors are spread over several
    # classes and orientations instead of sitting on one pair.
    rotations = Rotation.random(R, random_state=12).as_matrix()
    source = references[np.arange(N) % K]
    volumes = (source + rng.normal(size=(N, D, D, D)) * 1.5).astype(np.float32)
    masks = [MissingWedge(-60, 60), MissingCone(45)]
    arrays = np.stack([m.observed(D, max_resolution=0.5) for m in masks])
    settings = kernel.KernelSettings(
        masks=masks, mask_arrays=arrays, pruning_threshold=0.0, orientation_block=BLOCK,
    )
    chunk = kernel.prepare_particles(volumes, settings, np.arange(N) % 2)
    shifts, log_prior = kernel.shift_window(1, 1.0)
    search = kernel.SearchSpace(rotations, shifts, log_prior)
    model = kernel.Model(references, np.log([0.3, 0.3, 0.4]), 3.0)
    full = kernel.e_step(chunk, model, search, settings, keep_pairs=True)
    # The test is only meaningful when posteriors are not all on one pair.
    assert np.sum(full.max_posterior < 0.9) >= 2, full.max_posterior
    return chunk, model, search, settings, full


def _log_norm(chunk, model):
    """What e_step subtracts from the log-sum of pair masses to get log-likelihoods."""
    return chunk.n_observed * np.log(np.sqrt(2.0 * np.pi) * model.sigma)


def _assert_same(result, reference, statistics=True):
    np.testing.assert_allclose(result.log_likelihood, reference.log_likelihood, rtol=1e-6)
    np.testing.assert_array_equal(
        np.isneginf(result.class_log_posterior), np.isneginf(reference.class_log_posterior)
    )
    np.testing.assert_allclose(
        np.exp(result.class_log_posterior), np.exp(reference.class_log_posterior), atol=1e-5
    )
    np.testing.assert_allclose(result.max_posterior, reference.max_posterior, rtol=1e-4)
    np.testing.assert_array_equal(result.best_class, reference.best_class)
    np.testing.assert_array_equal(result.best_rotation, reference.best_rotation)
    np.testing.assert_array_equal(result.best_shift, reference.best_shift)
    if not statistics:
        return
    a, b = result.statistics, reference.statistics
    np.testing.assert_allclose(a.class_sums, b.class_sums, rtol=1e-5, atol=1e-9)
    scale = np.abs(b.data_sums).max()
    np.testing.assert_allclose(a.data_sums, b.data_sums, atol=1e-5 * scale)
    np.testing.assert_allclose(
        a.observation_counts, b.observation_counts, atol=1e-5 * b.class_sums.max()
    )
    np.testing.assert_allclose(a.residual_sum, b.residual_sum, rtol=1e-5)
    np.testing.assert_allclose(a.shift_sum, b.shift_sum, rtol=1e-5)
    assert a.log_likelihood == pytest.approx(b.log_likelihood, rel=1e-6)


def _with_candidates(chunk, candidates):
    return chunk.subset(np.arange(len(chunk)), candidates)


# ------------------------------------------------------------- all-True candidates


@pytest.mark.parametrize("prior", ["grid", None], ids=["fixed-prior", "searched-prior"])
@pytest.mark.parametrize("keep_scores", [True, False], ids=["kept", "recomputed"])
def test_all_true_class_candidates_equal_the_full_search(problem, prior, keep_scores):
    chunk, model, search, settings, _ = problem
    settings = dataclasses.replace(settings, keep_scores=keep_scores)
    reference = kernel.e_step(chunk, model, search, settings)
    # -log(R) fixed, or left to the kernel: every particle searches all R either way.
    pruned = dataclasses.replace(
        search, log_orientation_prior=-np.log(R) if prior == "grid" else None
    )
    everything = _with_candidates(chunk, np.ones((N, K, R), dtype=bool))
    _assert_same(kernel.e_step(everything, model, pruned, settings), reference)


# ---------------------------------------------------------- per-class candidates


def _class_candidates():
    """(N, K, R) candidates: particles 0-2 never search class 2, and within them
    classes 0 and 1 search the same orientations; nobody searches class 1 in the
    first orientation block; the rest is random."""
    rng = np.random.default_rng(7)
    candidates = rng.random((N, K, R)) < 0.5
    candidates[:, 1, :BLOCK] = False
    first3 = np.arange(3)
    candidates[first3, 0, :BLOCK] = False
    candidates[first3, 0, BLOCK + first3] = True
    candidates[first3, 1] = candidates[first3, 0]
    candidates[first3, 2] = False
    for i in range(3, N):  # no particle left without an orientation
        candidates[i, 0, i % R] = True
    candidates[5, 0] = False  # another excluded (particle, class)
    candidates[5, 2, -1] = True
    return candidates


@pytest.mark.parametrize("keep_scores", [True, False], ids=["kept", "recomputed"])
def test_class_candidates_are_the_full_search_restricted(problem, keep_scores, monkeypatch):
    chunk, model, search, settings, full = problem
    settings = dataclasses.replace(settings, keep_scores=keep_scores)
    candidates = _class_candidates()
    fixed = dataclasses.replace(search, log_orientation_prior=-np.log(R))

    rotated = []  # (first orientation of the block, classes rotated)
    original = kernel.rotate_block

    def recording(references, rotations, settings, needed=None, padded=None):
        first = int(np.flatnonzero(np.all(np.isclose(search.rotations, rotations[0]), (1, 2)))[0])
        classes = None if needed is None else np.flatnonzero(needed.any(axis=1)).tolist()
        rotated.append((first, classes))
        return original(references, rotations, settings, needed, padded)

    monkeypatch.setattr(kernel, "rotate_block", recording)
    result = kernel.e_step(
        _with_candidates(chunk, candidates), model, fixed, settings, keep_pairs=True
    )
    monkeypatch.undo()

    # Excluded (particle, class) pairs have no posterior at all, the others some.
    excluded = ~candidates.any(axis=2)
    assert excluded[:3, 2].all() and excluded[5, 0] and excluded.sum() == 4
    np.testing.assert_array_equal(np.isneginf(result.class_log_posterior), excluded)
    assert np.all(np.isfinite(result.class_log_posterior[~excluded]))

    # Each searched pair has the mass of the full search (the same prior -log R), and
    # everything else follows from those masses.
    mass = result.pair_log_mass
    assert np.all(np.isneginf(mass[~candidates]))
    np.testing.assert_allclose(mass[candidates], full.pair_log_mass[candidates], rtol=1e-6)
    restricted = np.where(candidates, full.pair_log_mass, -np.inf)
    lse = kernel.logsumexp(restricted.reshape(N, -1), axis=1)
    np.testing.assert_allclose(result.log_likelihood, lse - _log_norm(chunk, model), rtol=1e-6)
    np.testing.assert_allclose(
        np.exp(result.class_log_posterior),
        np.exp(kernel.logsumexp(restricted, axis=2) - lse[:, None]),
        atol=1e-5,
    )
    assert np.all(candidates[np.arange(N), result.best_class, result.best_rotation])

    # Class 1 is searched by nobody in the first block, so it is not rotated there
    # (in either pass); the classes searched elsewhere are.
    first_block = [classes for first, classes in rotated if first == 0]
    assert first_block and all(1 not in classes for classes in first_block), rotated
    assert [0, 2] in first_block, rotated
    later = [classes for first, classes in rotated if first == BLOCK]
    assert later and all(1 in classes for classes in later), rotated

    # Particles 0-2 search classes 0 and 1 in the same orientations and never class 2:
    # exactly a search of those orientations with class 2 empty, statistics included.
    first3 = np.arange(3)
    shared = candidates[first3, 0]
    with np.errstate(divide="ignore"):
        empty = kernel.Model(model.references, np.log([0.3, 0.3, 0.0]), model.sigma)
    expected = kernel.e_step(chunk.subset(first3, shared), empty, fixed, settings)
    got = kernel.e_step(chunk.subset(first3, candidates[first3]), model, fixed, settings)
    _assert_same(got, expected)
    np.testing.assert_array_equal(got.statistics.class_sums[2], 0.0)
    assert np.all(got.statistics.class_sums[:2] > 0)


# ------------------------------------------------------------------ pair masses


def test_pair_log_mass_sums_to_the_likelihood_and_survives_concatenation(problem):
    chunk, model, search, settings, full = problem
    candidates = _class_candidates()
    fixed = dataclasses.replace(search, log_orientation_prior=-np.log(R))
    result = kernel.e_step(
        _with_candidates(chunk, candidates), model, fixed, settings, keep_pairs=True
    )
    for r, c in ((full, np.ones((N, K, R), dtype=bool)), (result, candidates)):
        mass = r.pair_log_mass
        assert mass.shape == (N, K, R)
        total = kernel.logsumexp(mass.reshape(N, -1), axis=1)
        np.testing.assert_allclose(total, r.log_likelihood + _log_norm(chunk, model), rtol=1e-9)
        assert np.all(np.isneginf(mass[~c])) and np.all(np.isfinite(mass[c]))
        # Per class, the masses give the class posteriors.
        np.testing.assert_allclose(
            kernel.logsumexp(mass, axis=2) - total[:, None], r.class_log_posterior, atol=1e-9
        )
    # Not asked for, not kept.
    assert kernel.e_step(chunk, model, search, settings, accumulate=False).pair_log_mass is None

    # Chunks joined and reordered carry the masses with their particles.
    halves = [np.arange(0, N, 2), np.arange(1, N, 2)]
    parts = [
        kernel.e_step(chunk.subset(h), model, search, settings, accumulate=False, keep_pairs=True)
        for h in halves
    ]
    joined = kernel.ChunkResult.concatenate(parts)
    order = np.argsort(np.concatenate(halves))
    back = joined.take(order)
    np.testing.assert_allclose(back.pair_log_mass, full.pair_log_mass, rtol=1e-6)
    np.testing.assert_allclose(back.log_likelihood, full.log_likelihood, rtol=1e-6)
    picked = full.take(np.array([5, 2]))
    np.testing.assert_array_equal(picked.pair_log_mass, full.pair_log_mass[[5, 2]])
    assert full.take(np.array([1])).pair_log_mass.shape == (1, K, R)
    plain = kernel.ChunkResult.concatenate(
        [dataclasses.replace(p, pair_log_mass=None) for p in parts]
    )
    assert plain.pair_log_mass is None and plain.take(order).pair_log_mass is None


# ------------------------------------------------------------ nearest_grid_index


@pytest.mark.parametrize("symmetry", ["C1", "C2", "D2"])
def test_nearest_grid_index_is_the_argmin_of_the_distance_modulo_the_group(symmetry):
    grid = Rotation.random(40, random_state=1)
    probes = Rotation.concatenate([Rotation.random(150, random_state=2), grid[:5]])
    group = symmetry_group(symmetry)
    # dist(p, grid_j g) = |(grid_j g)^-1 p|, minimised over g.
    distance = np.full((len(probes), len(grid)), np.inf)
    for g in range(len(group)):
        for j in range(len(grid)):
            moved = (grid[j] * group[g]).inv() * probes
            distance[:, j] = np.minimum(distance[:, j], moved.magnitude())
    index = nearest_grid_index(grid, probes, symmetry)
    assert index.shape == (len(probes),) and index.dtype.kind == "i"
    rows = np.arange(len(probes))
    np.testing.assert_allclose(distance[rows, index], distance.min(axis=1), atol=1e-7)
    # Where the nearest is clearly nearest, the very index.
    ordered = np.sort(distance, axis=1)
    clear = ordered[:, 1] - ordered[:, 0] > 1e-6
    assert clear.sum() > 0.9 * len(probes)
    np.testing.assert_array_equal(index[clear], distance.argmin(axis=1)[clear])
    np.testing.assert_array_equal(index[-5:], np.arange(5))
    if symmetry != "C1":
        # A symmetry mate of a grid rotation is that grid rotation.
        mates = grid[:5] * group[len(group) - 1]
        np.testing.assert_array_equal(nearest_grid_index(grid, mates, symmetry), np.arange(5))


# ----------------------------------------------------------- estimator: coarse_step

FIT = dict(angular_step=45, max_shift=1, max_iter=2, random_state=0, n_jobs=1)


def test_coarse_step_without_pruning_is_the_exhaustive_fit(phantoms):
    # pruning_threshold=0 keeps every coarse orientation, so nothing is pruned and the
    # coarse pass must be skipped or be harmless: the very same fit, bit for bit.
    data = make_dataset(phantoms, 12, masks=WEDGE, snr=0.5, max_shift=1, random_state=3)
    params = dict(FIT, pruning_threshold=0.0)
    exhaustive = MissingDataMLClassifier(2, **params).fit(data.volumes, masks=data.masks)
    coarse = MissingDataMLClassifier(2, coarse_step=90.0, **params).fit(
        data.volumes, masks=data.masks
    )
    np.testing.assert_array_equal(coarse.labels_, exhaustive.labels_)
    np.testing.assert_allclose(
        coarse.log_likelihood_history_, exhaustive.log_likelihood_history_, rtol=1e-9
    )
    np.testing.assert_array_equal(coarse.rotations_, exhaustive.rotations_)
    np.testing.assert_array_equal(coarse.shifts_, exhaustive.shifts_)
    np.testing.assert_array_equal(coarse.references_, exhaustive.references_)


def _asymmetric_references(d=16, k=2, seed=5):
    """Classes of three broad Gaussian blobs each: no symmetry, so that every particle
    has one best orientation (the phantoms' D7 and C7 mates give several peaks, and a
    pruned search may keep another one than the exhaustive search's best)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(d) - d // 2] * 3, indexing="ij")
    out = np.zeros((k, d, d, d), dtype=np.float32)
    for c in range(k):
        for _ in range(3):
            p, s = rng.uniform(-d / 4, d / 4, 3), rng.uniform(2.0, 3.0)
            out[c] += np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * s * s))
    return out


@pytest.fixture(scope="module")
def easy():
    """High-SNR data of asymmetric classes, an exhaustive and a coarse-to-fine fit.

    Easy for a coarse search means a likelihood whose peak is wider than the coarse
    grid's spacing, so that the coarse orientation nearest the peak scores best: the
    peak's width is about 1 / (pi r q_max) radians for a particle of radius r, hence
    a low max_resolution (0.15: ~25 degrees for r ~ 5). At Nyquist the 45-degree grid
    aliases the peak, and with coarse_step=90 a quarter of the particles lost their
    exhaustive best pair (a property of pruning, not a bug).
    """
    references = _asymmetric_references()
    data = make_dataset(references, 16, masks=WEDGE, snr=2.0, max_shift=1, random_state=4)
    # A margin of 18 nats (1e-8) keeps the pruning of this small problem real: the
    # default 100 nats reaches the whole of its 126-orientation grid.
    params = dict(FIT, init_references=references, max_resolution=0.15, coarse_margin=18.4)
    exhaustive = MissingDataMLClassifier(2, **params).fit(data.volumes, masks=data.masks)
    coarse = MissingDataMLClassifier(2, coarse_step=90.0, **params).fit(
        data.volumes, masks=data.masks
    )
    return data, exhaustive, coarse


def _e_step_of(est, data, coarse_step):
    """The estimator's final, global E-step at its fitted model with ``coarse_step``
    (pruned), the exhaustive search's pair masses (full), the coarse-to-fine
    candidates, and what e_step subtracts from log-sums to get log-likelihoods."""
    prepared, settings, *_ = est._prepare_fit(data.volumes, data.masks, None, None)
    grid = est._orientation_grid()
    shifts, log_prior = kernel.shift_window(est._shift_limit(est.xi_), est.xi_)
    search = kernel.SearchSpace(grid, shifts, log_prior, -np.log(len(grid)))
    model = est._model()
    full = kernel.e_step(prepared, model, search, settings, accumulate=False, keep_pairs=True)
    saved = est.coarse_step
    try:
        est.coarse_step = coarse_step
        _, pruned, _ = est._e_step(prepared, settings, grid, None, False)
        candidates = est._coarse_candidates(prepared, search, settings, est._crop_size)
    finally:
        est.coarse_step = saved
    return pruned, full, candidates, _log_norm(prepared, model)


@pytest.mark.parametrize("fitted", ["exhaustive", "coarse"])
def test_coarse_to_fine_search_loses_only_posterior_mass(easy, fitted):
    data, exhaustive, coarse = easy
    # The same classes as the exhaustive fit, which finds the true ones.
    assert class_purity(data.labels, exhaustive.labels_) == 1.0
    assert class_purity(exhaustive.labels_, coarse.labels_) == 1.0

    # At one fitted model, the coarse-to-fine E-step against the exhaustive one. Both
    # use the prior -log(R) of the whole grid, so the pruned log-likelihood of particle
    # i is the log of the sum of the same pair terms over its searched pairs S_i:
    #     L_i(S_i) = L_i(all) + log P_i(S_i),   P_i = the exhaustive posterior.
    # Hence L_i(S_i) <= L_i(all), and when S_i holds the exhaustive best pair (whose
    # mass over shifts is at least its best shift's posterior, max_posterior_i),
    #     L_i(all) + log max_posterior_i <= L_i(S_i).
    # The only slack is float round-off: scores from float32 cross terms, which the
    # kernel's paths reproduce to 1e-6 relative (test_kernel_paths.py).
    est = exhaustive if fitted == "exhaustive" else coarse
    pruned, full, candidates, log_norm = _e_step_of(est, data, 90.0)
    if fitted == "coarse":  # the harness reproduces the fit's final E-step
        assert pruned.log_likelihood.sum() == pytest.approx(est.lower_bound_, rel=1e-9)
    else:
        assert full.log_likelihood.sum() == pytest.approx(est.lower_bound_, rel=1e-9)
    assert candidates.mean() < 0.9  # the coarse pass really pruned
    slack = 1e-6 * np.abs(full.log_likelihood)
    assert np.all(pruned.log_likelihood <= full.log_likelihood + slack)
    rows = np.arange(len(data.labels))
    assert np.all(candidates[rows, full.best_class, full.best_rotation])
    assert np.all(
        pruned.log_likelihood >= full.log_likelihood + np.log(full.max_posterior) - slack
    )
    # Exactly: the exhaustive masses restricted to the searched pairs.
    kept = np.where(candidates, full.pair_log_mass, -np.inf)
    expected = kernel.logsumexp(kept.reshape(len(rows), -1), axis=1) - log_norm
    np.testing.assert_allclose(pruned.log_likelihood, expected, rtol=1e-6)
    # The best pair being searched, the best pose is the exhaustive one.
    np.testing.assert_array_equal(pruned.best_class, full.best_class)
    np.testing.assert_array_equal(pruned.best_rotation, full.best_rotation)
    np.testing.assert_array_equal(pruned.best_shift, full.best_shift)


def test_coarse_candidates_follow_their_definition(easy):
    # Documented: score the grid orientations nearest to so3_grid(coarse_step); in each
    # (particle, class), keep those within coarse_margin nats of the class's best coarse
    # mass; search every grid orientation within coarse_step of them.
    data, _, coarse = easy
    step = 90.0
    _, full, candidates, _ = _e_step_of(coarse, data, step)
    # The margin is coarse_margin unless the references turn with less contrast.
    _, settings, *_ = coarse._prepare_fit(data.volumes, data.masks, None, None)
    contrast = kernel.rotation_contrast(coarse._model(), settings, step)
    margin = min(coarse.coarse_margin, contrast + 3 * np.sqrt(2 * contrast))
    grid = Rotation.from_matrix(coarse._orientation_grid())
    index = np.unique(nearest_grid_index(grid, so3_grid(step)))
    # The coarse search keeps the prior -log(R), so its pair masses are the full ones;
    # 1e-3 nats and 1e-6 rad of slack cover round-off (boundary cases are improbable).
    mass = full.pair_log_mass[:, :, index]
    floor = mass.max(axis=2, keepdims=True) - margin
    chosen_lo, chosen_hi = mass >= floor + 1e-3, mass >= floor - 1e-3
    distance = np.stack([(grid[j].inv() * grid).magnitude() for j in index])  # (m, R)
    near_lo = distance <= np.radians(step) - 1e-6
    near_hi = distance <= np.radians(step) + 1e-6
    reached_lo = np.einsum("nkm,mr->nkr", chosen_lo, near_lo) > 0
    reached_hi = np.einsum("nkm,mr->nkr", chosen_hi, near_hi) > 0
    assert candidates.shape == full.pair_log_mass.shape
    assert np.all(candidates[reached_lo]) and not np.any(candidates[~reached_hi])
    # Per class, not per particle: every class keeps its own best coarse orientation.
    best = index[np.argmax(mass, axis=2)]
    assert np.all(np.take_along_axis(candidates, best[..., None], axis=2))


def _contrast_settings(d, masks):
    arrays = np.stack([m.observed(d) for m in masks])
    return kernel.KernelSettings(masks=masks, mask_arrays=arrays)


def test_rotation_contrast_is_the_score_change_of_a_turn():
    d = 16
    settings = _contrast_settings(d, [WEDGE, MissingCone(45)])
    references = _asymmetric_references(d)
    model = kernel.Model(references, np.log([0.5, 0.5]), 1.0)
    small, large = (kernel.rotation_contrast(model, settings, a) for a in (5.0, 30.0))
    # A small turn changes a smooth map less than a large one.
    assert 0 < small < large
    # Scores scale as 1 / sigma^2.
    halved = kernel.rotation_contrast(kernel.Model(references, model.log_class_weights, 2.0),
                                      settings, 30.0)
    assert halved == pytest.approx(large / 4, rel=1e-9)
    # |a - b|^2 <= 2 |a|^2 + 2 |b|^2, with |a|, |b| at most the largest observed norm
    # of a reference (rotation keeps the norm up to interpolation; 10% slack).
    weights = settings.mask_arrays * hermitian_multiplicity(d)
    norms = [
        np.sum(w * np.abs(kernel.to_fourier(r[None])[0]) ** 2) for w in weights for r in references
    ]
    assert large <= 1.1 * 4 * max(norms) / 2


def test_rotation_contrast_of_a_round_blob_is_next_to_nothing():
    # Turning a centred isotropic Gaussian changes it only by interpolation error.
    d = 16
    z, y, x = np.meshgrid(*[np.arange(d) - d // 2] * 3, indexing="ij")
    blob = np.exp(-(x**2 + y**2 + z**2) / (2 * 2.5**2)).astype(np.float32)
    settings = _contrast_settings(d, [WEDGE])
    model = kernel.Model(blob[None], np.zeros(1), 1.0)
    weights = settings.mask_arrays[0] * hermitian_multiplicity(d)
    energy = np.sum(weights * np.abs(kernel.to_fourier(blob[None])[0]) ** 2) / 2
    assert kernel.rotation_contrast(model, settings, 30.0) < 0.01 * energy


# ------------------------------------------------ local refinement: class restriction


@pytest.mark.parametrize("threshold", [0.0, 1e-8, 0.05, 0.5, 1.0])
def test_significant_pairs(threshold):
    rng = np.random.default_rng(int(threshold * 100) + 1)
    est = MissingDataMLClassifier(2, pruning_threshold=threshold)
    mass = rng.normal(scale=6.0, size=(50, 2, 9))
    mass[::7, 1] = -np.inf  # a class not searched at all
    mass[::5, 0, 3] = mass[::5].max(axis=(1, 2))  # ties with the best pair
    significant = est._significant_pairs(mass)
    assert significant.shape == mass.shape and significant.dtype == bool
    assert not significant[::7, 1].any()
    p = np.exp(mass)
    best = p.max(axis=(1, 2), keepdims=True)
    if threshold == 0:
        np.testing.assert_array_equal(significant, np.isfinite(mass))
    else:
        # Away from the boundary, exactly the pairs holding threshold of the best.
        clear = np.abs(p - threshold * best) > 1e-9 * best
        np.testing.assert_array_equal(significant[clear], (p >= threshold * best)[clear])
    assert significant[::5, 0, 3].all()
    assert significant.reshape(50, -1).sum(axis=1).min() >= 1


def test_class_best_pairs_keep_every_searched_class():
    # Class 1 lies 50 nats below class 0, far below any pruning threshold: it is
    # still marked at its own best orientation, so a local search keeps it.
    rng = np.random.default_rng(5)
    mass = rng.normal(size=(30, 2, 11))
    mass[:, 1] -= 50.0
    mass[::4, 1] = -np.inf  # a class not searched at all
    best = MissingDataMLClassifier._class_best_pairs(mass)
    assert best.shape == mass.shape and best.dtype == bool
    searched = np.ones((30, 2), dtype=bool)
    searched[::4, 1] = False
    np.testing.assert_array_equal(best.sum(axis=2), searched)
    rows, classes = np.nonzero(searched)
    assert best[rows, classes, np.argmax(mass, axis=2)[rows, classes]].all()
    assert not MissingDataMLClassifier(2)._significant_pairs(mass)[:, 1].any()


def _peaks(rotations, n, seed):
    """Three grid orientations 120 degrees apart for each of n particles, (3,) of (n,)."""
    base = Rotation.random(n, random_state=seed)
    turns = Rotation.from_rotvec(np.radians(120.0) * np.eye(3)[[0, 0, 1]] * [[0], [1], [1]])
    # On grid orientations, so that each peak has a single best grid point.
    return [rotations[nearest_grid_index(rotations, base * turn)] for turn in turns]


def _peaked_mass(rotations, peaks, heights, slope):
    """(3, n, R): log posteriors falling off by ``slope`` nats per radian from each peak."""
    def angles(p):
        dots = np.abs(p.as_quat() @ rotations.as_quat().T)
        return 2.0 * np.arccos(np.clip(dots, 0.0, 1.0))

    return np.stack([h - slope * angles(p) for h, p in zip(heights, peaks, strict=True)])


@pytest.mark.parametrize(
    "slope, heights, gap",
    [
        # Steep (high SNR): the best peak falls by more than coarse_margin within
        # its neighbourhood, so the margin is the window; 60 nats is inside, 150 not.
        (200.0, (0.0, -60.0, -150.0), 20.0),
        # Broad (low SNR): it falls by 10.5-15.7 nats within its neighbourhood
        # (30-45 degrees on this grid), so 6 and 9 nats below are inside and 20 not,
        # though all are within coarse_margin.
        (20.0, (0.0, -6.0, -20.0), 3.0),
    ],
)
def test_posterior_modes_keep_the_peaks_that_could_overtake_the_best(slope, heights, gap):
    # Each particle's pair posterior falls off with the angle to three peaks (as at
    # the symmetry mates of a symmetric particle); class 1 has the first two, ``gap``
    # nats lower.
    est = MissingDataMLClassifier(2, angular_step=30.0, coarse_margin=100.0)
    grid = est._orientation_grid()
    rotations = Rotation.from_matrix(grid)
    n = 12
    peaks = _peaks(rotations, n, 3)
    bumps = _peaked_mass(rotations, peaks, heights, slope)
    mass = np.stack([bumps.max(axis=0), bumps[:2].max(axis=0) - gap], axis=1)
    mass[::4, 1] = -np.inf  # a class not searched for these particles
    modes = est._posterior_modes(mass, est._grid_neighbours(grid))
    assert modes.shape == mass.shape and modes.dtype == bool
    # Exactly the grid orientations nearest to the first two peaks, in each class
    # searched; not the third.
    nearest = np.stack([nearest_grid_index(rotations, p) for p in peaks], axis=1)
    expected = np.zeros_like(modes)
    rows = np.arange(n)
    for k in (0, 1):
        expected[rows, k, nearest[:, 0]] = expected[rows, k, nearest[:, 1]] = True
    expected[::4, 1] = False
    np.testing.assert_array_equal(modes, expected)


def test_local_search_around_the_previous_significant_pairs(easy):
    data, exhaustive, _ = easy
    est = exhaustive
    prepared, settings, *_ = est._prepare_fit(data.volumes, data.masks, None, None)
    grid = est._orientation_grid()
    n = len(data.volumes)
    full = est._e_step(prepared, settings, grid, None, False)[1]
    # Every pair chosen before: every orientation is reached, the global search.
    every = np.ones((n, 2, len(grid)), dtype=bool)
    again = est._e_step(prepared, settings, grid, None, False, 50.0, (grid, every))[1]
    _assert_same(again, full, statistics=False)
    # One pair chosen per particle, in its own class: the other class is not searched,
    # and the best orientation lies within the radius of the chosen one.
    chosen = np.zeros_like(every)
    rows = np.arange(n)
    chosen[rows, full.best_class, full.best_rotation] = True
    local = est._e_step(prepared, settings, grid, None, False, 50.0, (grid, chosen))[1]
    other = np.ones((n, 2), dtype=bool)
    other[rows, full.best_class] = False
    np.testing.assert_array_equal(np.isneginf(local.class_log_posterior), other)
    turned = Rotation.from_matrix(
        np.einsum("nji,njk->nik", grid[full.best_rotation], grid[local.best_rotation])
    ).magnitude()
    assert np.degrees(turned).max() <= 50.0 + 1e-6
    # The chosen pair is searched, so nothing better than the global best is lost.
    np.testing.assert_array_equal(local.best_rotation, full.best_rotation)
    assert np.all(local.log_likelihood <= full.log_likelihood + 1e-6 * np.abs(full.log_likelihood))


def test_orientations_reached_in_particle_batches(easy, monkeypatch):
    from mlsubtomo import estimator

    _, est, _ = easy
    grid = est._orientation_grid()
    rng = np.random.default_rng(3)
    chosen = rng.random((7, 2, len(grid))) < 0.05
    chosen[1] = False  # a particle with no centre reaches nothing
    # Batches of one particle each.
    monkeypatch.setattr(estimator, "_MODE_BATCH_BYTES", 1)
    reached = est._reached(grid, chosen, grid, 40.0)
    near = local_neighbourhood(Rotation.from_matrix(grid), Rotation.from_matrix(grid), 40.0,
                               est.symmetry, include_nearest=True)
    expected = np.einsum("nkm,mr->nkr", chosen.astype(int), near.astype(int)) > 0
    np.testing.assert_array_equal(reached, expected)
    assert not reached[1].any() and reached[0].any()


def _refined_fit(data, init_references=None):
    """A short fit of ``data`` whose last iterations are local refinement."""
    if init_references is None:
        init_references = _asymmetric_references()
    params = dict(FIT, init_references=init_references, max_resolution=0.15,
                  max_iter=8, perturb=False, tol=0.5)
    return MissingDataMLClassifier(2, local_refinement=50.0, **params).fit(
        data.volumes, masks=data.masks
    )


def test_memory_budget_covers_the_pair_arrays_kept_for_the_run(easy, monkeypatch):
    data, _, _ = easy
    plans = []
    plan = kernel.chunk_plan

    def spy(n, k, r, t, d, budget):
        plans.append((n * k * r, budget))
        return plan(n, k, r, t, d, budget)

    monkeypatch.setattr(kernel, "chunk_plan", spy)
    est = _refined_fit(data)
    assert est.refinement_start_ is not None
    # What each E-step's chunks were not given, per pair: the pair masses and chosen
    # pairs kept for the next iteration (9 bytes) in the global iterations, the
    # candidate pairs searched too (1 byte) in refinement, and only the candidates in
    # the final local search, which keeps nothing.
    held = [round(est.memory_budget * 2**30 - budget) / pairs for pairs, budget in plans]
    assert held[0] == 9 and held[-1] == 1 and set(held) == {9, 10, 1}


def test_local_refinement_searches_every_class_of_every_particle(easy, monkeypatch):
    # At SNR 2 a particle's other class is far below pruning_threshold; it must
    # still be searched, or the particle could never change class again.
    data, _, _ = easy
    reach = MissingDataMLClassifier._reached
    searched = []

    def spy(self, *args):
        out = reach(self, *args)
        searched.append(out.any(axis=2))
        return out

    monkeypatch.setattr(MissingDataMLClassifier, "_reached", spy)
    est = _refined_fit(data)
    assert est.refinement_start_ is not None and len(searched) >= 2
    assert all(s.all() for s in searched)
    # Classes that a relative threshold drops: the other class of some particles
    # holds less than pruning_threshold of their posterior (their best pair more).
    proba = est.predict_proba(data.volumes, masks=data.masks)
    assert np.sum(proba.min(axis=1) < est.pruning_threshold) >= 3


def test_the_iteration_log_says_how_each_iteration_searched(easy, caplog):
    data, _, _ = easy
    with caplog.at_level(logging.INFO, logger="mlsubtomo"):
        est = _refined_fit(data)
    assert est.refinement_start_ is not None and est.refinement_start_ < est.n_iter_
    start = est.refinement_start_
    assert _searches(caplog) == ["global"] * start + ["local"] * (est.n_iter_ - start)


def test_local_refinement_searches_globally_while_the_classes_have_not_parted(easy, caplog):
    # Two copies of one reference stay equal: every particle's posterior is split
    # evenly, its best class is the first, and class 1 holds half the weight but no
    # particle, so nobody changes class and the run converges. Searched locally, the
    # poses in class 1 would stay near the ones it had as nobody's class.
    data, _, _ = easy
    twins = np.repeat(_asymmetric_references()[:1], 2, axis=0)
    with caplog.at_level(logging.INFO, logger="mlsubtomo"):
        est = _refined_fit(data, twins)
    assert est.refinement_start_ is not None and est.refinement_start_ < est.n_iter_
    assert np.all(est.labels_ == 0)
    assert _searches(caplog) == ["global"] * est.n_iter_


@pytest.mark.parametrize(
    "labels, weights, unparted",
    [([0, 0, 0, 0], [0.7, 0.3], True), ([0, 0, 0, 0], [0.9, 0.1], False),
     ([0, 1, 0, 0], [0.7, 0.3], False), ([2, 2, 0, 2], [0.3, 0.3, 0.4], True)],
)
def test_classes_unparted_when_a_class_with_a_particle_s_weight_is_nobody_s_best(
    labels, weights, unparted
):
    # A class of less than one particle's weight holds no particle by rights.
    est = MissingDataMLClassifier(len(weights))
    est.class_weights_ = np.array(weights)
    assert est._classes_unparted(np.array(labels)) is unparted


def _searches(caplog):
    """How each iteration searched, from the log."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iteration ")]
    return [line.split("search ")[1].split(",")[0] for line in lines]


def test_final_assignment_after_local_refinement_is_the_global_best(easy):
    data, _, _ = easy
    refined = _refined_fit(data)
    assert refined.refinement_start_ is not None
    # The global search at the refined model: every particle's best lies near the
    # pairs its last local iteration kept, so the local final search finds it.
    prepared, settings, *_ = refined._prepare_fit(data.volumes, data.masks, None, None)
    grid = refined._orientation_grid()
    full = refined._e_step(prepared, settings, grid, None, False)[1]
    np.testing.assert_array_equal(refined.labels_, full.best_class)
    np.testing.assert_allclose(refined.rotations_, grid[full.best_rotation], atol=1e-12)


# ------------------------------------------------------------- parameter validation


@pytest.mark.parametrize("step", [0, 0.0, -30.0, 180.5, np.nan, np.inf, "90", True])
def test_bad_coarse_step_is_refused_by_name(step):
    X = np.random.default_rng(0).normal(size=(4, 8, 8, 8)).astype(np.float32)
    est = MissingDataMLClassifier(2, coarse_step=step, angular_step=90, max_iter=1, max_shift=1)
    with pytest.raises((ValueError, TypeError), match=r"coarse_step must be a finite number"):
        est.fit(X, masks=WEDGE)


def test_coarse_step_of_180_is_allowed():
    X = np.random.default_rng(0).normal(size=(4, 8, 8, 8)).astype(np.float32)
    est = MissingDataMLClassifier(
        2, coarse_step=180, angular_step=90, max_iter=1, max_shift=1, random_state=0
    ).fit(X, masks=WEDGE)
    assert np.all(np.isfinite(est.references_))


def test_align_false_keeps_the_given_orientations_under_local_refinement(phantoms):
    data = make_dataset(
        phantoms, 12, masks=WEDGE, snr=10.0, random_state=0, labels=np.arange(12) % 2
    )
    init = data.rotations.copy()
    # Particle 0 is given an orientation 25 degrees off its own; particle 2 (same
    # class) is given particle 0's true one, which is within local_refinement of it.
    turn = Rotation.from_euler("x", 25, degrees=True)
    init[0] = (Rotation.from_matrix(data.rotations[0]) * turn).as_matrix()
    init[2] = data.rotations[0]
    est = MissingDataMLClassifier(
        2, align=False, local_refinement=30.0, max_iter=5, random_state=0,
        init_references=np.stack(phantoms),
    ).fit(data.volumes, masks=data.masks, init_rotations=init)
    # Without alignment there is nothing to refine locally.
    assert est.refinement_start_ is None
    np.testing.assert_allclose(est.rotations_, init, atol=1e-6)


@pytest.mark.parametrize("margin", [-1.0, np.nan, "10"])
def test_bad_coarse_margin_is_refused_by_name(margin):
    X = np.random.default_rng(0).normal(size=(4, 8, 8, 8)).astype(np.float32)
    est = MissingDataMLClassifier(2, coarse_step=90, coarse_margin=margin, max_iter=1)
    with pytest.raises((ValueError, TypeError), match="coarse_margin"):
        est.fit(X, masks=WEDGE)
