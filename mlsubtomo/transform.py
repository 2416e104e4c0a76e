"""Real-space geometry of volumes and the one place Euler angles are converted.

A rotation R is a 3x3 matrix acting on ``(x, y, z)`` column vectors about the box
centre ``c = (D//2, D//2, D//2)``; rotating a volume V by R gives
``(R V)(r) = V(R^T (r - c) + c)``. Shifting by an integer vector t gives
``(S_t V)(r) = V(r - t)`` on the circular grid. Volumes are indexed ``[z, y, x]``.
"""

from __future__ import annotations

import functools
import warnings

import numba
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

__all__ = [
    "affine_parameters",
    "boundary_index",
    "centre_for_fft",
    "euler_from_matrix",
    "matrix_from_euler",
    "outside_value",
    "rotate_centred",
    "rotate_volume",
    "shift_volume",
    "uncentre_from_fft",
]

# Matrix entries closer than this to an integer snap onto it, so that rotations
# mapping the grid onto itself (the 24 of the cube) are exact despite round-off.
_SNAP = 1e-6


def matrix_from_euler(angles) -> np.ndarray:
    """Rotation matrices from ZYZ Euler angles (rot, tilt, psi) in degrees, as RELION writes them.

    The returned R is the matrix of the public API: ``X(r) = A(R^T (r - t))``. It is
    the transpose of the RELION/Xmipp matrix ``E = Rz(psi) Ry(tilt) Rz(rot)``, which
    brings the reference into the particle frame as ``A(E r)``.

    Parameters
    ----------
    angles : array-like of shape (3,) or (n, 3)

    Returns
    -------
    ndarray of shape (3, 3) or (n, 3, 3)
    """
    return Rotation.from_euler("ZYZ", np.asarray(angles, dtype=float), degrees=True).as_matrix()


def euler_from_matrix(matrices) -> np.ndarray:
    """Inverse of :func:`matrix_from_euler`: (rot, tilt, psi) in degrees, tilt in [0, 180].

    At tilt 0 or 180 only rot + psi (or rot - psi) is defined; psi is then set to 0.
    """
    rotation = Rotation.from_matrix(np.asarray(matrices, dtype=float))
    with warnings.catch_warnings():
        # Gimbal lock is expected at tilt 0 and 180 and handled as documented.
        warnings.filterwarnings("ignore", message="Gimbal lock", category=UserWarning)
        return rotation.as_euler("ZYZ", degrees=True)


def rotate_volume(volume: np.ndarray, matrix: np.ndarray, order: int = 1) -> np.ndarray:
    """Rotate a ``[z, y, x]`` volume by R about voxel ``(D//2, D//2, D//2)``.

    Parameters
    ----------
    volume : ndarray of shape (D, D, D)
    matrix : ndarray of shape (3, 3)
        Acts on ``(x, y, z)``; the output is ``V(R^T (r - c) + c)``.
    order : int, default=1
        Spline order of the interpolation (1 is trilinear). Matrices whose entries
        are integers (the 24 rotations of the cube) move voxels exactly, for every order.

    Returns
    -------
    ndarray of shape (D, D, D), same dtype as ``volume``. Positions outside the box
    take :func:`outside_value`: the grid does not wrap (xmipp's DONT_WRAP), since a
    wrapped grid fills the corners of the rotated box with the far side of the
    particle (up to 30% of a 32^3 GroEL-GroES phantom's norm).
    """
    volume = np.asarray(volume)
    return uncentre_from_fft(rotate_centred(centre_for_fft(volume), matrix, order))


def rotate_centred(volumes: np.ndarray, matrix: np.ndarray, order: int = 1) -> np.ndarray:
    """:func:`rotate_volume` for volumes stored as :func:`centre_for_fft` leaves them.

    With the rotation centre at index 0 the rotation needs no shift of the grid,
    so the transforms of the kernel go in and out without rolling.

    Parameters
    ----------
    volumes : ndarray of shape (..., D, D, D)
        Each rotated by the same matrix.
    matrix : ndarray of shape (3, 3)
    order : int, default=1

    Returns
    -------
    ndarray of the shape and dtype of ``volumes``, in the same layout.
    """
    volumes = np.asarray(volumes)
    d = volumes.shape[-1]
    outside = outside_value(volumes, centred=True)
    m, offset = affine_parameters(matrix, d)
    if order == 1:
        flat = np.ascontiguousarray(volumes).reshape(-1, d, d, d)
        out = np.empty_like(flat)
        _trilinear_centred(flat, m, outside.reshape(-1), out)
        return out.reshape(volumes.shape)
    # Higher orders need the spline prefilter: scipy's, about the box centre.
    out = np.empty_like(volumes)
    for index in np.ndindex(volumes.shape[:-3]):
        out[index] = centre_for_fft(ndimage.affine_transform(
            uncentre_from_fft(volumes[index]), m, offset=offset,
            order=order, mode="grid-constant", cval=float(outside[index]),
            prefilter=True,
        ))
    return out


def affine_parameters(matrix: np.ndarray, box_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``matrix`` and ``offset`` of ``scipy.ndimage.affine_transform`` (or CuPy's)
    that rotate an uncentred ``[z, y, x]`` volume of ``box_size`` by R about its centre.

    Entries within ``_SNAP`` of an integer are snapped onto it.
    """
    # The voxel at index j (signed, j = 0 the centre) takes the value at M j, where
    # M is R^T with the axes reversed to (z, y, x).
    m = np.asarray(matrix, dtype=np.float64).T[::-1, ::-1]
    nearest = np.rint(m)
    m = np.ascontiguousarray(np.where(np.abs(m - nearest) < _SNAP, nearest, m))
    c = float(box_size // 2)
    return m, c - m.sum(axis=1) * c


def outside_value(volumes: np.ndarray, centred: bool = False) -> np.ndarray:
    """What a rotation puts where its source lies outside the box: the mean of the
    box's boundary voxels (its six faces), one per volume of ``volumes`` (..., D, D, D).

    xmipp takes the first (corner) voxel. In a noisy class average that single
    voxel's noise then fills the whole region outside, a low-frequency pattern that
    made classification with the true orientations fail (purity 0.72 against 0.98,
    60 particles, D = 16, SNR 0.1); the faces' mean is the same background level
    with the noise of ``6 D^2`` voxels averaged. ``centred``: the volumes are laid out
    as :func:`centre_for_fft` leaves them.
    """
    volumes = np.asarray(volumes)
    d = volumes.shape[-1]
    flat = np.ascontiguousarray(volumes).reshape(-1, d**3)
    out = np.empty(len(flat))
    _mean_at(flat, boundary_index(d, centred), out)
    return out.reshape(volumes.shape[:-3])


@numba.njit(cache=True, nogil=True)
def _mean_at(flat, index, out):  # pragma: no cover - compiled
    """``out[v]``: the mean of ``flat[v, index]``, in float64. Compiled so that it
    runs without the GIL: numpy's gather and mean held it in every rotation of the
    kernel's threads."""
    for v in range(flat.shape[0]):
        total = 0.0
        for i in index:
            total += flat[v, i]
        out[v] = total / len(index)


@functools.lru_cache(maxsize=16)
def boundary_index(d: int, centred: bool) -> np.ndarray:
    """Flat indices of the boundary voxels of a D^3 box; every rotation of the kernel
    reads them, and building the boolean box each time cost most of the mean."""
    first, last = ((d - d // 2) % d, d - d // 2 - 1) if centred else (0, d - 1)
    boundary = np.zeros((d, d, d), dtype=bool)
    boundary[[first, last]] = True
    boundary[:, [first, last]] = True
    boundary[:, :, [first, last]] = True
    index = np.flatnonzero(boundary)
    index.flags.writeable = False
    return index


def shift_volume(volume: np.ndarray, shift) -> np.ndarray:
    """Circularly shift a volume's content by an integer vector ``(x, y, z)``: ``V(r - t)``."""
    t = np.asarray(shift)
    if t.shape != (3,) or not np.allclose(t, np.rint(t)):
        raise ValueError(f"shift must be three integers (x, y, z), got {shift!r}")
    tx, ty, tz = (int(v) for v in np.rint(t))
    return np.roll(volume, (tz, ty, tx), axis=(-3, -2, -1))


def centre_for_fft(volumes: np.ndarray) -> np.ndarray:
    """Move voxel ``D//2`` to index 0 along the last three axes.

    Fourier transforms of the result have the rotation centre at the origin, so
    rotating the volume about its centre rotates its transform without a phase
    ramp: ``(R V)^(q) = V^(R^T q)``.
    """
    d = volumes.shape[-1]
    return np.roll(volumes, (-(d // 2),) * 3, axis=(-3, -2, -1))


def uncentre_from_fft(volumes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`centre_for_fft`."""
    d = volumes.shape[-1]
    return np.roll(volumes, (d // 2,) * 3, axis=(-3, -2, -1))


@numba.njit(cache=True, nogil=True)
def _trilinear_centred(volumes, m, outside, out):  # pragma: no cover - compiled
    """Trilinear interpolation, the same arithmetic as scipy's ``affine_transform(order=1,
    mode="grid-constant", cval=outside[c])`` in a fraction of its time; the corner
    weights are shared by the volumes.

    The volumes are first copied, uncentred, into a box one voxel wider on every side
    whose rim holds the outside value: a neighbour outside the box then reads that
    value, so the sampling loop wraps no index and tests one range per axis: against
    clipping each neighbour's weight, 2.1 times as fast for one volume and 1.3 times
    for four, at D = 16 to 32.
    """
    n, d = volumes.shape[0], volumes.shape[-1]
    half = d // 2
    padded = np.empty((n, d + 2, d + 2, d + 2), dtype=volumes.dtype)
    upper = d - half
    # uncentre_from_fft and the rim in one pass (numpy's roll and a padded copy cost
    # a sixth of the rotation of one 32^3 volume). Centred indices below ``upper``
    # hold signed positions 0.., the others -half..-1: two runs per axis, (first,
    # stop, first padded index), each copied as one slice.
    runs = ((0, upper, half + 1), (upper, d, 1))
    for c in range(n):
        padded[c] = outside[c]
        for z0, z1, pz in runs:
            for y0, y1, py in runs:
                for x0, x1, px in runs:
                    padded[c, pz:pz + z1 - z0, py:py + y1 - y0, px:px + x1 - x0] = (
                        volumes[c, z0:z1, y0:y1, x0:x1]
                    )
    # Added before truncating, so that int() floors: |sample| < sqrt(3) d / 2 < 2 d.
    # The sample at signed position s has its lower neighbour at padded index
    # floor(s) + half + 1, inside the padded box for floor(s) in [-half - 1, d - half - 1].
    lift = 2 * d
    start = half + 1 + lift
    for oz in range(d):
        jz = oz if oz < upper else oz - d
        for oy in range(d):
            jy = oy if oy < upper else oy - d
            bz = m[0, 0] * jz + m[0, 1] * jy + start
            by = m[1, 0] * jz + m[1, 1] * jy + start
            bx = m[2, 0] * jz + m[2, 1] * jy + start
            for ox in range(d):
                jx = ox if ox < upper else ox - d
                sz = bz + m[0, 2] * jx
                sy = by + m[1, 2] * jx
                sx = bx + m[2, 2] * jx
                tz, ty, tx = int(sz), int(sy), int(sx)
                wz, wy, wx = sz - tz, sy - ty, sx - tx
                iz, iy, ix = tz - lift, ty - lift, tx - lift
                if 0 <= iz <= d and 0 <= iy <= d and 0 <= ix <= d:
                    for c in range(n):
                        out[c, oz, oy, ox] = trilinear_corners(
                            padded[c], iz, iz + 1, iy, iy + 1, ix, ix + 1,
                            1 - wz, wz, 1 - wy, wy, 1 - wx, wx,
                        )
                else:
                    for c in range(n):
                        out[c, oz, oy, ox] = outside[c]


@numba.njit(cache=True, inline="always")
def trilinear_corners(
    v, z0, z1, y0, y1, x0, x1, az0, az1, ay0, ay1, ax0, ax1
):  # pragma: no cover - compiled
    """Trilinear interpolation of the 3D array ``v`` (real or complex) from its eight
    corners ``(z0|z1, y0|y1, x0|x1)``, with weights ``a`` per corner and axis."""
    near = (v[z0, y0, x0] * ax0 + v[z0, y0, x1] * ax1) * ay0 + (
        v[z0, y1, x0] * ax0 + v[z0, y1, x1] * ax1
    ) * ay1
    far = (v[z1, y0, x0] * ax0 + v[z1, y0, x1] * ax1) * ay0 + (
        v[z1, y1, x0] * ax0 + v[z1, y1, x1] * ax1
    ) * ay1
    return near * az0 + far * az1
