"""Sampling of the rotation group SO(3): grids, symmetry, perturbation, neighbourhoods.

A rotation R acts on ``(x, y, z)`` column vectors and a particle is
``X(r) = A(R^T r)``. The distance between two rotations is the geodesic one, the
rotation angle of ``R1^{-1} R2``; with unit quaternions it is
``2 arccos |q1 . q2|``. A reference with point-group symmetry G satisfies
``g A = A`` for every g in G, so ``R`` and ``R g`` give the same particle: the
orientations are the right cosets ``R G`` and every distance "modulo G" is the
minimum over g of ``dist(R1, R2 g)``.

Grid construction (Hopf fibration)
----------------------------------
The map ``R -> R z`` sends SO(3) onto the sphere of viewing directions; its
fibres are the in-plane rotations ``R Rz(psi)``. The grid is a product of a
direction grid and evenly spaced in-plane angles, because then

* the covering radius has an exact bound. If a direction lies within ``alpha``
  of Q's viewing direction and its in-plane angles are spaced ``dpsi``, the
  nearest of them is at an angle theta from Q with
  ``cos(theta/2) >= cos(alpha/2) cos(dpsi/4)`` (spherical Pythagoras: the
  quaternions of a tilt and of an in-plane turn about perpendicular axes have
  the product of their cosines as scalar part). The spacings are chosen from this
  inequality, not tuned per step, so every grid covers SO(3) within its step.
* the symmetries of interest act on the fibres. ``R Rz(2 pi / n)`` only turns the
  in-plane angle, so the Cn asymmetric unit is an in-plane range of 360/n
  degrees. ``R Rx(pi)`` sends the viewing direction to its antipode, so the Dn
  unit is, in addition, one hemisphere of directions.

Directions are iso-latitude rings: ``K + 1`` colatitudes ``k pi / K`` with the
poles as single points and, on ring k, ``m_k`` evenly spaced azimuths, the
fewest for which every direction between the neighbouring half-rings is within
the target radius of a ring point. The southern half is the antipodal image of
the northern half (with half of the equator ring), so that the full grid is
closed under the Dn two-fold and the Dn grid is exactly one representative per
coset. The ring spacing and the number of in-plane angles are searched jointly
for the smallest grid meeting the bound; the result has about
``55-60 / step^3`` rotations (step in radians), 70-76% of ``8 pi^2 / step^3``
(the volume of SO(3) over the cube of the step), and random rotations are
typically found within 0.87-0.93 of the step of it.
"""

from __future__ import annotations

import re
from numbers import Real

import numpy as np
from scipy.spatial.transform import Rotation
from sklearn.utils import check_random_state

__all__ = [
    "covering_radius",
    "local_neighbourhood",
    "nearest_grid_index",
    "neighbours",
    "perturb",
    "random_perturbation",
    "so3_grid",
    "symmetry_group",
]

# Quaternion dot products are computed in blocks of about this many entries
# (32 MiB of float64), so that memory stays bounded for any number of probes.
_BLOCK_ENTRIES = 1 << 22

# The covering bound is evaluated for a radius this much below the requested
# step, so rounding in the trigonometry can never push the guarantee past it.
_ROUND_OFF = 1e-9

# Slack on |q1 . q2| >= cos(max_angle / 2) in neighbourhood tests, so that a
# rotation always counts as within 0 degrees of itself despite rounding; it
# admits distances at most ~3e-6 rad beyond max_angle.
_DOT_TOL = 1e-12

# Azimuth (fraction of the in-ring spacing) and in-plane (fraction of the psi
# spacing) offsets of successive rings. They stagger neighbouring samples, which
# lowers the typical distance to the grid; the guaranteed bound does not use them.
_RING_STAGGER = 0.5
_PSI_STAGGER = 0.5

_SYMMETRY_PATTERN = re.compile(r"^\s*([CD])\s*(\d+)\s*$", re.IGNORECASE)


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------


def _check_angular_step(angular_step) -> float:
    """Return ``angular_step`` as a float in (0, 180] degrees or raise ValueError."""
    if isinstance(angular_step, bool) or not isinstance(angular_step, Real | np.number):
        raise ValueError(f"angular_step must be a number of degrees, got {angular_step!r}")
    step = float(angular_step)
    if not np.isfinite(step) or step <= 0.0 or step > 180.0:
        raise ValueError(f"angular_step must be finite and in (0, 180] degrees, got {step!r}")
    return step


def _check_max_angle(max_angle) -> float:
    """Return ``max_angle`` as a non-negative float in degrees or raise ValueError."""
    if isinstance(max_angle, bool) or not isinstance(max_angle, Real | np.number):
        raise ValueError(f"max_angle must be a number of degrees, got {max_angle!r}")
    angle = float(max_angle)
    if np.isnan(angle) or angle < 0.0:
        raise ValueError(f"max_angle must be >= 0 degrees, got {angle!r}")
    return angle


def _parse_symmetry(symmetry) -> tuple[str, int]:
    """Split ``"Cn"``/``"Dn"`` (any case) into its family letter and order n >= 1."""
    match = _SYMMETRY_PATTERN.match(symmetry) if isinstance(symmetry, str) else None
    if match is None or int(match.group(2)) < 1:
        raise ValueError(
            f"symmetry must be 'Cn' or 'Dn' with n >= 1 (e.g. 'C1', 'C4', 'D7'), got {symmetry!r}"
        )
    return match.group(1).upper(), int(match.group(2))


def _as_stack(rotations, name: str) -> Rotation:
    """A Rotation holding a stack (a single rotation becomes a stack of one)."""
    if not isinstance(rotations, Rotation):
        raise TypeError(f"{name} must be a scipy Rotation, got {type(rotations).__name__}")
    if rotations.single:
        return Rotation.from_quat(rotations.as_quat()[None, :])
    return rotations


# ---------------------------------------------------------------------------
# Symmetry
# ---------------------------------------------------------------------------


def symmetry_group(symmetry="C1") -> Rotation:
    """Rotations of a cyclic or dihedral point group.

    Parameters
    ----------
    symmetry : str, default="C1"
        ``"Cn"``: the n rotations about z by multiples of 360/n degrees.
        ``"Dn"``: those and the n two-folds obtained by composing them with the
        two-fold about x (2n elements). Case-insensitive.

    Returns
    -------
    Rotation
        A stack of ``|G|`` rotations, the identity first.

    Raises
    ------
    ValueError
        If ``symmetry`` is not of the form ``Cn`` or ``Dn`` with n >= 1.
    """
    family, order = _parse_symmetry(symmetry)
    turns = np.zeros((order, 3))
    turns[:, 2] = 2.0 * np.pi * np.arange(order) / order
    cyclic = Rotation.from_rotvec(turns)
    if family == "C":
        return cyclic
    flip = Rotation.from_rotvec([np.pi, 0.0, 0.0])
    return Rotation.concatenate([cyclic, cyclic * flip])


# ---------------------------------------------------------------------------
# Grid construction
# ---------------------------------------------------------------------------


def _ring_sizes(n_intervals: int, radius: float) -> np.ndarray | None:
    """Points per colatitude ring so that every direction is within ``radius``.

    Rings sit at colatitudes ``k pi / K``, k = 0..K (the poles as single points).
    A direction at colatitude theta is within ``dtheta / 2`` of some ring k; with
    ``m_k`` azimuths on it, the nearest is at most ``pi / m_k`` away in azimuth,
    and the spherical law of cosines gives its distance d as
    ``cos d = cos(theta - theta_k) - sin(theta) sin(theta_k) (1 - cos delta)``.
    ``m_k`` is the smallest count keeping d <= radius for every such direction.

    Returns
    -------
    ndarray of int, shape (K + 1,), or None if the ring spacing alone exceeds
    the radius. The equator ring, if any, gets an even count so that it is
    closed under the antipodal map.
    """
    dtheta = np.pi / n_intervals
    slack = np.cos(dtheta / 2.0) - np.cos(radius)
    if slack <= 0.0:
        return None
    theta = dtheta * np.arange(n_intervals + 1)
    # Largest sin(theta) over the band served by each ring.
    nearest_to_equator = np.clip(np.pi / 2.0, theta - dtheta / 2.0, theta + dtheta / 2.0)
    s = np.sin(theta) * np.sin(nearest_to_equator)
    with np.errstate(divide="ignore"):
        cos_delta = np.where(s > 0.0, 1.0 - slack / np.where(s > 0.0, s, 1.0), -1.0)
    half_gap = np.arccos(np.clip(cos_delta, -1.0, 1.0))
    # round() guards the ceiling against values like 3.0000000000000004.
    sizes = np.maximum(1, np.ceil(np.round(np.pi / half_gap, 9))).astype(np.int64)
    sizes[0] = sizes[-1] = 1
    if n_intervals % 2 == 0:
        middle = n_intervals // 2
        sizes[middle] += sizes[middle] % 2
    return sizes


def _half_direction_count(sizes: np.ndarray) -> int:
    """Directions in the northern half: rings above the equator plus half the equator."""
    n_intervals = len(sizes) - 1
    count = int(sizes[: (n_intervals + 1) // 2].sum())
    if n_intervals % 2 == 0:
        count += int(sizes[n_intervals // 2]) // 2
    return count


def _plan(step: float, order: int) -> tuple[int, np.ndarray]:
    """Choose the in-plane count and ring layout of the smallest grid covering ``step``.

    Parameters
    ----------
    step : float
        Covering radius to guarantee, radians.
    order : int
        n of Cn/Dn: the in-plane range of the asymmetric unit is ``2 pi / n``.

    Returns
    -------
    n_psi : int
        In-plane angles per direction within ``2 pi / n``.
    sizes : ndarray of int
        Ring sizes from :func:`_ring_sizes`.
    """
    cos_half_step = np.cos(step / 2.0)
    # The in-plane half-spacing must stay below the step: n_psi > pi / (order step).
    n_psi_min = int(np.floor(np.pi / (order * step))) + 1
    best = None
    # The optimum lies near sqrt(3) n_psi_min in-plane angles and a ring spacing
    # near sqrt(2) * radius (where the in-plane and the two direction spacings
    # contribute equally); the searched ranges bracket both with room to spare.
    for n_psi in range(n_psi_min, 2 * n_psi_min + 2):
        dpsi = 2.0 * np.pi / (order * n_psi)
        ratio = cos_half_step / np.cos(dpsi / 4.0)
        if ratio >= 1.0:
            continue
        radius = 2.0 * np.arccos(ratio)  # direction covering radius still allowed
        # A ring spacing below 2 * radius is necessary: K > pi / (2 radius).
        k_min = int(np.floor(np.pi / (2.0 * radius))) + 1
        for n_intervals in range(k_min, 2 * k_min + 2):
            sizes = _ring_sizes(n_intervals, radius)
            if sizes is None:
                continue
            total = _half_direction_count(sizes) * n_psi
            if best is None or total < best[0]:
                best = (total, n_psi, sizes)
    if best is None:  # pragma: no cover - the loops always find a layout
        raise RuntimeError("no SO(3) grid layout found")
    return best[1], best[2]


def _northern_half(sizes: np.ndarray, n_psi: int, order: int) -> Rotation:
    """Rotations over the northern half of the directions, in-plane range ``2 pi / n``.

    Each rotation is ``Rz(phi) Ry(theta) Rz(psi)``: it takes z to the direction
    (theta, phi) and then turns in-plane by psi. The north pole with psi = 0
    comes first, so the grid starts with the identity.
    """
    n_intervals = len(sizes) - 1
    dtheta = np.pi / n_intervals
    dpsi = 2.0 * np.pi / (order * n_psi)
    eulers = []
    for k in range((n_intervals + 2) // 2):
        m = int(sizes[k])
        kept = m // 2 if 2 * k == n_intervals else m  # half the equator ring
        phi = 2.0 * np.pi * (np.arange(kept) + _RING_STAGGER * (k % 2)) / m
        psi = dpsi * (np.arange(n_psi) + _PSI_STAGGER * (k % 2))
        block = np.empty((kept, n_psi, 3))
        block[:, :, 0] = phi[:, None]
        block[:, :, 1] = k * dtheta
        block[:, :, 2] = psi[None, :]
        eulers.append(block.reshape(-1, 3))
    return Rotation.from_euler("ZYZ", np.concatenate(eulers))


def so3_grid(angular_step, symmetry="C1") -> Rotation:
    """An approximately even grid of rotations covering SO(3) (modulo symmetry).

    Every rotation is within ``angular_step`` of some grid rotation (modulo the
    symmetry group G), which is guaranteed by construction (see the module
    docstring); the grid has about ``55-60 / step^3 / |G|`` rotations, step in
    radians (C1: 420 at 30 degrees, 1,372 at 20, 3,108 at 15, 10,296 at 10).

    Parameters
    ----------
    angular_step : float
        Largest allowed distance, degrees, from any rotation to the grid; in
        (0, 180].
    symmetry : str, default="C1"
        ``"Cn"`` or ``"Dn"`` (see :func:`symmetry_group`). The grid is then one
        asymmetric unit: each coset ``R G`` is represented at most once, and
        there are about ``|G|`` times fewer rotations.

    Returns
    -------
    Rotation
        A stack of rotations, deterministic for given arguments, the identity
        first. Ordered by viewing direction ``R z`` (north to south), then
        in-plane angle.

    Raises
    ------
    ValueError
        If ``angular_step`` is not in (0, 180] or ``symmetry`` is unknown.
    """
    step = _check_angular_step(angular_step)
    family, order = _parse_symmetry(symmetry)
    n_psi, sizes = _plan(np.deg2rad(step) * (1.0 - _ROUND_OFF), order)
    north = _northern_half(sizes, n_psi, order)
    if family == "D":
        # The two-fold about x maps each southern rotation onto a northern one.
        return north
    # Southern half: the images under the two-fold about x (viewing direction
    # -> antipode), which makes the full grid closed under Dn as well.
    south = north * Rotation.from_rotvec([np.pi, 0.0, 0.0])
    return Rotation.concatenate([north, south])


# ---------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------


def _expanded_quaternions(grid: Rotation, symmetry) -> tuple[np.ndarray, int]:
    """Quaternions of ``grid * g`` for all g in G, shape (|G|, len(grid), 4)."""
    group = symmetry_group(symmetry)
    quats = np.stack([(grid * group[i]).as_quat() for i in range(len(group))])
    return quats, len(group)


def _max_abs_dot_blocks(rotations: Rotation, grid: Rotation, symmetry):
    """Yield ``(rows, best)`` blocks: ``best[i, j] = max_g |q(rot_i) . q(grid_j g)|``.

    The absolute dot product is ``cos(theta / 2)`` of the distance theta (the
    sign of a quaternion is arbitrary), so the maximum over g is the distance
    modulo G. Blocks of rotations keep the temporary arrays near _BLOCK_ENTRIES.
    """
    expanded, n_group = _expanded_quaternions(grid, symmetry)
    n_grid = expanded.shape[1]
    flat = expanded.reshape(-1, 4).T  # (4, |G| * n_grid)
    queries = rotations.as_quat()
    block = max(1, _BLOCK_ENTRIES // max(1, flat.shape[1]))
    for start in range(0, len(queries), block):
        dots = queries[start : start + block] @ flat
        np.abs(dots, out=dots)
        best = dots.reshape(-1, n_group, n_grid).max(axis=1)
        yield slice(start, start + len(best)), best


def covering_radius(grid, probes, symmetry="C1") -> float:
    """Largest distance from a probe rotation to its nearest grid rotation, modulo G.

    Parameters
    ----------
    grid : Rotation
        The sampling (e.g. from :func:`so3_grid`).
    probes : Rotation
        Test rotations, e.g. ``Rotation.random(20000, random_state=0)``.
    symmetry : str, default="C1"
        Distances are ``min_g dist(probe, grid_j g)`` over the group G.

    Returns
    -------
    float
        ``max_probe min_{j, g} dist(probe, grid_j g)`` in degrees; a lower bound
        on the grid's true covering radius that tightens with more probes.
        Memory stays bounded by processing the probes in blocks.
    """
    grid = _as_stack(grid, "grid")
    probes = _as_stack(probes, "probes")
    worst = 1.0
    for _, best in _max_abs_dot_blocks(probes, grid, symmetry):
        worst = min(worst, float(best.max(axis=1).min()))
    return float(np.rad2deg(2.0 * np.arccos(np.clip(worst, 0.0, 1.0))))


def local_neighbourhood(
    grid, rotations, max_angle, symmetry="C1", include_nearest=False
) -> np.ndarray:
    """Which grid rotations lie within ``max_angle`` of each given rotation (modulo G).

    Parameters
    ----------
    grid : Rotation
        Stack of m grid rotations.
    rotations : Rotation
        The n centres (a single rotation counts as n = 1).
    max_angle : float
        Radius in degrees, >= 0; 180 or more selects every grid rotation.
    symmetry : str, default="C1"
        Distances are ``min_g dist(rotation, grid_j g)``.
    include_nearest : bool, default=False
        Also mark each rotation's nearest grid rotation, however far, so that a
        local search leaves no rotation without a candidate.

    Returns
    -------
    ndarray of bool, shape (n, m)
        True where ``dist <= max_angle`` (up to rounding, see ``_DOT_TOL``).

    Raises
    ------
    ValueError
        If ``max_angle`` is negative or NaN, or ``symmetry`` is unknown.
    """
    angle = _check_max_angle(max_angle)
    grid = _as_stack(grid, "grid")
    rotations = _as_stack(rotations, "rotations")
    _parse_symmetry(symmetry)
    if angle >= 180.0:
        # Every distance is at most 180 degrees; testing cos(90 deg) ~ 6e-17 against
        # an exact zero dot product would wrongly exclude antipodal pairs.
        return np.ones((len(rotations), len(grid)), dtype=bool)
    threshold = np.cos(np.deg2rad(angle) / 2.0) - _DOT_TOL
    out = np.empty((len(rotations), len(grid)), dtype=bool)
    for rows, best in _max_abs_dot_blocks(rotations, grid, symmetry):
        out[rows] = best >= threshold
        if include_nearest:
            out[rows.start + np.arange(len(best)), np.argmax(best, axis=1)] = True
    return out


def nearest_grid_index(grid, rotations, symmetry="C1") -> np.ndarray:
    """Index of the grid rotation nearest to each rotation (modulo G).

    Parameters
    ----------
    grid : Rotation
    rotations : Rotation
    symmetry : str, default="C1"

    Returns
    -------
    ndarray of int, shape (n,)
    """
    grid = _as_stack(grid, "grid")
    rotations = _as_stack(rotations, "rotations")
    _parse_symmetry(symmetry)
    out = np.empty(len(rotations), dtype=np.int64)
    for rows, best in _max_abs_dot_blocks(rotations, grid, symmetry):
        out[rows] = np.argmax(best, axis=1)
    return out


def neighbours(grid, rotation, max_angle, symmetry="C1") -> np.ndarray:
    """Indices of the grid rotations within ``max_angle`` degrees of one rotation.

    Parameters
    ----------
    grid : Rotation
    rotation : Rotation
        A single rotation (or a stack of one).
    max_angle : float
        Degrees, >= 0.
    symmetry : str, default="C1"

    Returns
    -------
    ndarray of int
        Ascending indices into ``grid``.
    """
    rotation = _as_stack(rotation, "rotation")
    if len(rotation) != 1:
        raise ValueError(f"rotation must be a single rotation, got {len(rotation)}")
    return np.flatnonzero(local_neighbourhood(grid, rotation, max_angle, symmetry)[0])


# ---------------------------------------------------------------------------
# Perturbation
# ---------------------------------------------------------------------------


def random_perturbation(angular_step, random_state=None) -> Rotation:
    """One random rotation ``Rz(a) Ry(b) Rz(c)`` with a, b, c ~ N(0, (step / 3)^2) degrees.

    Parameters
    ----------
    angular_step : float
        Grid step in degrees, in (0, 180].
    random_state : None, int or numpy.random.RandomState
        Passed to :func:`sklearn.utils.check_random_state`.

    Returns
    -------
    Rotation
        A single rotation, ``Rotation.from_euler("ZYZ", [a, b, c], degrees=True)``.
    """
    step = _check_angular_step(angular_step)
    rng = check_random_state(random_state)
    angles = rng.normal(0.0, step / 3.0, size=3)
    return Rotation.from_euler("ZYZ", angles, degrees=True)


def perturb(grid, angular_step, random_state=None) -> Rotation:
    """Turn the whole grid by one small random rotation: ``E_j R`` for every j.

    Averaging over iterations with different perturbations samples orientations
    between the grid points (ml_tomo's ``--perturb``). The same R multiplies
    every grid rotation on the right, so the grid's shape and covering radius are
    unchanged; it is drawn afresh from the unperturbed grid each time, so
    perturbations do not accumulate.

    Parameters
    ----------
    grid : Rotation
        Stack of grid rotations.
    angular_step : float
        Grid step in degrees; the Euler angles of R have std ``angular_step / 3``.
    random_state : None, int or numpy.random.RandomState
        Same seed, same result.

    Returns
    -------
    Rotation
        ``grid * R`` with R from :func:`random_perturbation`.
    """
    grid = _as_stack(grid, "grid")
    return grid * random_perturbation(angular_step, random_state)
