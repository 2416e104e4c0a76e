"""Figures of merit against a known truth: class purity and orientation error."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.transform import Rotation

__all__ = ["class_purity", "classified_orientation_errors", "orientation_errors"]


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


def orientation_errors(rotations_true, rotations_pred, symmetry_matrices=None) -> np.ndarray:
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

    Returns
    -------
    ndarray of shape (N,)
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
    return np.degrees(errors_for(offset)[0])


def classified_orientation_errors(
    labels_true, labels_pred, rotations_true, rotations_pred, symmetries=None
) -> np.ndarray:
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

    Returns
    -------
    ndarray of the errors in degrees, concatenated over found classes.
    """
    t = np.asarray(labels_true)
    p = np.asarray(labels_pred)
    errors = []
    for k in np.unique(p):
        members = p == k
        values, counts = np.unique(t[members], return_counts=True)
        true_class = values[np.argmax(counts)]
        members &= t == true_class
        if members.sum() < 2:
            continue
        group = None if symmetries is None else symmetries[true_class]
        errors.append(
            orientation_errors(
                np.asarray(rotations_true)[members], np.asarray(rotations_pred)[members], group
            )
        )
    return np.concatenate(errors) if errors else np.empty(0)
