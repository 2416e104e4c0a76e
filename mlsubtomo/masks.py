"""Fourier-space missing-data geometry: which components of a particle were observed.

A mask answers ``observed(box_size, rotation, max_resolution)``: a boolean half grid
``(D, D, D//2 + 1)`` (rfftn layout, axes ``[qz, qy, qx]``), True where the component
was measured. With a rotation R it describes the particle rotated by R: frequency q
is observed iff the geometry holds at ``R^T q``. DC and every ``|q| >= max_resolution
* D`` (Fourier pixels) are never observed.

The wedge, pyramid and cone follow xmipp_ml_tomo's geometry (reference section 1)
so that results compare with xmipp's. For a single-axis tilt series about y with
tilt range (a, b), the image at tilt t is the central section perpendicular to the
beam direction ``(sin t, 0, cos t)`` in the particle frame; the observed set is the
union of these sections (see :class:`MissingWedge`).
"""

from __future__ import annotations

import numbers

import numpy as np
from scipy.spatial.transform import Rotation

from .fft import frequency_grid, half_grid_shape, hermitian_multiplicity

# Angles within this many degrees of a range limit count as inside it (the limits
# are inclusive, as in xmipp).
_ANGLE_TOL = 1e-9

__all__ = [
    "ArrayMask",
    "FullData",
    "Mask",
    "MissingCone",
    "MissingPyramid",
    "MissingWedge",
    "observed_fraction",
]


def _check_box(box_size) -> int:
    if not isinstance(box_size, numbers.Integral) or isinstance(box_size, bool) or box_size < 2:
        raise ValueError(f"box_size must be an integer >= 2, got {box_size!r}")
    return int(box_size)


def _check_resolution(max_resolution):
    if max_resolution is None:
        return None
    ok = isinstance(max_resolution, numbers.Real) and not isinstance(max_resolution, bool)
    if not ok or not (0 < max_resolution <= 0.5 * np.sqrt(3) + 1e-12):
        raise ValueError(
            f"max_resolution must be in (0, sqrt(3)/2] cycles per voxel or None, "
            f"got {max_resolution!r}"
        )
    return float(max_resolution)


def _check_angle(name, value, low=-90.0, high=90.0):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or not (low <= value <= high):
        raise ValueError(f"{name} must be an angle in [{low:g}, {high:g}] degrees, got {value!r}")
    return float(value)


def _check_range(name_min, tilt_min, name_max, tilt_max):
    a = _check_angle(name_min, tilt_min)
    b = _check_angle(name_max, tilt_max)
    if a >= b:
        raise ValueError(f"{name_min} ({a:g}) must be smaller than {name_max} ({b:g})")
    return a, b


def _rotation_matrices(rotation):
    """(matrices of shape (n, 3, 3), whether the caller gave a single rotation)."""
    if rotation is None:
        return np.eye(3)[None], True
    if isinstance(rotation, Rotation):
        return rotation.as_matrix().reshape(-1, 3, 3), rotation.single
    m = np.asarray(rotation, dtype=np.float64)
    if m.shape == (3, 3):
        return m[None], True
    if m.ndim == 3 and m.shape[1:] == (3, 3):
        return m, False
    raise ValueError(f"rotation must be a Rotation or (3, 3) / (n, 3, 3) matrices, got {m.shape}")


class Mask:
    """Base class of the missing-data geometries.

    Subclasses implement ``_criterion(p, box_size)``: for particle-frame frequencies
    ``p`` of shape (3, M) (rows x, y, z in Fourier pixels) a boolean array (M,),
    True where observed. It must be symmetric under ``p -> -p``.
    """

    def observed(self, box_size, rotation=None, max_resolution=0.5) -> np.ndarray:
        """Observed components on the half grid.

        Parameters
        ----------
        box_size : int
            Side D of the cubic box.
        rotation : Rotation or ndarray of shape (3, 3) or (n, 3, 3), optional
            Rotate the particle (and so its observed set) by R: q is observed iff
            the geometry holds at ``R^T q``.
        max_resolution : float or None, default=0.5
            Components with ``|q| >= max_resolution * D`` are unobserved; None keeps
            every frequency but DC.

        Returns
        -------
        ndarray of bool, shape (D, D, D//2+1), or (n, D, D, D//2+1) for a
        Rotation holding several rotations or a stack of matrices.
        """
        d = _check_box(box_size)
        max_resolution = _check_resolution(max_resolution)
        self._check_box_size(d)
        matrices, single = _rotation_matrices(rotation)
        qx, qy, qz = frequency_grid(d)
        shape = half_grid_shape(d)
        q = np.stack([np.broadcast_to(c, shape).ravel() for c in (qx, qy, qz)])
        radius2 = np.sum(q * q, axis=0)
        band = radius2 > 0
        if max_resolution is not None:
            band &= radius2 < (max_resolution * d) ** 2
        out = np.empty((len(matrices), *shape), dtype=bool)
        for i, matrix in enumerate(matrices):
            # R^T q for every column q; the matrix acts on (x, y, z).
            p = matrix.T @ q
            out[i] = (self._criterion(p, d) & band).reshape(shape)
        return out[0] if single else out

    def _check_box_size(self, box_size: int) -> None:
        """Geometric masks fit any box."""

    def _criterion(self, p: np.ndarray, box_size: int) -> np.ndarray:
        raise NotImplementedError

    def _params(self) -> dict:
        return dict(vars(self))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other._params() == self._params()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self._params().items()))))


class FullData(Mask):
    """Every component observed (within the resolution band, DC excluded)."""

    def _criterion(self, p, box_size):
        return np.ones(p.shape[1], dtype=bool)


def _wedge_criterion(u, z, tilt_min, tilt_max):
    """Single-axis criterion in the (u, z) plane, u = qx (tilt axis y) or qy (axis x).

    The direction ``(u, z) = (cos t, -sin t)`` is imaged at tilt t. For ranges that
    contain 0 this is xmipp's test (observed iff, for z >= 0, ``u <= -cot(tilt_max) z``
    or ``u >= -cot(tilt_min) z``); written with the angle itself it also holds for
    ranges that do not contain 0 and for limits of 0 and +-90 degrees, where the
    cotangents are infinite. Folding q onto z >= 0 first makes the result
    identical for q and -q (Hermitian-consistent) despite round-off.
    """
    flip = z < 0
    u = np.where(flip, -u, u)
    z = np.where(flip, -z, z)
    # atan2(-z, u) lies in [-180, 0] for z >= 0; fold it into [-90, 90].
    angle = np.degrees(np.arctan2(-z, u))
    angle = np.where(angle < -90.0, angle + 180.0, angle)
    inside = (angle >= tilt_min - _ANGLE_TOL) & (angle <= tilt_max + _ANGLE_TOL)
    # Direction -90 (u = 0) is also +90.
    inside |= (angle <= -90.0 + _ANGLE_TOL) & (tilt_max >= 90.0 - _ANGLE_TOL)
    # The tilt axis itself (u = z = 0) lies in every imaged section.
    return inside | ((u == 0) & (z == 0))


class MissingWedge(Mask):
    """Single-axis tilt series: the wedge about the other in-plane axis is missing.

    Parameters
    ----------
    tilt_min, tilt_max : float
        Tilt range in degrees, ``-90 <= tilt_min < tilt_max <= 90``.
    axis : {"y", "x"}, default="y"
        Tilt axis.

    Notes
    -----
    xmipp's criterion (tilt axis y): a frequency with ``qz > 0`` is observed iff
    ``qx <= -cot(tilt_max) qz`` or ``qx >= -cot(tilt_min) qz``. Equivalently, the
    direction ``(qx, qz) = (cos t, -sin t)`` is observed iff t (taken modulo 180 into
    [-90, 90]) lies in ``[tilt_min, tilt_max]``: it is the in-plane direction of the
    central section imaged at tilt t, whose beam runs along ``(sin t, 0, cos t)``.
    ``MissingWedge(-60, 60)`` misses ``|qx| < cot(60) |qz|`` whatever qy; for the
    asymmetric range (-50, 65) the section of a +60 tilt is observed and that of a
    -55 tilt is missing. With ``axis="x"`` the same holds with qy in place of qx.
    """

    def __init__(self, tilt_min=-60.0, tilt_max=60.0, axis="y"):
        self.tilt_min = tilt_min
        self.tilt_max = tilt_max
        self.axis = axis
        self._validate()

    def _validate(self):
        _check_range("tilt_min", self.tilt_min, "tilt_max", self.tilt_max)
        if self.axis not in ("x", "y"):
            raise ValueError(f"axis must be 'x' or 'y', got {self.axis!r}")

    def _criterion(self, p, box_size):
        u = p[0] if self.axis == "y" else p[1]
        return _wedge_criterion(u, p[2], self.tilt_min, self.tilt_max)


class MissingPyramid(Mask):
    """Dual-axis tilt series: observed where either single-axis wedge observes.

    Parameters
    ----------
    tilt_min_y, tilt_max_y : float
        Tilt range about y, degrees.
    tilt_min_x, tilt_max_x : float
        Tilt range about x, degrees.
    """

    def __init__(self, tilt_min_y=-60.0, tilt_max_y=60.0, tilt_min_x=-60.0, tilt_max_x=60.0):
        self.tilt_min_y = tilt_min_y
        self.tilt_max_y = tilt_max_y
        self.tilt_min_x = tilt_min_x
        self.tilt_max_x = tilt_max_x
        _check_range("tilt_min_y", tilt_min_y, "tilt_max_y", tilt_max_y)
        _check_range("tilt_min_x", tilt_min_x, "tilt_max_x", tilt_max_x)

    def _criterion(self, p, box_size):
        about_y = _wedge_criterion(p[0], p[2], self.tilt_min_y, self.tilt_max_y)
        about_x = _wedge_criterion(p[1], p[2], self.tilt_min_x, self.tilt_max_x)
        return about_y | about_x


class MissingCone(Mask):
    """Random conical tilt: the cone of half-angle ``90 - tilt`` about qz is missing.

    Observed iff ``qx^2 + qy^2 >= (cot(tilt) qz)^2``.

    Parameters
    ----------
    tilt : float
        Tilt angle of the conical series in degrees, in (0, 90].
    """

    def __init__(self, tilt=45.0):
        self.tilt = tilt
        value = _check_angle("tilt", tilt, 0.0, 90.0)
        if value == 0:
            raise ValueError("tilt must be in (0, 90] degrees, got 0")

    def _criterion(self, p, box_size):
        t = np.radians(self.tilt)
        # (x^2 + y^2) sin^2 t >= z^2 cos^2 t avoids cot at 90 degrees.
        return (p[0] ** 2 + p[1] ** 2) * np.sin(t) ** 2 >= p[2] ** 2 * np.cos(t) ** 2


class ArrayMask(Mask):
    """Any observed set given as a boolean half grid (True = observed).

    Rotated copies use nearest-neighbour lookup, exact for the 24 rotations of
    the cube.

    Parameters
    ----------
    array : array-like of bool, shape (D, D, D//2+1)
    """

    def __init__(self, array):
        a = np.asarray(array)
        if a.ndim != 3:
            raise ValueError(f"array must be a 3-D half grid (D, D, D//2+1), got shape {a.shape}")
        d = a.shape[0]
        if a.shape[1] != d or a.shape[2] not in (d // 2 + 1,) or d < 2:
            raise ValueError(
                f"array has non-cubic or non-half-grid shape {a.shape}; expected "
                f"(D, D, D//2+1)"
            )
        if a.dtype != bool:
            if not np.all(np.isin(a, (0, 1))):
                raise ValueError("array must be boolean (or hold only 0 and 1)")
            a = a.astype(bool)
        self.array = a.copy()
        self.array.flags.writeable = False

    def _params(self) -> dict:
        return {"shape": self.array.shape}

    def __repr__(self) -> str:
        return f"ArrayMask(shape={self.array.shape}, observed={int(self.array.sum())})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ArrayMask) and np.array_equal(other.array, self.array)

    def __hash__(self) -> int:
        return hash(np.packbits(self.array).tobytes())

    def __reduce__(self):
        return (ArrayMask, (np.array(self.array),))

    def _check_box_size(self, box_size):
        if box_size != self.array.shape[0]:
            raise ValueError(
                f"box_size {box_size} does not match the mask's shape {self.array.shape}"
            )

    def _criterion(self, p, box_size):
        d = box_size
        r = np.rint(p).astype(np.int64)
        # The half grid stores qx >= 0; -q holds the same value (Hermitian symmetry).
        flip = r[0] < 0
        r[:, flip] *= -1
        half = d // 2
        # Frequencies beyond the stored range (possible after rotation) are unobserved;
        # for even D the range is -D/2 .. D/2 - 1 along qy, qz and 0 .. D/2 along qx.
        low = -half
        high = half if d % 2 else half - 1
        inside = (r[1] >= low) & (r[1] <= high) & (r[2] >= low) & (r[2] <= high)
        inside &= r[0] <= half
        out = np.zeros(p.shape[1], dtype=bool)
        idx = np.flatnonzero(inside)
        out[idx] = self.array[r[2, idx] % d, r[1, idx] % d, r[0, idx]]
        return out


def observed_fraction(mask_array: np.ndarray, box_size: int, max_resolution=0.5) -> float:
    """Fraction of the full-grid components inside the band that ``mask_array`` observes."""
    d = _check_box(box_size)
    band = FullData().observed(d, max_resolution=max_resolution)
    weights = hermitian_multiplicity(d)
    total = np.sum(band * weights)
    return float(np.sum((np.asarray(mask_array, dtype=bool) & band) * weights) / total)
