"""Figures of merit: class purity, orientation error and Fourier shell correlation."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.transform import Rotation

from .fft import frequency_grid, hermitian_multiplicity
from .sampling import nearest_grid_index

__all__ = [
    "class_purity",
    "classified_orientation_errors",
    "fsc",
    "fsc_resolution",
    "orientation_errors",
]


def class_purity(labels_true, labels_pred) -> float:
    """Fraction of particles in the right class under the best matching of classes.

    Classes found are matched one-to-one to true classes so as to maximise the
    number of agreeing particles (Hungarian algorithm); class numbers are arbitrary.

    Examples
    --------
    >>> class_purity([0, 0, 1, 1], [1, 1, 0, 0])
    1.0
    """
    t = np.asarray(labels_true).ravel()
    p = np.asarray(labels_pred).ravel()
    if t.shape != p.shape:
        raise ValueError(f"labels_true and labels_pred differ in length: {t.size} != {p.size}")
    if t.size == 0:
        raise ValueError("labels_true is empty")
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    table = np.zeros((ti.max() + 1, pi.max() + 1), dtype=np.int64)
    np.add.at(table, (ti, pi), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / t.size)


def orientation_errors(
    rotations_true, rotations_pred, symmetry_matrices=None, grid=None
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Angular error in degrees of each particle's orientation, up to one global rotation.

    A reference-free run recovers a class average in an arbitrary orientation, so
    its orientations are ``R_true g G`` at best, for one unknown G and any element
    g of the true structure's point group. Each particle's ``R_true^T R_pred`` is
    tried as G, the one with the smallest median error is kept and refined as the
    mean over particles; the error of particle i is the angle of
    ``(R_true_i g G)^T R_pred_i`` minimised over g.

    Parameters
    ----------
    rotations_true, rotations_pred : array-like of shape (N, 3, 3)
    symmetry_matrices : array-like of shape (S, 3, 3), optional
        Point group of the true structure (e.g. ``symmetry_group("D7").as_matrix()``).
    grid : Rotation, optional
        The orientations a search chose from. Where given, the errors of the grid
        rotations nearest to each ``R_true_i g G`` are returned as well: the
        smallest errors any search on that grid can reach in the recovered frame.
        How far this floor lies depends on G, since a grid closed under some
        symmetry mates offers a structure of that symmetry fewer distinct
        choices when its frame lines up with the grid's: compare errors with
        their floor, not across runs.

    Returns
    -------
    errors : ndarray of shape (N,)
    floor : ndarray of shape (N,)
        Only where ``grid`` is given.
    """
    true = np.asarray(rotations_true, dtype=np.float64)
    pred = np.asarray(rotations_pred, dtype=np.float64)
    if true.shape != pred.shape or true.ndim != 3 or true.shape[1:] != (3, 3):
        raise ValueError(
            f"rotations must both have shape (N, 3, 3), got {true.shape} and {pred.shape}"
        )
    group = np.eye(3)[None] if symmetry_matrices is None else np.asarray(symmetry_matrices)
    mates = np.einsum("nij,hjk->nhik", true, group)  # every R_true_i g

    def errors_for(offset):
        # (R_true_i g G)^T R_pred_i = G^T (R_true_i g)^T R_pred_i
        residual = np.einsum("ji,nhkj,nkl->nhil", offset, mates, pred)
        angles = Rotation.from_matrix(residual.reshape(-1, 3, 3)).magnitude()
        angles = angles.reshape(len(true), len(group))
        return angles.min(axis=1), angles.argmin(axis=1)

    trials = np.linspace(0, len(true) - 1, min(len(true), 50)).astype(int)
    offsets = [true[j].T @ pred[j] for j in trials]
    offset = min(offsets, key=lambda g: np.median(errors_for(g)[0]))
    _, choice = errors_for(offset)
    aligned = mates[np.arange(len(true)), choice]
    offset = Rotation.from_matrix(np.einsum("nji,njk->nik", aligned, pred)).mean().as_matrix()
    errors = np.degrees(errors_for(offset)[0])
    if grid is None:
        return errors
    ideal = Rotation.from_matrix((mates @ offset).reshape(-1, 3, 3))
    nearest = grid[nearest_grid_index(grid, ideal)]
    floor = (nearest.inv() * ideal).magnitude().reshape(len(true), len(group)).min(axis=1)
    return errors, np.degrees(floor)


def classified_orientation_errors(
    labels_true, labels_pred, rotations_true, rotations_pred, symmetries=None, grid=None
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Orientation errors of the particles each found class shares with its true class.

    Each found class is matched to the true class most of its particles come from;
    those particles' errors are measured with :func:`orientation_errors` (one global
    rotation per found class), the others are left out.

    Parameters
    ----------
    labels_true, labels_pred : array-like of shape (N,)
    rotations_true, rotations_pred : array-like of shape (N, 3, 3)
    symmetries : sequence of (S, 3, 3) arrays or None, optional
        Point group of each true class, indexed by its label.
    grid : Rotation, optional
        Also return the same particles' error floor on this grid (see
        :func:`orientation_errors`).

    Returns
    -------
    errors : ndarray
        In degrees, concatenated over found classes.
    floor : ndarray
        Only where ``grid`` is given.
    """
    t = np.asarray(labels_true)
    p = np.asarray(labels_pred)
    parts = []
    for k in np.unique(p):
        members = p == k
        values, counts = np.unique(t[members], return_counts=True)
        true_class = values[np.argmax(counts)]
        members &= t == true_class
        if members.sum() < 2:
            continue
        group = None if symmetries is None else symmetries[true_class]
        found = orientation_errors(
            np.asarray(rotations_true)[members], np.asarray(rotations_pred)[members], group,
            grid,
        )
        parts.append(found)
    if grid is None:
        return np.concatenate(parts) if parts else np.empty(0)
    if not parts:
        return np.empty(0), np.empty(0)
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))


def fsc(map1, map2, voxel_size=1.0) -> tuple[np.ndarray, np.ndarray]:
    """Fourier shell correlation of two cubic maps.

    Shell ``s`` holds the Fourier components whose frequency ``q`` (in Fourier
    pixels, ``numpy.fft.fftfreq`` on every axis) has ``round(|q|) == s``, for
    ``s = 0, 1, ..., D//2``; the corners beyond ``D//2`` are left out. Per shell::

        FSC(s) = sum Re(F1 conj F2) / sqrt(sum |F1|^2 sum |F2|^2)

    over the full grid. It is computed on the half grid of ``rfftn`` with the
    Hermitian multiplicity of :func:`~mlsubtomo.fft.hermitian_multiplicity`, which
    gives exactly the full-grid sums.

    Parameters
    ----------
    map1, map2 : array-like of shape (D, D, D)
        Real maps on the same grid, indexed ``[z, y, x]``.
    voxel_size : float, default=1.0
        Voxel size in Angstrom, used only for the frequencies returned.

    Returns
    -------
    frequency : ndarray of shape (D//2 + 1,)
        Shell frequency ``s / (D * voxel_size)`` in 1/Angstrom. Shell 0 (the DC
        component alone) is included, so ``frequency[0] == 0``; its FSC is the
        sign agreement of the two means (1, -1 or 0) and is rarely meaningful
        (:func:`fsc_resolution` ignores it).
    curve : ndarray of shape (D//2 + 1,)
        The FSC of each shell, in ``[-1, 1]``. A shell where either map has no
        power (none above the rounding level of the input precision: mean power
        per component below ``(10 eps)^2`` times the map's mean over the grid)
        has FSC 0 (no NaN, no warning).

    Raises
    ------
    ValueError
        If the maps are not cubic, differ in shape, or ``voxel_size`` is not positive.

    Examples
    --------
    >>> import numpy as np
    >>> v = np.random.default_rng(0).standard_normal((8, 8, 8))
    >>> freq, curve = fsc(v, 2.0 * v, voxel_size=2.0)
    >>> freq.tolist()
    [0.0, 0.0625, 0.125, 0.1875, 0.25]
    >>> np.allclose(curve, 1.0)
    True
    """
    a = np.asarray(map1, dtype=np.float64)
    b = np.asarray(map2, dtype=np.float64)
    if a.ndim != 3 or not (a.shape[0] == a.shape[1] == a.shape[2]):
        raise ValueError(f"map1 must be a cubic (D, D, D) array, got shape {a.shape}")
    if b.shape != a.shape:
        raise ValueError(f"map1 and map2 differ in shape: {a.shape} != {b.shape}")
    voxel_size = float(voxel_size)
    if not np.isfinite(voxel_size) or voxel_size <= 0:
        raise ValueError(f"voxel_size must be a positive number, got {voxel_size!r}")
    d = a.shape[0]
    fa = np.fft.rfftn(a)
    fb = np.fft.rfftn(b)
    qx, qy, qz = frequency_grid(d)
    shell = np.rint(np.sqrt(qx**2 + qy**2 + qz**2)).astype(np.int64)
    weight = np.broadcast_to(hermitian_multiplicity(d), shell.shape)
    keep = shell <= d // 2
    index = shell[keep]
    n_shells = d // 2 + 1

    def shell_sum(values):
        return np.bincount(index, weights=(weight * values)[keep], minlength=n_shells)

    # A shell whose mean power per component is at the rounding level of the
    # input precision (below (10 eps)^2 times the map's mean over the whole grid)
    # holds no signal: it counts as empty.
    eps = max(_precision(map1), _precision(map2))
    count = shell_sum(np.ones(shell.shape))
    nonempty = np.ones(n_shells, dtype=bool)
    powers = []
    for f in (fa, fb):
        p = np.abs(f) ** 2
        powers.append(shell_sum(p))
        total = float((weight * p).sum())
        nonempty &= (powers[-1] > 0) & (powers[-1] > (10.0 * eps) ** 2 * total * count / d**3)
    cross = shell_sum((fa * np.conj(fb)).real)
    curve = np.zeros(n_shells)
    np.divide(cross, np.sqrt(powers[0] * powers[1]), out=curve, where=nonempty)
    curve = np.clip(curve, -1.0, 1.0)
    frequency = np.arange(n_shells) / (d * voxel_size)
    return frequency, curve


def _precision(values) -> float:
    """Machine epsilon of an array's floating dtype (float64's for other dtypes)."""
    dtype = np.asarray(values).dtype
    if np.issubdtype(dtype, np.floating):
        return float(np.finfo(dtype).eps)
    return float(np.finfo(np.float64).eps)


def fsc_resolution(frequency, curve, threshold=0.5) -> float:
    """Resolution in Angstrom at which an FSC curve first drops below a threshold.

    Shells at frequency 0 (the DC shell of :func:`fsc`) are ignored. The crossing
    between the last shell at or above ``threshold`` and the first one below is
    found by linear interpolation of the FSC in frequency, and its inverse is
    returned.

    Parameters
    ----------
    frequency : array-like of shape (S,)
        Shell frequencies in 1/Angstrom, increasing (as returned by :func:`fsc`).
    curve : array-like of shape (S,)
        FSC values of the shells.
    threshold : float, default=0.5
        The FSC criterion, e.g. 0.5 or 0.143.

    Returns
    -------
    float
        ``1 / f`` at the crossing. If the curve never drops below ``threshold``,
        ``1 / frequency[-1]``: the Nyquist resolution ``2 * voxel_size`` for an
        even box (slightly coarser for an odd one, whose last shell is
        ``(D - 1) / 2``). If the first shell beyond DC is already below, ``inf``.

    Raises
    ------
    ValueError
        If the arrays differ in shape, are empty beyond DC, or the frequencies do
        not increase.

    Examples
    --------
    >>> round(fsc_resolution([0.0, 0.1, 0.2, 0.3], [1.0, 0.9, 0.3, 0.1]), 6)
    6.0
    """
    f = np.asarray(frequency, dtype=np.float64).ravel()
    c = np.asarray(curve, dtype=np.float64).ravel()
    if f.shape != c.shape:
        raise ValueError(f"frequency and curve differ in length: {f.size} != {c.size}")
    keep = f > 0
    f, c = f[keep], c[keep]
    if f.size == 0:
        raise ValueError("frequency has no shell beyond DC (frequency > 0)")
    if np.any(np.diff(f) <= 0):
        raise ValueError("frequency must be strictly increasing")
    threshold = float(threshold)
    below = np.flatnonzero(c < threshold)
    if below.size == 0:
        return float(1.0 / f[-1])
    i = int(below[0])
    if i == 0:
        return float("inf")
    # c[i - 1] >= threshold > c[i]: the denominator is positive.
    t = (c[i - 1] - threshold) / (c[i - 1] - c[i])
    return float(1.0 / (f[i - 1] + t * (f[i] - f[i - 1])))
