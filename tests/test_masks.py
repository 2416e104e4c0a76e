"""Fourier-space missing-data geometry: fractions, Hermitian symmetry, rotation, pinning."""

import pickle

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mlsubtomo.fft import hermitian_multiplicity
from mlsubtomo.masks import (
    ArrayMask,
    FullData,
    MissingCone,
    MissingPyramid,
    MissingWedge,
    observed_fraction,
)

GEOMETRIES = [
    FullData(),
    MissingWedge(-60, 60),
    MissingWedge(-50, 65),
    MissingWedge(0, 60),
    MissingWedge(-90, 90),
    MissingWedge(-45, 70, axis="x"),
    MissingPyramid(),
    MissingPyramid(-60, 60, -55, 50),
    MissingCone(45),
    MissingCone(30),
]


# ------------------------------------------------------------ independent helpers


def _full_coordinates(d):
    """(qx, qy, qz) on the full grid [kz, ky, kx], fftfreq * D along every axis."""
    f = np.fft.fftfreq(d, 1.0 / d)
    qz, qy, qx = np.meshgrid(f, f, f, indexing="ij")
    return qx, qy, qz


def _half_coordinates(d):
    qx, qy, qz = _full_coordinates(d)
    h = d // 2 + 1
    qx = np.abs(qx[..., :h])  # the half grid stores qx = +D/2 for even D
    return qx, qy[..., :h], qz[..., :h]


def _mirror_to_full(half, d):
    """Full grid from a half grid, filling kx > D/2 from w(q) = w(-q)."""
    neg = (-np.arange(d)) % d
    full = np.zeros((d, d, d), dtype=half.dtype)
    h = d // 2 + 1
    full[..., :h] = half
    for kx in range(h, d):
        full[..., kx] = half[neg][:, neg][..., (-kx) % d]
    return full


def _xmipp_wedge(u, z, a, b):
    """xmipp's getMissingRegion test, written literally with cotangents (a < 0 < b)."""
    tg0 = -1.0 / np.tan(np.radians(b))
    tgf = -1.0 / np.tan(np.radians(a))
    upper = (z >= 0) & ((u <= tg0 * z) | (u >= tgf * z))
    lower = (z < 0) & ((u <= tgf * z) | (u >= tg0 * z))
    return upper | lower


def _xmipp_wedge_margin(u, z, a, b):
    """Distance-like margin to the two boundary planes of the literal criterion."""
    tg0 = -1.0 / np.tan(np.radians(b))
    tgf = -1.0 / np.tan(np.radians(a))
    return np.minimum(np.abs(u - tg0 * z), np.abs(u - tgf * z))


def _full_fraction(half, d):
    """Observed fraction over 0 < |q| < D/2 on the full grid, counted here by hand."""
    qx, qy, qz = _half_coordinates(d)
    r = np.sqrt(qx**2 + qy**2 + qz**2)
    ball = (r > 0) & (r < 0.5 * d)
    m = hermitian_multiplicity(d)
    return np.sum((half & ball) * m) / np.sum(ball * m)


# --------------------------------------------------------------------- fractions


@pytest.mark.parametrize(
    "mask, expected",
    [
        (MissingWedge(-60, 60), 2 / 3),
        (MissingWedge(-60, 60, axis="x"), 2 / 3),
        (MissingCone(45), np.cos(np.radians(45))),
        (FullData(), 1.0),
    ],
    ids=repr,
)
def test_observed_fraction_in_the_resolution_ball(mask, expected):
    d = 64
    half = mask.observed(d)
    fraction = _full_fraction(half, d)
    assert fraction == pytest.approx(expected, abs=0.01)
    assert observed_fraction(half, d) == pytest.approx(fraction, abs=1e-12)


def test_pyramid_fraction_matches_monte_carlo():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(400_000, 3))
    p *= (rng.random(len(p)) ** (1 / 3) / np.linalg.norm(p, axis=1))[:, None]
    x, y, z = p.T
    expected = np.mean(_xmipp_wedge(x, z, -60, 60) | _xmipp_wedge(y, z, -60, 60))
    measured = _full_fraction(MissingPyramid().observed(64), 64)
    assert measured == pytest.approx(expected, abs=0.01)  # MC standard error < 1e-3
    assert measured > 2 / 3 + 0.1  # strictly more than one wedge


def test_observed_fraction_accepts_stacks_and_checks_shape():
    stack = MissingWedge().observed(16, rotation=Rotation.random(3, random_state=0))
    fractions = observed_fraction(stack, 16)
    assert fractions.shape == (3,)
    np.testing.assert_allclose(fractions, [observed_fraction(s, 16) for s in stack])
    with pytest.raises(ValueError, match="mask_array"):
        observed_fraction(stack, 18)


# ---------------------------------------------------------- band, DC, edge ranges


@pytest.mark.parametrize("d", [9, 16])
def test_resolution_band_and_dc(d):
    qx, qy, qz = _half_coordinates(d)
    r = np.sqrt(qx**2 + qy**2 + qz**2)
    np.testing.assert_array_equal(FullData().observed(d), (r > 0) & (r < 0.5 * d))
    np.testing.assert_array_equal(
        FullData().observed(d, max_resolution=0.25), (r > 0) & (r < 0.25 * d)
    )
    np.testing.assert_array_equal(FullData().observed(d, max_resolution=None), r > 0)
    for mask in GEOMETRIES:
        w = mask.observed(d, max_resolution=None)
        assert not w[0, 0, 0]
        assert not np.any(mask.observed(d) & (r >= 0.5 * d))


def test_wedge_edge_ranges():
    d = 32
    full = FullData().observed(d)
    # No infinities or NaN at +-90 and 0.
    np.testing.assert_array_equal(MissingWedge(-90, 90).observed(d), full)
    np.testing.assert_array_equal(MissingWedge(-90, 90, axis="x").observed(d), full)
    np.testing.assert_array_equal(MissingCone(90).observed(d), full)
    # (0, 60) is one side only: the mirror image (z -> -z) of (-60, 0).
    plus = MissingWedge(0, 60).observed(d)
    minus = MissingWedge(-60, 0).observed(d)
    neg = (-np.arange(d)) % d
    np.testing.assert_array_equal(plus, minus[neg])
    assert not np.array_equal(plus, minus)
    assert observed_fraction(plus, d) == pytest.approx(1 / 3, abs=0.03)  # + the z = 0 plane
    # (-90, 0): the quadrants x z >= 0.
    qx, qy, qz = _half_coordinates(d)
    np.testing.assert_array_equal(MissingWedge(-90, 0).observed(d), full & (qx * qz >= 0))
    # A range that excludes 0 is the union of its sections (xmipp's formula degenerates).
    assert observed_fraction(MissingWedge(10, 70).observed(d), d) == pytest.approx(1 / 3, abs=0.03)


def test_wedge_matches_xmipp_literal_formula_on_the_grid():
    d = 32
    qx, qy, qz = _half_coordinates(d)
    band = FullData().observed(d)
    for a, b in [(-60, 60), (-50, 65), (-30, 80), (-89, 1)]:
        expected = _xmipp_wedge(qx, qz, a, b) & band
        np.testing.assert_array_equal(MissingWedge(a, b).observed(d), expected)
        expected = _xmipp_wedge(qy, qz, a, b) & band
        np.testing.assert_array_equal(MissingWedge(a, b, axis="x").observed(d), expected)
    # Cone with cot(45) = 1: ties x^2 + y^2 = z^2 (e.g. (3, 4, 5)) are observed.
    expected = (qx**2 + qy**2 >= qz**2) & band
    np.testing.assert_array_equal(MissingCone(45).observed(d), expected)


# ------------------------------------------------------------- Hermitian symmetry


@pytest.mark.parametrize("d", [9, 10, 16])
@pytest.mark.parametrize("max_resolution", [0.5, None])
@pytest.mark.parametrize("mask", GEOMETRIES, ids=repr)
def test_hermitian_consistent(mask, d, max_resolution):
    rotations = Rotation.random(4, random_state=1)
    stack = [mask.observed(d, max_resolution=max_resolution)]
    stack += list(mask.observed(d, rotation=rotations, max_resolution=max_resolution))
    # A rotation by 45 degrees puts many points exactly on the +-45 boundaries.
    stack.append(mask.observed(d, rotation=Rotation.from_euler("y", 45, degrees=True)))
    array_mask = ArrayMask(stack[0])
    stack += list(array_mask.observed(d, rotation=rotations, max_resolution=max_resolution))
    neg = (-np.arange(d)) % d
    for half in stack:
        full = _mirror_to_full(half, d)
        np.testing.assert_array_equal(full, full[neg][:, neg][:, :, neg])
        assert not half[0, 0, 0]


def test_array_mask_symmetrises_an_inconsistent_array():
    d = 8
    a = FullData().observed(d)
    a[1, 2, 0] = False  # its partner [-1, -2, 0] stays True
    stored = ArrayMask(a).array
    assert not stored[1, 2, 0] and not stored[d - 1, d - 2, 0]
    assert np.sum(stored != a) == 1


# --------------------------------------------------------------- rotated geometry


def test_rotated_masks_are_the_geometry_at_rotated_frequencies():
    d = 24
    qx, qy, qz = _full_coordinates(d)
    q = np.stack([qx.ravel(), qy.ravel(), qz.ravel()])
    r = np.linalg.norm(q, axis=0)
    band = (r > 0) & (r < 0.5 * d)
    h = d // 2 + 1
    cases = [
        (MissingWedge(-60, 60), lambda x, y, z: _xmipp_wedge(x, z, -60, 60)),
        (MissingWedge(-50, 65), lambda x, y, z: _xmipp_wedge(x, z, -50, 65)),
        (MissingWedge(-40, 75, axis="x"), lambda x, y, z: _xmipp_wedge(y, z, -40, 75)),
        (
            MissingPyramid(-60, 60, -55, 50),
            lambda x, y, z: _xmipp_wedge(x, z, -60, 60) | _xmipp_wedge(y, z, -55, 50),
        ),
        (MissingCone(30), lambda x, y, z: x**2 + y**2 >= (z / np.tan(np.radians(30))) ** 2),
    ]
    margins = {
        0: lambda x, y, z: _xmipp_wedge_margin(x, z, -60, 60),
        1: lambda x, y, z: _xmipp_wedge_margin(x, z, -50, 65),
        2: lambda x, y, z: _xmipp_wedge_margin(y, z, -40, 75),
        3: lambda x, y, z: np.minimum(
            _xmipp_wedge_margin(x, z, -60, 60), _xmipp_wedge_margin(y, z, -55, 50)
        ),
        4: lambda x, y, z: np.abs(x**2 + y**2 - (z / np.tan(np.radians(30))) ** 2),
    }
    rotations = Rotation.random(6, random_state=2)
    for i, (mask, criterion) in enumerate(cases):
        got = mask.observed(d, rotation=rotations)
        for n, matrix in enumerate(rotations.as_matrix()):
            x, y, z = matrix.T @ q  # p = R^T q
            expected = (criterion(x, y, z) & band).reshape(d, d, d)[..., :h]
            # Points within round-off of a boundary may go either way: exclude them.
            clear = (margins[i](x, y, z) > 1e-9).reshape(d, d, d)[..., :h]
            assert np.mean(clear) > 0.99
            assert np.count_nonzero((got[n] != expected) & clear) == 0


def test_rotation_convention_particle_rotated_by_r():
    # Rotating the particle by Rz(90) carries its x axis onto y: a y-axis wedge
    # becomes the x-axis wedge of the same range (R^T instead of R would flip it).
    d = 16
    rz = Rotation.from_euler("z", 90, degrees=True)
    rotated = MissingWedge(-50, 65).observed(d, rotation=rz)
    np.testing.assert_array_equal(rotated, MissingWedge(-50, 65, axis="x").observed(d))
    assert not np.array_equal(rotated, MissingWedge(-65, 50, axis="x").observed(d))


def test_asymmetric_wedge_is_pinned_to_the_beam_convention():
    """Tilt t images the central section perpendicular to b(t) = (sin t, 0, cos t).

    With R = Ry(-t), R^T = Ry(t) maps (qx, qy, 0) to qx (cos t, 0, -sin t) + qy e_y,
    so the qz = 0 plane of the rotated mask is that section, and the qz axis is b(t).
    """
    d = 32
    mask = MissingWedge(-50, 65)
    band = FullData().observed(d)
    qx, qy, qz = _half_coordinates(d)
    in_plane = band & (qz == 0)
    for t in (60, -45, 0, 30, -49):  # inside the range (the limits are round-off ties)
        w = mask.observed(d, rotation=Rotation.from_euler("y", -t, degrees=True))
        assert np.all(w[in_plane]), t
    for t in (-55, 75, -85):
        w = mask.observed(d, rotation=Rotation.from_euler("y", -t, degrees=True))
        # Only the tilt axis (qx = 0) of that section is observed.
        np.testing.assert_array_equal(w[in_plane], (qx == 0)[in_plane] * np.ones(1, bool))
    # The same directions checked against xmipp's literal formula.
    for t, seen in [(60, True), (-55, False)]:
        u, z = np.cos(np.radians(t)), -np.sin(np.radians(t))
        assert bool(_xmipp_wedge(np.array(u), np.array(z), -50, 65)) is seen
        assert bool(_xmipp_wedge(np.array(-u), np.array(-z), -50, 65)) is seen


# ------------------------------------------------------ ArrayMask and cube group


@pytest.mark.parametrize("d", [9, 10])
@pytest.mark.parametrize(
    "mask",
    [MissingWedge(-60, 60), MissingWedge(-50, 65), MissingPyramid(), MissingCone(45)],
    ids=repr,
)
def test_array_mask_rotates_like_its_geometry_under_the_cube_group(mask, d):
    # With the default max_resolution = 0.5 every observed q has |q| < D/2, so no
    # coordinate reaches the Nyquist index D/2 (where, for even D, the half grid
    # holds only one of +-D/2 and a cube rotation would map q onto a component the
    # grid does not store). The band is a ball, invariant under these rotations,
    # and R^T q is again an integer point inside the box.
    array_mask = ArrayMask(mask.observed(d))
    rotations = Rotation.create_group("O")
    assert len(rotations) == 24
    got = array_mask.observed(d, rotation=rotations)
    expected = mask.observed(d, rotation=rotations)
    np.testing.assert_array_equal(got, expected)
    # Rotations genuinely change the mask (the comparison is not vacuous) ...
    assert sum(not np.array_equal(e, expected[0]) for e in expected) >= 8
    # ... and the identity returns the stored array.
    np.testing.assert_array_equal(array_mask.observed(d), mask.observed(d))


@pytest.mark.parametrize(
    "mask", [MissingWedge(-45, 45), MissingWedge(-90, 0), MissingCone(45)], ids=repr
)
def test_lattice_rotations_with_round_off_decide_ties_as_unrotated(mask):
    # These geometries have grid points exactly on their boundaries. Rotations by
    # multiples of 90 degrees built from Euler angles carry round-off (cos 90 is
    # 6e-17, not 0); rotated coordinates within 1e-9 of an integer snap onto it, so
    # ties are decided exactly as on the unrotated grid.
    d = 10
    angles = np.array([(a, b, c) for a in (0, 90) for b in (90, 180) for c in (-90, 270)])
    noisy = Rotation.from_euler("ZYZ", angles, degrees=True)
    exact = np.rint(noisy.as_matrix())
    assert np.any(noisy.as_matrix() != exact)
    np.testing.assert_array_equal(
        mask.observed(d, rotation=noisy), ArrayMask(mask.observed(d)).observed(d, rotation=exact)
    )


def test_array_mask_nearest_neighbour_lookup():
    d = 12
    a = np.zeros((d, d, d // 2 + 1), dtype=bool)
    a[0, 0, 3] = True  # q = (3, 0, 0) and, by symmetry, (-3, 0, 0)
    # 10 degrees about z: exactly the q with round(R^T q) = +-(3, 0, 0) are observed.
    rotation = Rotation.from_euler("z", 10, degrees=True)
    w = ArrayMask(a).observed(d, rotation=rotation)
    qx, qy, qz = _half_coordinates(d)
    p = np.einsum("ji,j...->i...", rotation.as_matrix(), np.stack([qx, qy, qz]))
    expected = (np.abs(np.rint(p[0])) == 3) & (np.rint(p[1]) == 0) & (np.rint(p[2]) == 0)
    np.testing.assert_array_equal(w, expected)
    assert w.sum() >= 1


# ----------------------------------------------------------------------- batches


def test_batched_rotation_equals_single_rotations():
    d = 12
    rotations = Rotation.random(5, random_state=3)
    for mask in (MissingWedge(-50, 65), MissingCone(30), ArrayMask(MissingPyramid().observed(d))):
        batched = mask.observed(d, rotation=rotations)
        assert batched.shape == (5, d, d, d // 2 + 1)
        from_matrices = mask.observed(d, rotation=rotations.as_matrix())
        np.testing.assert_array_equal(batched, from_matrices)
        for i in range(5):
            single = mask.observed(d, rotation=rotations[i])
            assert single.shape == (d, d, d // 2 + 1)
            np.testing.assert_array_equal(batched[i], single)
            np.testing.assert_array_equal(
                batched[i], mask.observed(d, rotation=rotations.as_matrix()[i])
            )
        one = mask.observed(d, rotation=Rotation.from_quat([rotations[0].as_quat()]))
        assert one.shape == (1, d, d, d // 2 + 1)
        np.testing.assert_array_equal(one[0], batched[0])


def test_identity_rotation_equals_unrotated():
    d = 11
    for mask in GEOMETRIES:
        w = mask.observed(d)
        assert w.dtype == bool and w.shape == (d, d, d // 2 + 1) and w.flags.writeable
        np.testing.assert_array_equal(
            mask.observed(d, rotation=Rotation.identity()), mask.observed(d)
        )


# ------------------------------------------------------ equality, pickle, checks


def test_equality_hash_repr_and_pickle():
    assert MissingWedge(-60, 60) == MissingWedge(-60.0, 60.0, axis="y")
    assert MissingWedge(-60, 60) != MissingWedge(-60, 60, axis="x")
    assert MissingWedge(-60, 60) != MissingPyramid()
    assert MissingPyramid() == MissingPyramid(-60, 60, -60, 60)
    assert len({MissingWedge(-60, 60), MissingWedge(-60, 60), MissingCone(45)}) == 2
    assert repr(MissingWedge(-50, 65)) == "MissingWedge(tilt_min=-50.0, tilt_max=65.0, axis='y')"
    assert repr(MissingCone(30)) == "MissingCone(tilt=30.0)"
    assert repr(FullData()) == "FullData()"
    array_mask = ArrayMask(MissingCone(30).observed(8))
    masks = [*GEOMETRIES, array_mask]
    for mask in masks:
        clone = pickle.loads(pickle.dumps(mask))
        assert clone == mask and hash(clone) == hash(mask)
        np.testing.assert_array_equal(clone.observed(8), mask.observed(8))
    assert array_mask != ArrayMask(MissingCone(40).observed(8))
    assert ArrayMask(array_mask.array.astype(np.int8)) == array_mask
    assert not array_mask.array.flags.writeable


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: MissingWedge(-100, 60), "tilt_min"),
        (lambda: MissingWedge(-60, 95), "tilt_max"),
        (lambda: MissingWedge(60, -60), "tilt_min"),
        (lambda: MissingWedge(30, 30), "tilt_min"),
        (lambda: MissingWedge(float("nan"), 60), "tilt_min"),
        (lambda: MissingWedge(-60, 60, axis="z"), "axis"),
        (lambda: MissingPyramid(-60, 60, 10, 5), "tilt_min_x"),
        (lambda: MissingPyramid(-60, 91, -60, 60), "tilt_max_y"),
        (lambda: MissingCone(0), "tilt"),
        (lambda: MissingCone(-10), "tilt"),
        (lambda: MissingCone(120), "tilt"),
        (lambda: ArrayMask(np.ones((8, 8, 8), bool)), "non-cubic"),
        (lambda: ArrayMask(np.ones((8, 6, 5), bool)), "non-cubic"),
        (lambda: ArrayMask(np.ones((8, 8), bool)), "3-D"),
        (lambda: ArrayMask(np.full((8, 8, 5), 2)), "array"),
        (lambda: ArrayMask(np.ones((8, 8, 5), bool)).observed(10), r"\(8, 8, 5\)"),
        (lambda: FullData().observed(1), "box_size"),
        (lambda: FullData().observed(8.5), "box_size"),
        (lambda: FullData().observed(8, max_resolution=0.9), "max_resolution"),
        (lambda: FullData().observed(8, max_resolution=0), "max_resolution"),
        (lambda: FullData().observed(8, rotation=np.eye(4)), "rotation"),
        (lambda: FullData().observed(8, rotation=2 * np.eye(3)), "rotation"),
    ],
)
def test_bad_arguments_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_max_resolution_upper_limit_is_allowed():
    d = 8
    w = FullData().observed(d, max_resolution=0.5 * np.sqrt(3))
    # Only the corner |q| = sqrt(3) D/2 is excluded besides DC.
    assert w.sum() == w.size - 1 - 1
