"""Tests of mlsubtomo.metrics: class purity, orientation errors and Fourier shell correlation.

Bound used for the FSC of independent noise. Per shell s, with n_s components on
the full Fourier grid, the components come in Hermitian pairs, so the shell holds
n_s / 2 independent complex values, i.e. n_s independent real numbers (real and
imaginary parts) per map, each of the same variance for white noise. Over the
full grid, sum Re(F1 conj F2) counts each pair twice, and so do the two power
sums: the FSC is the (uncentred) correlation coefficient of n_s pairs of
independent zero-mean Gaussians, with mean 0 and standard deviation 1/sqrt(n_s).
(The few self-conjugate components, real-valued, change this negligibly.) The
tests check that standard deviation empirically and use 5/sqrt(n_s) as the bound
for a single draw.
"""

import warnings

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mlsubtomo.metrics import (
    class_purity,
    classified_orientation_errors,
    fsc,
    fsc_resolution,
    orientation_errors,
)
from mlsubtomo.sampling import nearest_grid_index, so3_grid, symmetry_group
from mlsubtomo.simulate import lowpass

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _noise(d, seed, n=None):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((d, d, d) if n is None else (n, d, d, d))


def _shell_index_full(d):
    q = np.fft.fftfreq(d, 1.0 / d)
    radius = np.sqrt(q[:, None, None] ** 2 + q[None, :, None] ** 2 + q[None, None, :] ** 2)
    return np.rint(radius).astype(int)


def _shell_counts(d):
    """Number of full-grid components in each shell 0..D//2."""
    return np.bincount(_shell_index_full(d).ravel())[: d // 2 + 1]


def _fsc_full_grid(a, b):
    """Reference: the FSC on the full complex grid, shell by shell, with plain loops."""
    d = a.shape[0]
    fa, fb = np.fft.fftn(a), np.fft.fftn(b)
    shells = _shell_index_full(d)
    out = []
    for s in range(d // 2 + 1):
        sel = shells == s
        num = np.sum((fa[sel] * np.conj(fb[sel])).real)
        den = np.sqrt(np.sum(np.abs(fa[sel]) ** 2) * np.sum(np.abs(fb[sel]) ** 2))
        out.append(num / den if den > 0 else 0.0)
    return np.array(out)


def _band_limit(volume, cutoff):
    """Zero every Fourier component with round(|q|) > cutoff."""
    d = volume.shape[0]
    f = np.fft.fftn(volume)
    f[_shell_index_full(d) > cutoff] = 0.0
    return np.fft.ifftn(f).real


def _random_rotations(n, seed):
    return Rotation.random(n, random_state=seed).as_matrix()


# ---------------------------------------------------------------------------
# fsc
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("d", [8, 9, 16, 17])
def test_fsc_equals_full_grid_computation(d):
    a = _noise(d, 0)
    b = 0.6 * a + _noise(d, 1)
    freq, curve = fsc(a, b, voxel_size=2.5)
    assert freq.shape == curve.shape == (d // 2 + 1,)
    assert np.allclose(freq, np.arange(d // 2 + 1) / (d * 2.5))
    assert np.allclose(curve, _fsc_full_grid(a, b), atol=1e-12)


def test_fsc_of_a_map_with_itself_is_one_and_empty_shells_are_zero():
    d, cutoff = 16, 5
    v = _band_limit(_noise(d, 2), cutoff)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, curve = fsc(v, v)
        _, zero = fsc(np.zeros((d, d, d)), v)
    assert np.allclose(curve[1 : cutoff + 1], 1.0)
    assert np.all(curve[cutoff + 1 :] == 0.0)  # no power: 0, not NaN
    assert np.all(zero == 0.0)
    assert np.all(np.isfinite(curve))
    # Rounding to single precision leaves power at the float32 rounding level in
    # the empty shells: still empty. A weak but real shell is kept.
    v32 = v.astype(np.float32)
    _, curve32 = fsc(v32, v32 + np.float32(0.5) * v32)
    assert np.allclose(curve32[1 : cutoff + 1], 1.0) and np.all(curve32[cutoff + 1 :] == 0)
    weak = v + 1e-6 * _band_limit(_noise(d, 3), cutoff + 1)
    assert fsc(weak, weak)[1][cutoff + 1] == pytest.approx(1.0)


def test_fsc_is_invariant_to_scaling_either_map():
    a, b = _noise(12, 3), _noise(12, 4) + _noise(12, 3)
    _, ref = fsc(a, b)
    for scale in (1e-3, 3.7, 250.0):
        assert np.allclose(fsc(scale * a, b)[1], ref)
        assert np.allclose(fsc(a, scale * b)[1], ref)
    assert np.allclose(fsc(a, -b)[1], -ref)


def test_fsc_of_independent_noise_is_within_five_sigma():
    d = 32
    n_s = _shell_counts(d)
    _, curve = fsc(_noise(d, 5), _noise(d, 6))
    assert np.all(np.abs(curve[1:]) < 5.0 / np.sqrt(n_s[1:]))
    # The bound is not vacuous: the largest shells are within a few hundredths.
    assert np.abs(curve[-4:]).max() < 0.05


def test_fsc_of_independent_noise_has_std_one_over_sqrt_n():
    d, trials = 12, 400
    a, b = _noise(d, 7, trials), _noise(d, 8, trials)
    curves = np.array([fsc(a[i], b[i])[1] for i in range(trials)])
    n_s = _shell_counts(d)
    shells = n_s >= 50
    normalised_std = curves.std(axis=0)[shells] * np.sqrt(n_s[shells])
    assert np.all(np.abs(normalised_std - 1.0) < 0.15), normalised_std
    assert np.all(np.abs(curves.mean(axis=0)[shells]) < 4.0 / np.sqrt(trials * n_s[shells]))


@pytest.mark.parametrize("snr", [0.25, 1.0, 4.0])
def test_fsc_with_noise_at_known_snr(snr):
    """White signal S (variance 1) and white noise of variance 1/snr in every shell.

    FSC(S, S + N) -> sqrt(snr / (1 + snr)); FSC(S + N1, S + N2) -> snr / (1 + snr).
    """
    d = 32
    n_s = _shell_counts(d)
    signal = _noise(d, 9)
    noise1, noise2 = _noise(d, 10) / np.sqrt(snr), _noise(d, 11) / np.sqrt(snr)
    shells = np.arange(d // 2 + 1) >= 3
    bound = 5.0 / np.sqrt(n_s[shells])
    _, one = fsc(signal, signal + noise1)
    assert np.all(np.abs(one[shells] - np.sqrt(snr / (1 + snr))) < bound)
    _, half = fsc(signal + noise1, signal + noise2)
    assert np.all(np.abs(half[shells] - snr / (1 + snr)) < bound)


def test_fsc_resolution_of_a_band_limited_map_is_at_the_cutoff():
    """FSC 1 up to shell c and 0 beyond: the crossing is at c + (1 - threshold)."""
    d, voxel, cutoff = 32, 3.0, 6
    v = _noise(d, 12)
    freq, curve = fsc(v, _band_limit(v, cutoff), voxel_size=voxel)
    assert np.allclose(curve[1 : cutoff + 1], 1.0) and np.all(curve[cutoff + 1 :] == 0)
    for threshold in (0.5, 0.143):
        expected = d * voxel / (cutoff + 1.0 - threshold)
        assert fsc_resolution(freq, curve, threshold) == pytest.approx(expected)


def test_fsc_resolution_of_gaussian_low_pass_half_maps_is_the_filter_resolution():
    """Half maps lowpass(S) + N_i with noise std 1/2: FSC = 0.5 where the transfer is 1/2.

    Per shell the SNR is h(f)^2 / sigma^2 with h(1/res) = 1/2 = sigma, so the 0.5
    crossing is at f = 1/res; at 0.143 the SNR is 1/6, i.e. h = sigma/sqrt(6).
    """
    d, voxel, res, sigma = 64, 1.0, 8.0, 0.5
    signal = lowpass(_noise(d, 13), voxel, res)
    half1 = signal + sigma * _noise(d, 14)
    half2 = signal + sigma * _noise(d, 15)
    freq, curve = fsc(half1, half2, voxel)
    assert fsc_resolution(freq, curve, 0.5) == pytest.approx(res, rel=0.1)
    # h(f) = 2^-(f res)^2 = sigma / sqrt(6) at f = sqrt(log2(2 sqrt(6))) / res.
    expected = res / np.sqrt(np.log2(2.0 * np.sqrt(6.0)))
    assert fsc_resolution(freq, curve, 0.143) == pytest.approx(expected, rel=0.1)


def test_fsc_resolution_edge_cases():
    freq = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])  # 1/(2 * voxel) with voxel = 1 A
    assert fsc_resolution(freq, [1, 1, 0.9, 0.8, 0.7, 0.6]) == pytest.approx(2.0)
    assert fsc_resolution(freq, [1, 0.3, 0.9, 0.8, 0.7, 0.6]) == np.inf
    # The DC shell is ignored even when it is below the threshold.
    assert fsc_resolution(freq, [-1, 1, 1, 1, 1, 1]) == pytest.approx(2.0)
    # Linear interpolation between shells 0.2 (0.7) and 0.3 (0.1): f = 0.2 + 0.1/3.
    assert fsc_resolution(freq, [1, 0.9, 0.7, 0.1, 0.0, 0.0]) == pytest.approx(1 / (0.7 / 3))
    # The first drop counts, not a later recovery.
    curve = [1, 0.9, 0.4, 0.8, 0.1, 0.0]
    assert fsc_resolution(freq, curve, 0.5) == pytest.approx(1 / 0.18)
    assert fsc_resolution(freq, curve, 0.143) == pytest.approx(1 / (0.3 + 0.1 * 0.657 / 0.7))
    # An odd box: the last shell (D - 1)/2 lies below Nyquist.
    f9, c9 = fsc(_noise(9, 16), _noise(9, 16), voxel_size=2.0)
    assert fsc_resolution(f9, c9) == pytest.approx(9 * 2.0 / 4)


def test_fsc_errors():
    with pytest.raises(ValueError, match="differ"):
        fsc(np.zeros((8, 8, 8)), np.zeros((9, 9, 9)))
    with pytest.raises(ValueError, match="cubic"):
        fsc(np.zeros((8, 8, 9)), np.zeros((8, 8, 9)))
    with pytest.raises(ValueError, match="voxel_size"):
        fsc(np.zeros((8, 8, 8)), np.zeros((8, 8, 8)), voxel_size=0)
    with pytest.raises(ValueError, match="differ"):
        fsc_resolution([0.0, 0.1], [1.0])
    with pytest.raises(ValueError, match="increasing"):
        fsc_resolution([0.0, 0.2, 0.1], [1.0, 0.9, 0.1])
    with pytest.raises(ValueError, match="DC"):
        fsc_resolution([0.0], [1.0])


# ---------------------------------------------------------------------------
# class_purity
# ---------------------------------------------------------------------------


def test_class_purity_ignores_class_numbering():
    assert class_purity([0, 0, 1, 1], [1, 1, 0, 0]) == 1.0
    true = np.repeat([0, 1, 2], 20)
    permuted = np.array([2, 0, 1])[true]
    assert class_purity(true, permuted) == 1.0
    assert class_purity(true, permuted + 7) == 1.0  # any labels, not only 0..K-1
    assert class_purity(list("aabbcc"), [5, 5, 3, 3, 9, 9]) == 1.0


def test_class_purity_counts_mistakes():
    rng = np.random.default_rng(0)
    true = np.repeat([0, 1, 2], 100)
    pred = np.array([1, 2, 0])[true]
    wrong = rng.choice(true.size, size=30, replace=False)
    pred[wrong] = (pred[wrong] + rng.integers(1, 3, size=30)) % 3  # another class
    assert class_purity(true, pred) == pytest.approx(0.9)
    # Everything in one class: the largest true class is matched.
    assert class_purity(true, np.zeros_like(true)) == pytest.approx(1 / 3)
    # A true class split in two: only one half can be matched to it.
    split = true.copy()
    split[:50] = 3
    assert class_purity(true, split) == pytest.approx(250 / 300)


def test_class_purity_errors():
    with pytest.raises(ValueError, match="length"):
        class_purity([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        class_purity([], [])


# ---------------------------------------------------------------------------
# orientation_errors
# ---------------------------------------------------------------------------


def test_orientation_errors_zero_up_to_a_global_rotation():
    true = _random_rotations(60, 1)
    assert orientation_errors(true, true).max() < 1e-6
    offset = Rotation.random(random_state=2).as_matrix()
    errors = orientation_errors(true, true @ offset)
    assert errors.shape == (60,)
    assert errors.max() < 1e-6


def test_orientation_errors_measure_known_perturbations():
    n = 200
    true = _random_rotations(n, 3)
    offset = Rotation.random(random_state=4).as_matrix()
    rng = np.random.default_rng(5)
    angles = rng.uniform(1.0, 10.0, n)
    axes = rng.standard_normal((n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    perturb = Rotation.from_rotvec(axes * np.radians(angles)[:, None]).as_matrix()
    errors = orientation_errors(true, true @ perturb @ offset)
    # The offset is estimated as a mean over particles; random axes average out.
    assert np.abs(errors - angles).max() < 1.0
    assert np.median(np.abs(errors - angles)) < 0.3


def test_orientation_errors_of_random_predictions_are_large():
    true = _random_rotations(300, 6)
    pred = _random_rotations(300, 7)
    errors = orientation_errors(true, pred)
    assert np.median(errors) > 60.0
    assert errors.max() <= 180.0 + 1e-9


@pytest.mark.parametrize("symmetry", ["C7", "D7"])
def test_orientation_errors_with_symmetry(symmetry):
    """R_pred = R_true g_i G with g_i random in the point group: ~0 error with it."""
    n = 100
    group = symmetry_group(symmetry).as_matrix()
    true = _random_rotations(n, 8)
    offset = Rotation.random(random_state=9).as_matrix()
    g = group[np.random.default_rng(10).integers(len(group), size=n)]
    pred = true @ g @ offset
    assert orientation_errors(true, pred, symmetry_matrices=group).max() < 1e-5
    assert np.median(orientation_errors(true, pred)) > 10.0  # without the group: not
    # An offset that is itself a group element is also absorbed.
    assert orientation_errors(true, true @ g @ group[-1], group).max() < 1e-5


def test_orientation_errors_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        orientation_errors(np.zeros((3, 3, 3)), np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="shape"):
        orientation_errors(np.zeros((3, 3)), np.zeros((3, 3)))


# ---------------------------------------------------------------------------
# classified_orientation_errors
# ---------------------------------------------------------------------------


def _two_class_case(n=120, seed=11):
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n // 2)
    true = _random_rotations(n, seed)
    groups = [symmetry_group("D7").as_matrix(), symmetry_group("C7").as_matrix()]
    offsets = Rotation.random(2, random_state=seed + 1).as_matrix()
    pred = np.empty_like(true)
    for i, k in enumerate(labels):
        g = groups[k][rng.integers(len(groups[k]))]
        pred[i] = true[i] @ g @ offsets[k]  # one global rotation per found class
    return labels, true, pred, groups


def test_classified_orientation_errors_per_class_offsets_and_symmetries():
    labels, true, pred, groups = _two_class_case()
    swapped = 1 - labels  # found class numbers are arbitrary
    errors = classified_orientation_errors(labels, swapped, true, pred, groups)
    assert errors.shape == (len(labels),)
    assert errors.max() < 1e-5
    # Without the point groups the symmetry mates count as errors.
    assert np.median(classified_orientation_errors(labels, swapped, true, pred)) > 10.0


def test_classified_orientation_errors_leave_out_misclassified_particles():
    labels, true, pred, groups = _two_class_case()
    found = labels.copy()
    found[:7] = 1  # seven particles of true class 0 land in the class of true class 1
    errors = classified_orientation_errors(labels, found, true, pred, groups)
    assert errors.shape == (len(labels) - 7,)
    assert errors.max() < 1e-5
    # A found class with fewer than two particles of its true class is skipped.
    found = labels.copy()
    found[0] = 2
    errors = classified_orientation_errors(labels, found, true, pred, groups)
    assert errors.shape == (len(labels) - 1,)
    assert classified_orientation_errors([0, 1], [0, 1], true[:2], pred[:2]).shape == (0,)


# ---------------------------------------------------------------------------
# the grid's error floor
# ---------------------------------------------------------------------------


def _grid_assignment(true, offset, group, grid):
    """The grid rotation nearest to any symmetry mate of each ``R_true g G``."""
    mates = np.einsum("nij,hjk,kl->nhil", true, group, offset).reshape(-1, 3, 3)
    mates = Rotation.from_matrix(mates)
    index = nearest_grid_index(grid, mates)
    angles = (grid[index].inv() * mates).magnitude().reshape(len(true), len(group))
    best = index.reshape(len(true), len(group))[np.arange(len(true)), angles.argmin(axis=1)]
    return grid[best].as_matrix()


def test_grid_floor_is_zero_on_a_grid_holding_the_answers():
    true = _random_rotations(40, 21)
    offset = Rotation.random(random_state=22).as_matrix()
    grid = Rotation.from_matrix(np.concatenate([true @ offset, _random_rotations(40, 23)]))
    errors, floor = orientation_errors(true, true @ offset, grid=grid)
    assert errors.max() < 1e-5 and floor.max() < 1e-5


@pytest.mark.parametrize("symmetry", ["C1", "D7"])
def test_grid_floor_never_exceeds_the_error_of_a_grid_prediction(symmetry):
    """Any prediction taken from the grid is one of the candidates the floor minimises over."""
    group = symmetry_group(symmetry).as_matrix()
    grid = so3_grid(30.0)
    true = _random_rotations(80, 24)
    pred = grid[np.random.default_rng(25).integers(len(grid), size=80)].as_matrix()
    errors, floor = orientation_errors(true, pred, group, grid)
    assert np.all(floor <= errors + 1e-9)
    assert np.median(errors) > 30.0 > np.median(floor)


def test_grid_floor_depends_on_the_recovered_frame():
    """The C1 grid of 15 degrees is closed under D7 about z, so a D7 structure whose
    frame lines up with it gets one distinct choice where a tilted frame gets 14."""
    group = symmetry_group("D7").as_matrix()
    grid = so3_grid(15.0)
    true = _random_rotations(150, 26)
    floors = {}
    for name, offset in {"aligned": np.eye(3),
                         "tilted": Rotation.random(random_state=27).as_matrix()}.items():
        pred = _grid_assignment(true, offset, group, grid)
        errors, floor = orientation_errors(true, pred, group, grid)
        assert np.all(floor <= errors + 1e-9)
        floors[name] = np.median(floor)
    assert floors["aligned"] > 1.5 * floors["tilted"]


def test_classified_errors_return_the_floor_of_the_same_particles():
    group = symmetry_group("C7").as_matrix()
    grid = so3_grid(30.0)
    true = _random_rotations(60, 28)
    labels = np.repeat([0, 1], 30)
    pred = _grid_assignment(true, np.eye(3), group, grid)
    errors, floor = classified_orientation_errors(labels, labels, true, pred, [group, group], grid)
    assert errors.shape == floor.shape == (60,)
    alone = classified_orientation_errors(labels, labels, true, pred, [group, group])
    np.testing.assert_allclose(errors, alone)
    assert np.all(floor <= errors + 1e-9)
