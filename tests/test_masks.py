"""Fourier-space masks: geometry, fractions, Hermitian symmetry, rotation."""

import pickle

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mlsubtomo.fft import frequency_grid
from mlsubtomo.masks import (
    ArrayMask,
    FullData,
    MissingCone,
    MissingPyramid,
    MissingWedge,
    observed_fraction,
)

GEOMETRIES = [
    MissingWedge(-60, 60),
    MissingWedge(-50, 65),
    MissingWedge(-45, 70, axis="x"),
    MissingPyramid(-60, 60, -55, 50),
    MissingCone(45),
    FullData(),
]


def _full_grid(half, d):
    """Expand a half-grid array to the full grid using w(-q) = w(q)."""
    full = np.zeros((d, d, d), dtype=half.dtype)
    full[:, :, : d // 2 + 1] = half
    idx = np.arange(d)
    neg = (-idx) % d
    for x in range(d // 2 + 1, d):
        full[:, :, x] = half[neg][:, neg][:, :, (-x) % d]
    return full


def _xmipp_wedge(u, z, a, b):
    """xmipp's criterion written out literally (valid for ranges containing 0)."""
    tg0 = -1.0 / np.tan(np.radians(b))
    tgf = -1.0 / np.tan(np.radians(a))
    return ((z >= 0) & ((u <= tg0 * z) | (u >= tgf * z))) | (
        (z < 0) & ((u <= tgf * z) | (u >= tg0 * z))
    )


def _half_coordinates(d):
    return [np.broadcast_to(c, (d, d, d // 2 + 1)) for c in frequency_grid(d)]


@pytest.mark.parametrize(
    "mask, expected",
    [
        (MissingWedge(-60, 60), 2 / 3),
        (MissingWedge(-60, 60, axis="x"), 2 / 3),
        (MissingCone(45), np.cos(np.radians(45))),
        (FullData(), 1.0),
    ],
)
def test_observed_fraction_in_the_resolution_ball(mask, expected):
    assert observed_fraction(mask.observed(64), 64) == pytest.approx(expected, abs=0.01)


def test_pyramid_fraction_matches_monte_carlo():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(400_000, 3))
    p *= (rng.random(len(p)) ** (1 / 3) / np.linalg.norm(p, axis=1))[:, None]
    x, y, z = p.T
    inside = _xmipp_wedge(x, z, -60, 60) | _xmipp_wedge(y, z, -60, 60)
    expected = inside.mean()  # standard error < 1e-3
    measured = observed_fraction(MissingPyramid().observed(64), 64)
    assert measured == pytest.approx(expected, abs=0.01)
    assert measured > observed_fraction(MissingWedge(-60, 60).observed(64), 64) + 0.05


@pytest.mark.parametrize("d", [9, 16])
@pytest.mark.parametrize("mask", GEOMETRIES, ids=repr)
def test_hermitian_and_no_dc(mask, d):
    rotations = Rotation.random(3, random_state=1)
    for half in [mask.observed(d), *mask.observed(d, rotation=rotations)]:
        full = _full_grid(half, d)
        idx = (-np.arange(d)) % d
        np.testing.assert_array_equal(full, full[idx][:, idx][:, :, idx])
        assert not half[0, 0, 0]


@pytest.mark.parametrize("a, b", [(-60, 60), (-50, 65), (-30, 80)])
def test_rotated_wedge_is_the_geometry_at_rotated_frequencies(a, b):
    d = 24
    qx, qy, qz = _half_coordinates(d)
    q = np.stack([qx.ravel(), qy.ravel(), qz.ravel()])
    radius = np.linalg.norm(q, axis=0)
    band = (radius > 0) & (radius < 0.5 * d)
    for matrix in Rotation.random(5, random_state=2).as_matrix():
        x, y, z = matrix.T @ q
        expected = _xmipp_wedge(x, z, a, b) & band
        # Points within round-off of the boundary may go either way.
        margin = np.minimum(
            np.abs(x + z / np.tan(np.radians(b))), np.abs(x + z / np.tan(np.radians(a)))
        )
        clear = margin > 1e-9
        got = MissingWedge(a, b).observed(d, rotation=matrix).ravel()
        assert np.sum(got[clear] != expected[clear]) == 0


def test_asymmetric_wedge_orientation_is_pinned():
    # The direction (cos t, 0, -sin t) is imaged at tilt t: +60 lies in (-50, 65),
    # -55 does not.
    d = 64
    half = MissingWedge(-50, 65).observed(d)

    def value(t):
        r = 20
        qx, qz = r * np.cos(np.radians(t)), -r * np.sin(np.radians(t))
        qx, qz = int(round(qx)), int(round(qz))
        if qx < 0:
            qx, qz = -qx, -qz
        return half[qz % d, 0, qx]

    assert value(60)
    assert value(-45)
    assert not value(-55)
    assert not value(75)


def test_wedge_edge_ranges():
    d = 16
    assert observed_fraction(MissingWedge(-90, 90).observed(d), d) == 1.0
    half = observed_fraction(MissingWedge(0, 60).observed(d), d)
    assert half == pytest.approx(observed_fraction(MissingWedge(-60, 0).observed(d), d))
    assert 0.3 < half < 0.4
    # A range without 0: only the sections between 10 and 70 degrees.
    assert 0.3 < observed_fraction(MissingWedge(10, 70).observed(d), d) < 0.36


def test_max_resolution_band():
    d = 32
    qx, qy, qz = _half_coordinates(d)
    radius = np.sqrt(qx**2 + qy**2 + qz**2)
    np.testing.assert_array_equal(
        FullData().observed(d, max_resolution=0.25), (radius > 0) & (radius < 8)
    )
    np.testing.assert_array_equal(FullData().observed(d, max_resolution=None), radius > 0)


@pytest.mark.parametrize("d", [9, 10])
@pytest.mark.parametrize(
    "mask", [MissingWedge(-60, 60), MissingWedge(-50, 65), MissingPyramid(), MissingCone(45)],
    ids=repr,
)
def test_array_mask_rotates_like_its_geometry_under_the_cube_group(mask, d):
    array = ArrayMask(mask.observed(d))
    for matrix in Rotation.create_group("O").as_matrix():
        np.testing.assert_array_equal(
            array.observed(d, rotation=matrix), mask.observed(d, rotation=matrix)
        )


def test_batched_rotation_equals_single_rotations():
    rotations = Rotation.random(4, random_state=3)
    mask = MissingWedge(-50, 65)
    batched = mask.observed(12, rotation=rotations)
    assert batched.shape == (4, 12, 12, 7)
    for i in range(4):
        np.testing.assert_array_equal(batched[i], mask.observed(12, rotation=rotations[i]))
    single_list = mask.observed(12, rotation=Rotation.from_quat([rotations[0].as_quat()]))
    assert single_list.shape == (1, 12, 12, 7)


def test_equality_hash_and_pickle():
    assert MissingWedge(-60, 60) == MissingWedge(-60, 60)
    assert MissingWedge(-60, 60) != MissingWedge(-60, 60, axis="x")
    assert len({MissingWedge(-60, 60), MissingWedge(-60, 60), MissingCone(45)}) == 2
    a = ArrayMask(MissingCone(30).observed(8))
    assert pickle.loads(pickle.dumps(a)) == a
    assert "MissingWedge" in repr(MissingWedge())


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: MissingWedge(-100, 60), "tilt_min"),
        (lambda: MissingWedge(-60, 95), "tilt_max"),
        (lambda: MissingWedge(60, -60), "tilt_min"),
        (lambda: MissingWedge(-60, 60, axis="z"), "axis"),
        (lambda: MissingPyramid(-60, 60, 10, 5), "tilt_min_x"),
        (lambda: MissingCone(0), "tilt"),
        (lambda: MissingCone(120), "tilt"),
        (lambda: ArrayMask(np.ones((8, 8, 8), bool)), "non-cubic or non-half-grid"),
        (lambda: ArrayMask(np.ones((8, 8), bool)), "3-D"),
        (lambda: ArrayMask(np.ones((8, 8, 5), bool)).observed(10), "box_size"),
        (lambda: FullData().observed(1), "box_size"),
        (lambda: FullData().observed(8, max_resolution=2.0), "max_resolution"),
    ],
)
def test_bad_arguments_are_named(make, name):
    with pytest.raises(ValueError, match=name):
        make()
