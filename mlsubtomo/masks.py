"""Fourier-space missing-data geometry: which components of a particle were observed.

A mask answers ``observed(box_size, rotation=None, max_resolution=0.5)`` with a
boolean half grid of shape ``(D, D, D//2 + 1)`` (the ``rfftn`` layout, indexed
``[kz, ky, kx]`` as :func:`mlsubtomo.fft.frequency_grid` describes), True where the
component was measured. With a rotation R it describes the particle rotated by R:
frequency q is observed iff the geometry holds at ``p = R^T q``, the frequency in
the particle's own frame. The DC component and every ``|q| >= max_resolution * D``
(``|q|`` in Fourier pixels) count as not observed.

The wedge, pyramid and cone follow xmipp_ml_tomo's geometry (``getMissingRegion``)
so that results compare with xmipp's; :class:`MissingWedge` documents the physical
meaning of a tilt range and the sign convention. Geometric masks are evaluated
exactly on the rotated frequency coordinates, never interpolated, and every result
is Hermitian-consistent, ``w(q) = w(-q)``, by construction: the criteria are even
functions of p, and on the two half-grid planes that hold both q and -q (``qx = 0``
and, for even D, ``qx = D/2``) each pair takes the value computed at one member.
"""

from __future__ import annotations

import abc
import math
import numbers
import operator

import numba
import numpy as np
from scipy.spatial.transform import Rotation

from .fft import frequency_grid, half_grid_shape, hermitian_multiplicity

__all__ = [
    "ArrayMask",
    "FullData",
    "Mask",
    "MissingCone",
    "MissingPyramid",
    "MissingWedge",
    "observed_fraction",
]

# Rotated coordinates closer than this to an integer snap onto it, so that rotations
# mapping the grid onto itself (the 24 of the cube) reproduce the exact integer
# frequencies, and ties on a boundary are decided as for the unrotated grid.
_SNAP = 1e-9
# Largest number of (rotation, frequency) pairs evaluated in one vectorised block.
_BLOCK = 1 << 21
# Tolerance of the orthogonality check on rotation matrices.
_ORTHO_TOL = 1e-6


# --------------------------------------------------------------------------- checks


def _check_box(box_size) -> int:
    try:
        d = operator.index(box_size)
    except TypeError:
        raise ValueError(f"box_size must be an integer >= 2, got {box_size!r}") from None
    if isinstance(box_size, bool) or d < 2:
        raise ValueError(f"box_size must be an integer >= 2, got {box_size!r}")
    return int(d)


def _check_resolution(max_resolution):
    if max_resolution is None:
        return None
    ok = isinstance(max_resolution, numbers.Real) and not isinstance(max_resolution, bool)
    if not ok or not (0 < max_resolution <= 0.5 * np.sqrt(3) + 1e-12):
        raise ValueError(
            "max_resolution must be in (0, sqrt(3)/2] cycles per voxel or None, "
            f"got {max_resolution!r}"
        )
    return float(max_resolution)


def _check_angle(name: str, value, low: float = -90.0, high: float = 90.0) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not np.isfinite(value) or not (low <= value <= high):
        raise ValueError(f"{name} must be an angle in [{low:g}, {high:g}] degrees, got {value!r}")
    return float(value)


def _check_range(name_min: str, tilt_min, name_max: str, tilt_max) -> tuple[float, float]:
    a = _check_angle(name_min, tilt_min)
    b = _check_angle(name_max, tilt_max)
    if a >= b:
        raise ValueError(f"{name_min} ({a:g}) must be smaller than {name_max} ({b:g})")
    return a, b


def _rotation_matrices(rotation) -> tuple[np.ndarray, bool]:
    """Matrices of shape (n, 3, 3) and whether the caller gave a single rotation."""
    if rotation is None:
        return np.eye(3)[None], True
    if isinstance(rotation, Rotation):
        return rotation.as_matrix().reshape(-1, 3, 3), bool(rotation.single)
    m = np.asarray(rotation, dtype=np.float64)
    if m.shape == (3, 3):
        single = True
    elif m.ndim == 3 and m.shape[1:] == (3, 3):
        single = False
    else:
        raise ValueError(
            f"rotation must be a Rotation or matrices of shape (3, 3) or (n, 3, 3), "
            f"got shape {m.shape}"
        )
    m = m.reshape(-1, 3, 3)
    if m.size and (
        not np.all(np.isfinite(m))
        or np.max(np.abs(np.einsum("nji,njk->nik", m, m) - np.eye(3))) > _ORTHO_TOL
    ):
        raise ValueError("rotation matrices must be orthogonal (R^T R = I)")
    return m, single


def _sincos(degrees: float) -> tuple[float, float]:
    """sin and cos of an angle in [-90, 90] degrees, exact at 0, +-45 and +-90.

    ``cos t`` is taken as ``sin(90 - |t|)``, so that sin and cos agree to the bit
    at 45 degrees and vanish exactly at 0 and 90 (``np.cos(np.pi / 2)`` does not).
    Ties on the boundary of a wedge or cone then resolve the same way everywhere.
    """
    s = float(np.sin(np.radians(degrees)))
    c = float(np.sin(np.radians(90.0 - abs(degrees))))
    return s, c


# ----------------------------------------------------------------------- geometry


def _band(box_size: int, max_resolution) -> np.ndarray:
    """0 < |q| < max_resolution * D on the half grid (no upper limit for None)."""
    qx, qy, qz = frequency_grid(box_size)
    radius2 = qx * qx + qy * qy + qz * qz
    band = radius2 > 0
    if max_resolution is not None:
        band = band & (radius2 < (max_resolution * box_size) ** 2)
    return band


def _partner_indices(box_size: int) -> np.ndarray:
    """Index along qy (or qz) of the Hermitian partner -q: ``(-k) mod D``."""
    return (-np.arange(box_size)) % box_size


def _symmetrise_planes(out: np.ndarray, box_size: int, how: str = "copy") -> None:
    """Make ``out[..., kz, ky, kx]`` Hermitian-consistent in place.

    Only the ``kx = 0`` plane and, for even D, the ``kx = D/2`` plane contain both
    members of a pair (q, -q). ``how="copy"``: each pair takes the value of the
    member with the lexicographically smaller index ``(kz, ky)``; ``how="and"``: a
    pair is True only if both members are.
    """
    d = box_size
    neg = _partner_indices(d)
    kz = np.arange(d).reshape(d, 1)
    ky = np.arange(d).reshape(1, d)
    first = (kz < neg.reshape(d, 1)) | ((kz == neg.reshape(d, 1)) & (ky <= neg.reshape(1, d)))
    columns = [0] + ([d // 2] if d % 2 == 0 else [])
    for kx in columns:
        plane = out[..., kx]
        partner = plane[..., neg, :][..., :, neg]
        if how == "copy":
            out[..., kx] = np.where(first, plane, partner)
        else:
            out[..., kx] = plane & partner


def _wedge(u: np.ndarray, z: np.ndarray, tilt_min: float, tilt_max: float) -> np.ndarray:
    """Single-axis wedge criterion in the (u, z) plane; True = observed.

    With ``s_t = u sin t + z cos t`` (the 2-D cross product of the imaged direction
    ``(cos t, -sin t)`` with (u, z)) a frequency is observed iff ``s_min`` and
    ``s_max`` do not have the same strict sign. For ``tilt_min <= 0 <= tilt_max``
    this is xmipp's test with ``tg0 = -cot(tilt_max)``, ``tgF = -cot(tilt_min)``,
    each inequality multiplied through by the sine (no infinities at 0 degrees, no
    division at 90); for every range it is the union of the imaged directions.
    Both s are odd in (u, z), so the result is even: the same at q and -q.
    """
    s0, c0 = _sincos(tilt_min)
    s1, c1 = _sincos(tilt_max)
    lo = u * s0 + z * c0
    hi = u * s1 + z * c1
    return ((lo <= 0) & (hi >= 0)) | ((lo >= 0) & (hi <= 0))


@numba.njit(cache=True, nogil=True)
def _turned_frequencies(matrices, q, out):  # pragma: no cover - compiled
    """``out[n, i, m] = sum_j R[n, j, i] q[j, m]`` (the columns of R^T q, float64), with
    values within _SNAP of an integer set to it, so that frequencies on a plane of
    the geometry stay on it. One pass: numpy's five cost ten times the criterion."""
    for n in range(matrices.shape[0]):
        r = matrices[n]
        for m in range(q.shape[1]):
            for i in range(3):
                v = r[0, i] * q[0, m] + r[1, i] * q[1, m] + r[2, i] * q[2, m]
                nearest = np.rint(v)
                out[n, i, m] = nearest if abs(v - nearest) < _SNAP else v


class Mask(abc.ABC):
    """Base class of the missing-data geometries.

    Subclasses implement ``_criterion(x, y, z, box_size)``: for particle-frame
    frequencies (float64 arrays of one shape, Fourier pixels) a boolean array of
    that shape, True where observed. Geometric criteria must be even in (x, y, z).
    Parameters are read-only; masks compare equal when their type and parameters
    are equal, hash accordingly and pickle.
    """

    def observed(self, box_size, rotation=None, max_resolution=0.5) -> np.ndarray:
        """Observed components on the half grid.

        Parameters
        ----------
        box_size : int
            Side D of the cubic box, at least 2.
        rotation : Rotation or ndarray of shape (3, 3) or (n, 3, 3), optional
            Rotate the particle, and so its observed set, by R: q is observed iff
            the geometry holds at ``R^T q``. A single ``Rotation`` or a (3, 3)
            matrix gives one half grid; a ``Rotation`` holding a list of
            rotations (even of length 1) or an (n, 3, 3) stack gives n of them.
        max_resolution : float or None, default=0.5
            In cycles per voxel, in (0, sqrt(3)/2]: components with
            ``|q| >= max_resolution * D`` are unobserved. None sets no limit. The
            DC component is never observed.

        Returns
        -------
        ndarray of bool, shape (D, D, D//2+1) or (n, D, D, D//2+1)
        """
        d = _check_box(box_size)
        max_resolution = _check_resolution(max_resolution)
        self._check_box_size(d)
        matrices, single = _rotation_matrices(rotation)
        band = _band(d, max_resolution)
        if rotation is None:
            qx, qy, qz = frequency_grid(d)
            out = (self._criterion(qx, qy, qz, d) & band)[None]
        else:
            out = self._rotated(matrices, d, np.flatnonzero(band))
        _symmetrise_planes(out, d)
        return out[0] if single else out

    def _rotated(self, matrices: np.ndarray, box_size: int, where: np.ndarray) -> np.ndarray:
        """The criterion at ``R^T q`` for every matrix, shape (n, D, D, D//2+1), at the
        flat half-grid indices ``where`` (the band: about half the grid) and False
        elsewhere."""
        shape = half_grid_shape(box_size)
        q = np.stack([np.broadcast_to(c, shape).ravel()[where] for c in frequency_grid(box_size)])
        out = np.zeros((len(matrices), math.prod(shape)), dtype=bool)
        step = max(1, _BLOCK // max(1, q.shape[1]))
        for start in range(0, len(matrices), step):
            block = np.ascontiguousarray(matrices[start : start + step], dtype=np.float64)
            p = np.empty((len(block), 3, q.shape[1]))
            _turned_frequencies(block, q, p)
            out[start : start + step, where] = self._criterion(
                p[:, 0], p[:, 1], p[:, 2], box_size
            )
        return out.reshape(len(matrices), *shape)

    def _check_box_size(self, box_size: int) -> None:
        """Geometric masks fit any box; :class:`ArrayMask` overrides this."""
        return None

    @abc.abstractmethod
    def _criterion(self, x, y, z, box_size: int) -> np.ndarray:
        """Observed at particle-frame frequencies (x, y, z) (broadcast arrays)."""

    @abc.abstractmethod
    def _params(self) -> dict:
        """The constructor arguments, by name."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return other._params() == self._params()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self._params().items())))

    def __reduce__(self):
        return (type(self), tuple(self._params().values()))


class FullData(Mask):
    """Complete data: every component in the resolution band is observed.

    Examples
    --------
    >>> w = FullData().observed(8)
    >>> bool(w[0, 0, 0]), bool(w[0, 0, 3]), bool(w[0, 0, 4])  # DC, |q| = 3, |q| = 4
    (False, True, False)
    >>> observed_fraction(w, 8)
    1.0
    """

    def _criterion(self, x, y, z, box_size):
        return np.ones(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)), dtype=bool)

    def _params(self) -> dict:
        return {}


class MissingWedge(Mask):
    """Single-axis tilt series: a wedge of Fourier space about qz is missing.

    Parameters
    ----------
    tilt_min, tilt_max : float
        Tilt range in degrees, ``-90 <= tilt_min < tilt_max <= 90``.
    axis : {"y", "x"}, default="y"
        Tilt axis.

    Notes
    -----
    Let (x, y, z) be a frequency in the particle frame and, for ``axis="y"``,
    ``u = x``. The image recorded at tilt t is, by the projection-slice theorem, the
    central section perpendicular to the beam direction
    ``b(t) = (sin t, 0, cos t) = R_y(t) e_z`` (``R_y`` the right-handed rotation
    about y, as in scipy): the plane spanned by the tilt axis and
    ``(cos t, 0, -sin t)``. The observed set is the union of these sections for t in
    ``[tilt_min, tilt_max]``. For ``axis="x"`` replace x by y: the sections contain
    the x axis and ``(0, cos t, -sin t)``, the beam is ``(0, sin t, cos t) =
    R_x(-t) e_z`` (the same formula, hence the opposite handedness about x).

    This is exactly xmipp's criterion: with ``tg0 = -cot(tilt_max)`` and
    ``tgF = -cot(tilt_min)``, q is observed iff ``(z >= 0 and (u <= tg0 z or
    u >= tgF z)) or (z < 0 and (u <= tgF z or u >= tg0 z))``. It is evaluated in
    the equivalent form without cotangents: with ``s_t = u sin t + z cos t``,
    observed iff ``s_min`` and ``s_max`` do not share a strict sign (boundaries
    and the tilt axis count as observed). The two agree for every range with
    ``tilt_min <= 0 <= tilt_max`` (limits of 0 and +-90 included, read as the
    limit from inside the range). For a range that excludes 0, where xmipp's
    formula degenerates (it observes everything), this class keeps the physical
    reading, the union of the sections of the tilts in the range.

    ``MissingWedge(-60, 60)`` misses ``|x| < cot(60) |z|`` whatever y, so 1/3 of
    the resolution ball. For ``(-50, 65)`` the section of a +60 tilt, e.g. the
    direction ``(cos 60, 0, -sin 60)``, is observed and that of a -55 tilt,
    ``(cos 55, 0, sin 55)``, is missing. ``(-90, 90)`` observes everything but DC.

    Examples
    --------
    >>> w = MissingWedge(-60, 60).observed(32)
    >>> round(observed_fraction(w, 32), 2)
    0.67
    """

    def __init__(self, tilt_min=-60.0, tilt_max=60.0, axis="y"):
        self._tilt_min, self._tilt_max = _check_range("tilt_min", tilt_min, "tilt_max", tilt_max)
        if axis not in ("x", "y"):
            raise ValueError(f"axis must be 'y' or 'x', got {axis!r}")
        self._axis = str(axis)

    @property
    def tilt_min(self) -> float:
        """Lower limit of the tilt range, degrees."""
        return self._tilt_min

    @property
    def tilt_max(self) -> float:
        """Upper limit of the tilt range, degrees."""
        return self._tilt_max

    @property
    def axis(self) -> str:
        """Tilt axis, "y" or "x"."""
        return self._axis

    def _params(self) -> dict:
        return {"tilt_min": self._tilt_min, "tilt_max": self._tilt_max, "axis": self._axis}

    def _criterion(self, x, y, z, box_size):
        u = x if self._axis == "y" else y
        return _wedge(u, z, self._tilt_min, self._tilt_max)


class MissingPyramid(Mask):
    """Dual-axis tilt series: observed where either single-axis wedge observes.

    The missing region is the intersection of the wedges of the two series, a
    pyramid about qz (xmipp's ``pyramid``).

    Parameters
    ----------
    tilt_min_y, tilt_max_y : float, default=-60, 60
        Tilt range of the series about y, degrees (as :class:`MissingWedge`).
    tilt_min_x, tilt_max_x : float, default=-60, 60
        Tilt range of the series about x, degrees.
    """

    def __init__(self, tilt_min_y=-60.0, tilt_max_y=60.0, tilt_min_x=-60.0, tilt_max_x=60.0):
        self._y = _check_range("tilt_min_y", tilt_min_y, "tilt_max_y", tilt_max_y)
        self._x = _check_range("tilt_min_x", tilt_min_x, "tilt_max_x", tilt_max_x)

    @property
    def tilt_min_y(self) -> float:
        """Lower limit of the series about y, degrees."""
        return self._y[0]

    @property
    def tilt_max_y(self) -> float:
        """Upper limit of the series about y, degrees."""
        return self._y[1]

    @property
    def tilt_min_x(self) -> float:
        """Lower limit of the series about x, degrees."""
        return self._x[0]

    @property
    def tilt_max_x(self) -> float:
        """Upper limit of the series about x, degrees."""
        return self._x[1]

    def _params(self) -> dict:
        return {
            "tilt_min_y": self._y[0],
            "tilt_max_y": self._y[1],
            "tilt_min_x": self._x[0],
            "tilt_max_x": self._x[1],
        }

    def _criterion(self, x, y, z, box_size):
        return _wedge(x, z, *self._y) | _wedge(y, z, *self._x)


class MissingCone(Mask):
    """Random conical tilt: a cone about qz is missing.

    Observed iff ``x^2 + y^2 >= (cot(tilt) z)^2``, evaluated as
    ``(x^2 + y^2) sin^2(tilt) >= z^2 cos^2(tilt)`` (xmipp's ``cone``). The missing
    cone has half-angle ``90 - tilt`` about qz, so the observed fraction of the
    resolution ball is ``cos(90 - tilt) = sin(tilt)`` (0.707 at 45 degrees).

    Parameters
    ----------
    tilt : float, default=45
        Tilt angle of the conical series in degrees, in (0, 90]; 90 observes
        everything.
    """

    def __init__(self, tilt=45.0):
        value = _check_angle("tilt", tilt, 0.0, 90.0)
        if value == 0:
            raise ValueError(f"tilt must be in (0, 90] degrees, got {tilt!r}")
        self._tilt = value

    @property
    def tilt(self) -> float:
        """Tilt angle, degrees."""
        return self._tilt

    def _params(self) -> dict:
        return {"tilt": self._tilt}

    def _criterion(self, x, y, z, box_size):
        s, c = _sincos(self._tilt)
        return (x * x + y * y) * (s * s) >= (z * z) * (c * c)


class ArrayMask(Mask):
    """An observed set given as a boolean half grid (True = observed).

    Parameters
    ----------
    array : array-like of shape (D, D, D//2+1)
        Boolean, or numbers that are all 0 or 1, on the half grid of a box of side
        D >= 2 (odd or even). A pair (q, -q) present twice on the half grid (the
        ``qx = 0`` and, for even D, ``qx = D/2`` planes) counts as observed only
        if both entries are True, so the stored mask is Hermitian-consistent.

    Notes
    -----
    ``observed(D, rotation=R)`` takes, at q, the stored value at the nearest grid
    point ``round(R^T q)``; a point with negative qx is read at its Hermitian
    partner, and a point outside the box (a coordinate beyond ``D//2`` in absolute
    value; for even D the Nyquist index holds both -D/2 and D/2) is unobserved.
    This is exact for the 24 rotations of the cube. The result is intersected with
    the resolution band like every mask.
    """

    def __init__(self, array):
        a = np.asarray(array)
        if a.ndim != 3:
            raise ValueError(
                f"array must be a 3-D half grid of shape (D, D, D//2+1), got ndim {a.ndim} "
                f"(shape {a.shape})"
            )
        d = a.shape[0]
        if a.shape != half_grid_shape(d) or d < 2:
            raise ValueError(
                f"array has a non-cubic or non-half-grid shape {a.shape}: expected "
                f"(D, D, D//2+1) with D >= 2"
            )
        if a.dtype != bool:
            if a.dtype == object or not np.issubdtype(a.dtype, np.number):
                raise ValueError(f"array must be boolean or numeric 0/1, got dtype {a.dtype}")
            if not np.all((a == 0) | (a == 1)):
                raise ValueError("array must be boolean, or numeric holding only 0 and 1")
        stored = np.array(a, dtype=bool)
        _symmetrise_planes(stored, d, how="and")
        stored.flags.writeable = False
        self._array = stored

    @property
    def array(self) -> np.ndarray:
        """The stored half grid (read-only, boolean)."""
        return self._array

    @property
    def box_size(self) -> int:
        """Side D of the box the array describes."""
        return self._array.shape[0]

    def _params(self) -> dict:
        return {"array": self._array}

    def __repr__(self) -> str:
        n = int(np.count_nonzero(self._array))
        return f"ArrayMask(<bool array of shape {self._array.shape}, {n} True>)"

    def __eq__(self, other) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return np.array_equal(other._array, self._array)

    def __hash__(self) -> int:
        return hash((self._array.shape, np.packbits(self._array).tobytes()))

    def __reduce__(self):
        return (ArrayMask, (np.array(self._array),))

    def _check_box_size(self, box_size):
        if box_size != self.box_size:
            raise ValueError(
                f"box_size {box_size} does not match the mask's half-grid shape "
                f"{self._array.shape} (box size {self.box_size})"
            )

    def _criterion(self, x, y, z, box_size):
        d = box_size
        x, y, z = np.broadcast_arrays(np.rint(x), np.rint(y), np.rint(z))
        # The half grid stores qx >= 0; -p holds the same value (Hermitian symmetry).
        flip = x < 0
        x = np.where(flip, -x, x)
        y = np.where(flip, -y, y)
        z = np.where(flip, -z, z)
        half = d // 2
        inside = (x <= half) & (np.abs(y) <= half) & (np.abs(z) <= half)
        ix = np.where(inside, x, 0).astype(np.intp)
        iy = np.where(inside, y, 0).astype(np.intp) % d
        iz = np.where(inside, z, 0).astype(np.intp) % d
        return self._array[iz, iy, ix] & inside


def observed_fraction(mask_array, box_size, max_resolution=0.5):
    """Fraction of the full-grid components inside the band that a mask observes.

    Parameters
    ----------
    mask_array : array-like of bool, shape (..., D, D, D//2+1)
        Half-grid masks, e.g. from :meth:`Mask.observed`.
    box_size : int
        D.
    max_resolution : float or None, default=0.5
        The band ``0 < |q| < max_resolution * D`` (no upper limit for None).

    Returns
    -------
    float, or ndarray of the leading shape for a stack
        Both counts run over the full D^3 grid: a half-grid column with a Hermitian
        partner counts twice (:func:`mlsubtomo.fft.hermitian_multiplicity`).
    """
    d = _check_box(box_size)
    max_resolution = _check_resolution(max_resolution)
    a = np.asarray(mask_array, dtype=bool)
    if a.shape[-3:] != half_grid_shape(d):
        raise ValueError(
            f"mask_array must have trailing shape {half_grid_shape(d)} for box_size {d}, "
            f"got {a.shape}"
        )
    weights = _band(d, max_resolution) * hermitian_multiplicity(d)
    fraction = np.sum(a * weights, axis=(-3, -2, -1)) / np.sum(weights)
    return float(fraction) if fraction.ndim == 0 else fraction
