"""Tests for mlsubtomo.sampling: SO(3) grids, symmetry, perturbation, neighbourhoods."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mlsubtomo.sampling import (
    covering_radius,
    local_neighbourhood,
    neighbours,
    perturb,
    random_perturbation,
    so3_grid,
    symmetry_group,
)

C1_STEPS = [30, 20, 15, 10]


@pytest.fixture(scope="module")
def probes():
    """20,000 Haar-uniform rotations."""
    return Rotation.random(20000, random_state=1234)


def _size_bound(step_deg):
    """8 pi^2 / step^3: the volume of SO(3) over the cube of the step (radians)."""
    return 8.0 * np.pi**2 / np.deg2rad(step_deg) ** 3


def _brute_distances(rotations, grid, symmetry="C1"):
    """(n, m) distances in degrees, min over g of the angle of rot_i^-1 grid_j g."""
    group = symmetry_group(symmetry)
    out = np.full((len(rotations), len(grid)), np.inf)
    for i in range(len(rotations)):
        for k in range(len(group)):
            angles = (rotations[i].inv() * grid * group[k]).magnitude()
            out[i] = np.minimum(out[i], np.rad2deg(angles))
    return out


# ---------------------------------------------------------------------------
# C1 grids
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("step", C1_STEPS)
def test_c1_grid_covers_within_step_and_is_small(step, probes):
    grid = so3_grid(step)
    assert len(grid) <= _size_bound(step)
    radius = covering_radius(grid, probes)
    assert radius <= step
    # The grid is not wastefully dense either: probes do get close to the bound.
    assert radius > 0.6 * step


def test_grid_is_deterministic_and_starts_with_identity():
    a, b = so3_grid(15), so3_grid(15)
    np.testing.assert_array_equal(a.as_quat(), b.as_quat())
    assert a[0].magnitude() < 1e-12
    for sym in ("C4", "D7"):
        assert so3_grid(20, sym)[0].magnitude() < 1e-12


def test_grid_rotations_are_distinct():
    grid = so3_grid(20)
    dots = np.abs(grid.as_quat() @ grid.as_quat().T)
    np.fill_diagonal(dots, 0.0)
    # Closest pair farther apart than a degree: no duplicates.
    assert np.rad2deg(2 * np.arccos(dots.max())) > 1.0


def test_finer_step_gives_larger_grid():
    sizes = [len(so3_grid(s)) for s in (40, 30, 20, 15)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4


# ---------------------------------------------------------------------------
# covering_radius helper
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("symmetry", ["C1", "C3", "D2"])
def test_covering_radius_matches_brute_force(symmetry):
    grid = so3_grid(40, symmetry)
    few = Rotation.random(60, random_state=5)
    expected = _brute_distances(few, grid, symmetry).min(axis=1).max()
    assert covering_radius(grid, few, symmetry) == pytest.approx(expected, abs=1e-6)


def test_covering_radius_of_grid_points_is_zero():
    grid = so3_grid(30)
    assert covering_radius(grid, grid[::7]) < 1e-5


# ---------------------------------------------------------------------------
# Symmetry
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("symmetry", "size"), [("C1", 1), ("c4", 4), ("C7", 7), ("D7", 14), ("d2", 4)]
)
def test_symmetry_group_size_and_closure(symmetry, size):
    group = symmetry_group(symmetry)
    assert len(group) == size
    quats = group.as_quat()
    for i in range(size):
        products = (group[i] * group).as_quat()
        # Every product is (up to sign) one of the elements.
        assert np.all(np.abs(products @ quats.T).max(axis=1) > 1 - 1e-12)
    # Elements are distinct.
    dots = np.abs(quats @ quats.T)
    np.fill_diagonal(dots, 0.0)
    assert np.all(dots < 1 - 1e-9)


def test_cyclic_axis_is_z_and_dihedral_two_fold_is_x():
    cyc = symmetry_group("C7")
    z = np.array([0.0, 0.0, 1.0])
    np.testing.assert_allclose(cyc.apply(z), np.tile(z, (7, 1)), atol=1e-12)
    np.testing.assert_allclose(
        np.sort(np.rad2deg(cyc.magnitude())), np.sort([0, 360 / 7, 720 / 7, 1080 / 7] * 2)[1:]
    )
    dih = symmetry_group("D7")
    assert np.any(
        np.all(np.isclose(dih.as_matrix(), np.diag([1.0, -1.0, -1.0]), atol=1e-12), axis=(1, 2))
    )
    # The seven extra elements are two-folds about axes in the xy plane.
    extra = dih[7:]
    assert np.allclose(np.rad2deg(extra.magnitude()), 180.0)
    assert np.allclose(extra.as_rotvec()[:, 2], 0.0, atol=1e-12)


@pytest.mark.parametrize(("symmetry", "step"), [("C4", 20), ("C7", 20), ("C7", 15), ("D7", 20)])
def test_symmetric_grid_is_an_asymmetric_unit(symmetry, step, probes):
    grid = so3_grid(step, symmetry)
    order = len(symmetry_group(symmetry))
    full = len(so3_grid(step))
    assert 0.8 <= len(grid) * order / full <= 1.2
    assert covering_radius(grid, probes, symmetry) <= step
    # Without the symmetry the unit leaves most of SO(3) uncovered.
    assert covering_radius(grid, probes[:2000]) > 2 * step


@pytest.mark.parametrize("symmetry", ["C4", "D3"])
def test_symmetric_grid_has_one_rotation_per_coset(symmetry):
    grid = so3_grid(20, symmetry)
    group = symmetry_group(symmetry)
    quats = grid.as_quat()
    for k in range(1, len(group)):
        images = (grid * group[k]).as_quat()
        # No g != identity maps a grid rotation onto a grid rotation.
        assert np.abs(images @ quats.T).max() < 1 - 1e-9


# ---------------------------------------------------------------------------
# Perturbation
# ---------------------------------------------------------------------------


def test_perturb_gives_proper_rotations_reproducibly():
    grid = so3_grid(30)
    out = perturb(grid, 30, random_state=3)
    mats = out.as_matrix()
    np.testing.assert_allclose(np.linalg.det(mats), 1.0, atol=1e-12)
    np.testing.assert_allclose(
        mats @ np.transpose(mats, (0, 2, 1)), np.broadcast_to(np.eye(3), mats.shape), atol=1e-12
    )
    np.testing.assert_array_equal(out.as_quat(), perturb(grid, 30, random_state=3).as_quat())
    other = perturb(grid, 30, random_state=4)
    assert not np.allclose(np.abs(np.sum(out.as_quat() * other.as_quat(), axis=1)), 1.0)


def test_perturb_turns_the_whole_grid_by_one_rotation():
    grid = so3_grid(20)
    out = perturb(grid, 20, random_state=11)
    relative = grid.inv() * out
    first = relative[0].as_quat()
    np.testing.assert_allclose(np.abs(relative.as_quat() @ first), 1.0, atol=1e-12)
    # It is the documented right factor R = Euler ZYZ (a, b, c).
    expected = random_perturbation(20, random_state=11).as_quat()
    assert abs(first @ expected) == pytest.approx(1.0, abs=1e-12)
    # Right multiplication keeps all pairwise distances.
    pick = [0, 5, 100, 700]
    np.testing.assert_allclose(
        (grid[pick[0]].inv() * grid[pick]).magnitude(),
        (out[pick[0]].inv() * out[pick]).magnitude(),
        atol=1e-12,
    )


def test_perturbation_size_matches_std_of_a_third_of_the_step():
    step = 15.0
    sigma = np.deg2rad(step / 3)
    n = 3000
    rots = Rotation.concatenate([random_perturbation(step, random_state=s) for s in range(n)])
    # R = Rz(a) Ry(b) Rz(c) tilts z by exactly |b|, so mean(tilt^2) / sigma^2 ~ chi2_1 / 1.
    tilt = np.arccos(np.clip(rots.apply([0.0, 0.0, 1.0])[:, 2], -1.0, 1.0))
    ratio = np.mean(tilt**2) / sigma**2
    assert abs(ratio - 1.0) < 4 * np.sqrt(2.0 / n)
    # The rotation angle obeys cos(theta/2) = cos(b/2) cos((a+c)/2); compare its mean
    # with a large independent Monte Carlo sample of that law.
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(0.0, sigma, size=(3, 400000))
    theta_ref = 2 * np.arccos(np.abs(np.cos(b / 2) * np.cos((a + c) / 2)))
    theta = rots.magnitude()
    se = theta_ref.std() / np.sqrt(n)
    assert abs(theta.mean() - theta_ref.mean()) < 4 * se
    # A std of step/2 would be far outside that range.
    assert theta_ref.mean() * 1.5 - theta.mean() > 10 * se


# ---------------------------------------------------------------------------
# Local neighbourhoods
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("symmetry", "max_angle"), [("C1", 40.0), ("C4", 35.0), ("D2", 25.0)])
def test_local_neighbourhood_matches_brute_force(symmetry, max_angle):
    grid = so3_grid(30, symmetry)
    rots = Rotation.random(40, random_state=8)
    got = local_neighbourhood(grid, rots, max_angle, symmetry)
    expected = _brute_distances(rots, grid, symmetry) <= max_angle
    assert got.shape == (40, len(grid))
    np.testing.assert_array_equal(got, expected)
    assert 0 < got.sum() < got.size
    for i in (0, 17):
        np.testing.assert_array_equal(
            neighbours(grid, rots[i], max_angle, symmetry), np.flatnonzero(expected[i])
        )


def test_include_nearest_adds_only_the_nearest_grid_rotation():
    grid = so3_grid(30, "D2")
    rots = Rotation.random(40, random_state=3)
    distances = _brute_distances(rots, grid, "D2")
    got = local_neighbourhood(grid, rots, 5.0, "D2", include_nearest=True)
    expected = distances <= 5.0
    expected[np.arange(40), np.argmin(distances, axis=1)] = True
    np.testing.assert_array_equal(got, expected)
    # At 5 degrees on a 30-degree grid most rotations have no neighbour of their own.
    assert not local_neighbourhood(grid, rots, 5.0, "D2").any(axis=1).all()


def test_every_rotation_has_a_grid_neighbour_within_the_step():
    step = 15
    grid = so3_grid(step)
    rots = Rotation.random(500, random_state=21)
    assert local_neighbourhood(grid, rots, step).any(axis=1).all()
    # ... but usually not within a third of it.
    assert not local_neighbourhood(grid, rots, step / 3).any(axis=1).all()


def test_neighbourhood_edge_angles():
    grid = so3_grid(30)
    # Zero radius: each grid rotation is its own (only) neighbour.
    np.testing.assert_array_equal(neighbours(grid, grid[5], 0.0), [5])
    assert local_neighbourhood(grid, grid[:3], 180.0).all()


# ---------------------------------------------------------------------------
# Argument validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -5, 180.5, np.nan, np.inf, "ten", None])
def test_bad_angular_step_raises(bad):
    with pytest.raises(ValueError, match="angular_step"):
        so3_grid(bad)
    with pytest.raises(ValueError, match="angular_step"):
        random_perturbation(bad, random_state=0)
    with pytest.raises(ValueError, match="angular_step"):
        perturb(so3_grid(90), bad, random_state=0)


@pytest.mark.parametrize("bad", ["X3", "C0", "O", "D", "C-2", 4, None])
def test_bad_symmetry_raises(bad):
    with pytest.raises(ValueError, match="symmetry"):
        symmetry_group(bad)
    with pytest.raises(ValueError, match="symmetry"):
        so3_grid(30, bad)
    grid = so3_grid(90)
    with pytest.raises(ValueError, match="symmetry"):
        covering_radius(grid, grid, bad)
    with pytest.raises(ValueError, match="symmetry"):
        local_neighbourhood(grid, grid[0], 10.0, bad)


@pytest.mark.parametrize("bad", [-1.0, np.nan, "wide"])
def test_bad_max_angle_raises(bad):
    grid = so3_grid(90)
    with pytest.raises(ValueError, match="max_angle"):
        local_neighbourhood(grid, grid[0], bad)
    with pytest.raises(ValueError, match="max_angle"):
        neighbours(grid, grid[0], bad)


def test_step_of_180_is_allowed():
    grid = so3_grid(180)
    assert len(grid) >= 1
    assert covering_radius(grid, Rotation.random(2000, random_state=0)) <= 180
