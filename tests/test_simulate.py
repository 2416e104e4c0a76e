"""Tests of mlsubtomo.simulate: phantoms, SNR, missing data, orientations, truth conventions."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mlsubtomo.fft import hermitian_multiplicity
from mlsubtomo.masks import FullData, MissingWedge
from mlsubtomo.simulate import (
    INTERPOLATION_ORDER,
    SimulatedDataset,
    _noisy_particle,
    demo_dataset,
    groel_groes_phantom,
    groel_phantom,
    make_dataset,
)
from mlsubtomo.transform import euler_from_matrix, rotate_volume, shift_volume

# Phantoms are cheap to build (analytic blobs) but reused across tests.
_CACHE: dict = {}


def _refs(d=24):
    if d not in _CACHE:
        vox = 240.0 / d
        _CACHE[d] = np.stack(
            [groel_phantom(d, vox, 2.5 * vox), groel_groes_phantom(d, vox, 2.5 * vox)]
        )
    return _CACHE[d]


def _small_refs(d=8, k=2, seed=0):
    """Smooth random references for tests where the content does not matter."""
    rng = np.random.default_rng(seed)
    f = np.fft.rfftn(rng.standard_normal((k, d, d, d)), axes=(1, 2, 3))
    return np.fft.irfftn(f * 0.5, s=(d, d, d), axes=(1, 2, 3)).astype(np.float32)


def _clean(data, i, order=INTERPOLATION_ORDER):
    """The noise-free particle i, regenerated from the returned truth."""
    ref = data.references[data.labels[i]].astype(np.float64)
    return shift_volume(rotate_volume(ref, data.rotations[i], order=order), data.shifts[i])


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _ncc(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def _rz(deg):
    return Rotation.from_euler("z", deg, degrees=True).as_matrix()


def _mirror(v, axis):
    """Reflect a volume through the plane of voxel D//2 normal to an array axis."""
    flipped = np.flip(v, axis=axis)
    # index i -> 2 (D//2) - i on the circular grid: an extra roll for even D
    return flipped if v.shape[axis] % 2 else np.roll(flipped, 1, axis=axis)


# ---------------------------------------------------------------------------
# SNR
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("snr", [0.05, 1.0])
def test_snr_of_each_particle_before_masking(snr):
    # The ratio of two sample variances over D^3 iid noise voxels: the noise
    # variance estimate has relative std sqrt(2 / D^3) (the signal variance is
    # the one that set the noise level, so it carries no sampling error).
    d = 32
    ref = groel_phantom(d).astype(np.float64)
    rng = np.random.RandomState(0)
    tol = 5 * np.sqrt(2.0 / d**3)
    assert tol < 0.05
    for R in Rotation.random(10, random_state=1).as_matrix():
        clean, noise, std = _noisy_particle(ref, R, np.array([1, -2, 0]), snr, rng)
        assert std == pytest.approx(np.sqrt(clean.var() / snr), rel=1e-12)
        measured = clean.var() / noise.var()
        assert abs(measured / snr - 1) < tol


def test_snr_measured_on_returned_particles():
    # X_i - P_O(clean_i) = P_O(noise_i); with the orthonormal FFT its sum of squares
    # is sigma_i^2 times a chi-square with n_O degrees of freedom (n_O = observed
    # components on the full grid), so sum / n_O estimates sigma_i^2 with relative
    # std sqrt(2 / n_O), and the mean over N particles of measured / requested SNR
    # has relative std about sqrt(2 / (N n_O)).
    d, n, snr = 32, 8, 0.1
    mask = FullData()
    data = make_dataset(_refs(d), n, masks=mask, snr=snr, max_shift=2, random_state=3)
    obs = mask.observed(d)
    mult = np.broadcast_to(hermitian_multiplicity(d), obs.shape)
    n_obs = mult[obs].sum()
    ratios = []
    for i in range(n):
        clean = _clean(data, i)
        signal_var = clean.var()
        assert data.noise_std[i] ** 2 == pytest.approx(signal_var / snr, rel=1e-5)
        projected = np.fft.irfftn(
            np.fft.rfftn(clean, norm="ortho") * obs, s=(d,) * 3, axes=(0, 1, 2), norm="ortho"
        )
        residual = data.volumes[i].astype(np.float64) - projected
        ratios.append(signal_var / (np.sum(residual**2) / n_obs))
    tol = 5 * np.sqrt(2.0 / (n * n_obs))
    assert tol < 0.05
    assert abs(np.mean(ratios) / snr - 1) < tol


def test_infinite_snr_adds_no_noise():
    data = make_dataset(_small_refs(), 3, snr=np.inf, random_state=0)
    assert np.all(data.noise_std == 0)
    for i in range(3):
        np.testing.assert_allclose(data.volumes[i], _clean(data, i), atol=1e-6)


# ---------------------------------------------------------------------------
# Missing data
# ---------------------------------------------------------------------------


def test_missing_region_is_exactly_zero():
    d = 24
    wedge = MissingWedge(-60, 60)
    data = make_dataset(_refs(d), 4, masks=wedge, snr=0.5, max_shift=2, random_state=0)
    obs = wedge.observed(d)
    assert obs.any() and (~obs).any()
    for x in data.volumes:
        f = np.abs(np.fft.rfftn(x.astype(np.float64), norm="ortho"))
        assert f[~obs].max() < 1e-5 * f.max()
        assert f[obs].min() > 1e-5 * f.max()


def test_list_of_masks_applies_each_to_its_particle():
    d = 16
    masks = [MissingWedge(-60, 60), FullData(), MissingWedge(-45, 45, axis="x")]
    data = make_dataset(_small_refs(d), 3, masks=masks, snr=1.0, random_state=0)
    assert data.masks is masks
    for x, m in zip(data.volumes, masks, strict=True):
        f = np.abs(np.fft.rfftn(x.astype(np.float64), norm="ortho"))
        obs = m.observed(d)
        assert f[~obs].max() < 1e-5 * f.max()
        assert f[obs].min() > 1e-5 * f.max()


def test_no_mask_keeps_the_whole_spectrum():
    # masks=None: no Fourier masking, so the DC component (the mean) survives;
    # any mask object removes it.
    refs = _small_refs() + 1.0
    raw = make_dataset(refs, 2, masks=None, snr=np.inf, random_state=0)
    full = make_dataset(refs, 2, masks=FullData(), snr=np.inf, random_state=0)
    assert raw.masks is None
    assert np.all(raw.volumes.mean(axis=(1, 2, 3)) > 0.5)
    assert np.all(np.abs(full.volumes.mean(axis=(1, 2, 3))) < 1e-5)


# ---------------------------------------------------------------------------
# Orientations, labels, shifts, reproducibility
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("band", [(60.0, 120.0), (40.0, 140.0)])
def test_preferred_orientation_excludes_the_band(band):
    lo, hi = band
    data = make_dataset(_small_refs(), 300, snr=np.inf, preferred_orientation=band, random_state=0)
    tilt = data.euler_angles[:, 1]
    np.testing.assert_allclose(tilt, euler_from_matrix(data.rotations)[:, 1])
    assert not np.any((tilt >= lo) & (tilt <= hi))
    assert np.any(tilt < lo) and np.any(tilt > hi)
    # Without the constraint the same band holds a good share of the orientations.
    free = make_dataset(_small_refs(), 300, snr=np.inf, random_state=0).euler_angles[:, 1]
    assert np.mean((free >= lo) & (free <= hi)) > 0.3


def test_rotations_are_proper_and_shifts_bounded():
    data = make_dataset(_small_refs(16), 50, snr=1.0, max_shift=3, random_state=2)
    R = data.rotations
    assert R.shape == (50, 3, 3) and R.dtype == np.float64
    np.testing.assert_allclose(
        R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(R), 1.0)
    assert data.shifts.shape == (50, 3) and np.issubdtype(data.shifts.dtype, np.integer)
    assert np.abs(data.shifts).max() == 3
    assert data.euler_angles.shape == (50, 3)


def test_labels_balanced_given_and_weighted():
    refs = _small_refs(k=3)
    data = make_dataset(refs, 12, snr=1.0, random_state=0)
    assert np.array_equal(np.bincount(data.labels, minlength=3), [4, 4, 4])
    assert not np.array_equal(data.labels, np.sort(data.labels))  # shuffled
    given = np.array([2, 0, 1, 1, 0])
    assert np.array_equal(make_dataset(refs, 5, labels=given, random_state=0).labels, given)
    weighted = make_dataset(refs, 200, snr=1.0, weights=[0, 1, 3], random_state=0).labels
    counts = np.bincount(weighted, minlength=3)
    assert counts[0] == 0 and counts[2] > 2 * counts[1] > 0


def test_same_seed_same_data_other_seed_other_data():
    kwargs = dict(
        masks=MissingWedge(-60, 60), snr=0.2, max_shift=2, preferred_orientation=(60, 120)
    )
    a = make_dataset(_small_refs(), 6, random_state=7, **kwargs)
    b = make_dataset(_small_refs(), 6, random_state=7, **kwargs)
    c = make_dataset(_small_refs(), 6, random_state=8, **kwargs)
    for field in ("volumes", "labels", "rotations", "shifts", "noise_std"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert not np.array_equal(a.volumes, c.volumes)
    assert not np.allclose(a.rotations, c.rotations)


def test_dtype_and_references_forms():
    refs = _small_refs()
    data = make_dataset(list(refs), 2, snr=1.0, random_state=0, dtype=np.float64)
    assert isinstance(data, SimulatedDataset) and len(data) == 2
    assert data.volumes.dtype == np.float64 and data.references.dtype == np.float64
    np.testing.assert_array_equal(data.references, refs)
    single = make_dataset(refs[0], 2, snr=1.0, random_state=0)
    assert single.references.shape == (1, 8, 8, 8) and single.volumes.dtype == np.float32


# ---------------------------------------------------------------------------
# Truth conventions
# ---------------------------------------------------------------------------


def test_particle_is_shifted_rotated_reference_on_observed_band():
    d = 24
    mask = FullData()
    data = make_dataset(_refs(d), 6, masks=mask, snr=np.inf, max_shift=3, random_state=5)
    assert np.any(data.shifts != 0)
    obs = mask.observed(d)
    for i in range(6):
        x = np.fft.rfftn(data.volumes[i].astype(np.float64), norm="ortho")[obs]
        expected = np.fft.rfftn(_clean(data, i), norm="ortho")[obs]
        scale = np.abs(expected).max()
        assert np.abs(x - expected).max() < 1e-5 * scale
        # The test can tell the convention apart: R^T instead of R, or -t instead
        # of t, do not match.
        ref = data.references[data.labels[i]]
        wrongs = [shift_volume(rotate_volume(ref, data.rotations[i].T, order=3), data.shifts[i])]
        if np.any(data.shifts[i] != 0):
            rotated = rotate_volume(ref, data.rotations[i], order=3)
            wrongs.append(shift_volume(rotated, -data.shifts[i]))
        for wrong in wrongs:
            w = np.fft.rfftn(wrong.astype(np.float64), norm="ortho")[obs]
            assert np.abs(x - w).max() > 0.05 * scale


# ---------------------------------------------------------------------------
# Phantoms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args", [(32, 10.0, 25.0), (16, 15.0, 37.5), (24, 10.0, 25.0), (25, 9.6, 24.0)]
)
def test_phantom_shape_dtype_finite(args):
    for phantom in (groel_phantom, groel_groes_phantom):
        v = phantom(*args)
        assert v.shape == (args[0],) * 3 and v.dtype == np.float32
        assert np.all(np.isfinite(v))
        assert v.max() == pytest.approx(1.0, abs=0.15) and v.min() >= 0
        # centred: the barrel's centre of mass sits on voxel D//2 in x and y
        c = args[0] // 2
        idx = np.arange(args[0])
        assert abs((v.sum(axis=(0, 1)) * idx).sum() / v.sum() - c) < 0.05


def test_groel_dimensions_at_fine_sampling():
    # 146 A tall and 137 A wide, measured at 15% of the maximum density.
    vox = 2.5
    v = groel_phantom(96, voxel_size=vox, resolution=7.0)
    m = v > 0.15 * v.max()
    zs = np.nonzero(m.any(axis=(1, 2)))[0]
    ys = np.nonzero(m.any(axis=(0, 2)))[0]
    assert abs((np.ptp(zs) + 1) * vox - 146) < 10
    assert abs((np.ptp(ys) + 1) * vox - 137) < 10
    # an open channel along the axis
    c = 48
    assert v[:, c, c].max() < 0.05 * v.max()


def test_groel_is_c7_and_d7():
    v = groel_phantom()
    assert _rel(rotate_volume(v, _rz(360 / 7), order=3), v) < 0.03
    # a rotation that is not a symmetry changes it a lot (the test can fail)
    assert _rel(rotate_volume(v, _rz(360 / 14), order=3), v) > 0.2
    # the two rings are related by the two-fold about x (exact on the grid)
    two_fold = np.diag([1.0, -1.0, -1.0])
    assert _rel(rotate_volume(v, two_fold), v) < 1e-6
    assert _rel(rotate_volume(groel_groes_phantom(), two_fold), groel_groes_phantom()) > 0.2


def test_groel_ring_is_chiral():
    # No mirror image matches any rotation about z: the ring has no mirror plane.
    v = groel_phantom()
    for axis in (0, 1):
        m = _mirror(v, axis)
        best = min(_rel(rotate_volume(m, _rz(a), order=3), v) for a in np.arange(0, 360 / 7, 1.0))
        assert best > 0.1


def test_groel_groes_differs_and_caps_plus_z():
    a = groel_phantom()
    b = groel_groes_phantom()
    assert _ncc(a, b) < 0.95
    c = a.shape[0] // 2
    assert b[c + 1 :].sum() > 1.1 * b[:c].sum()
    assert a[c + 1 :].sum() == pytest.approx(a[:c].sum(), rel=1e-4)
    # identical barrels: the cap is all the difference, and it lies above the barrel
    diff = b - a
    assert diff.min() >= -1e-6
    assert diff[: c + 6].sum() < 0.05 * diff.sum()


def test_phantom_scales_with_voxel_size():
    # The same particle at half the voxel size spans twice as many voxels.
    coarse = groel_phantom(24, voxel_size=10.0, resolution=25.0)
    fine = groel_phantom(48, voxel_size=5.0, resolution=25.0)
    # Both sample one continuous map at shared points; each is scaled by its own
    # sampled maximum, so they agree up to one factor.
    sub = fine[::2, ::2, ::2].astype(np.float64)
    factor = (sub * coarse).sum() / (sub * sub).sum()
    assert _rel(factor * sub, coarse) < 1e-5


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(box_size=16, voxel_size=10.0), "box_size"),
        (dict(box_size=0), "box_size"),
        (dict(box_size=32.5), "box_size"),
        (dict(voxel_size=-1.0), "voxel_size"),
        (dict(resolution=0.0), "resolution"),
        (dict(resolution=15.0), "resolution"),
    ],
)
def test_phantom_bad_arguments(kwargs, name):
    for phantom in (groel_phantom, groel_groes_phantom):
        with pytest.raises(ValueError, match=name):
            phantom(**kwargs)


# ---------------------------------------------------------------------------
# Validation and demo
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(references=np.zeros((2, 8, 8, 9))), "references"),
        (dict(references=np.zeros((8, 8))), "references"),
        (dict(references=[np.zeros((8, 8, 8)), np.zeros((6, 6, 6))]), "references"),
        (dict(n_particles=0), "n_particles"),
        (dict(n_particles=2.5), "n_particles"),
        (dict(snr=0.0), "snr"),
        (dict(snr=-1.0), "snr"),
        (dict(snr=np.nan), "snr"),
        (dict(max_shift=-1), "max_shift"),
        (dict(max_shift=4), "max_shift"),
        (dict(preferred_orientation=(120, 60)), "preferred_orientation"),
        (dict(preferred_orientation=(-10, 50)), "preferred_orientation"),
        (dict(preferred_orientation=(0, 180)), "preferred_orientation"),
        (dict(preferred_orientation="tilt"), "preferred_orientation"),
        (dict(labels=[0, 1, 2, 0]), "labels"),
        (dict(labels=[0, 1, -1, 0]), "labels"),
        (dict(labels=[0, 1]), "labels"),
        (dict(weights=[1.0]), "weights"),
        (dict(weights=[1.0, -1.0]), "weights"),
        (dict(masks=[FullData()] * 3), "masks"),
        (dict(masks="wedge"), "masks"),
        (dict(masks=np.ones((8, 8, 5))), "masks"),
        (dict(dtype=np.int32), "dtype"),
        (dict(voxel_size=0.0), "voxel_size"),
    ],
)
def test_make_dataset_bad_arguments(kwargs, name):
    args = dict(references=_small_refs(), n_particles=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        make_dataset(**args)


def test_demo_dataset():
    data = demo_dataset(n_particles=8, box_size=16, random_state=0)
    assert data.volumes.shape == (8, 16, 16, 16)
    assert np.array_equal(np.bincount(data.labels), [4, 4])
    assert isinstance(data.masks, MissingWedge)
    assert np.abs(data.shifts).max() <= 2
    assert data.snr == pytest.approx(0.1)
    assert data.max_shift == 2 and data.voxel_size == pytest.approx(15.0)
    again = demo_dataset(n_particles=8, box_size=16, random_state=0)
    assert np.array_equal(data.volumes, again.volumes)
