"""Real-space geometry of volumes and the one place Euler angles are converted.

A rotation R is a 3x3 matrix acting on ``(x, y, z)`` column vectors about the box
centre ``c = (D//2, D//2, D//2)``; rotating a volume V by R gives
``(R V)(r) = V(R^T (r - c) + c)``. Shifting by an integer vector t gives
``(S_t V)(r) = V(r - t)`` on the circular grid. Volumes are indexed ``[z, y, x]``.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

__all__ = [
    "centre_for_fft",
    "euler_from_matrix",
    "matrix_from_euler",
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
    ndarray of shape (D, D, D), same dtype as ``volume``; the grid wraps circularly.
    """
    volume = np.asarray(volume)
    d = volume.shape[-1]
    # affine_transform samples input[M o + offset] at output index o = (z, y, x):
    # M is R^T with the axes reversed, and the centre stays fixed.
    m = np.asarray(matrix, dtype=np.float64).T[::-1, ::-1]
    nearest = np.rint(m)
    m = np.where(np.abs(m - nearest) < _SNAP, nearest, m)
    c = float(d // 2)
    out = ndimage.affine_transform(
        volume, m, offset=c - m.sum(axis=1) * c, order=order, mode="grid-wrap",
        prefilter=order > 1,
    )
    return out.astype(volume.dtype, copy=False)


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
