"""Regularisation of the class averages towards each other (the paper's eq. 11).

In the first iterations of a reference-free run the class averages are pulled
towards each other so that no class locks onto noise early. A schedule gives the
strength theta (in units of N/K^2) for the M-step of each iteration; the penalised
update solves the stationarity condition of the penalised EM target exactly.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = [
    "Constant",
    "LinearDecay",
    "Schedule",
    "check_schedule",
    "pairwise_squared_distances",
    "penalised_update",
]


class Schedule:
    """Base class: ``schedule(iteration)`` is theta for the M-step of that iteration (0-based)."""

    def __call__(self, iteration: int) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(vars(self).items()))))


class Constant(Schedule):
    """The same strength ``theta`` in every iteration (0 disables regularisation)."""

    def __init__(self, theta: float = 0.0):
        self.theta = theta

    def __call__(self, iteration: int) -> float:
        theta = float(self.theta)
        if not np.isfinite(theta) or theta < 0:
            raise ValueError(f"theta must be a finite number >= 0, got {self.theta!r}")
        return theta


class LinearDecay(Schedule):
    """Strength decreasing linearly from ``theta0`` to ``theta_final`` over ``n_steps`` iterations.

    The paper's schedule is ``LinearDecay(theta0=5.0, n_steps=5)``: the M-steps of
    the first six iterations use 5, 4, 3, 2, 1 and 0, and all later ones 0.
    """

    def __init__(self, theta0: float = 5.0, n_steps: int = 5, theta_final: float = 0.0):
        self.theta0 = theta0
        self.n_steps = n_steps
        self.theta_final = theta_final

    def __call__(self, iteration: int) -> float:
        theta0, final = float(self.theta0), float(self.theta_final)
        if not (np.isfinite(theta0) and np.isfinite(final)) or theta0 < 0 or final < 0:
            raise ValueError(
                f"theta0 and theta_final must be finite numbers >= 0, got "
                f"{self.theta0!r} and {self.theta_final!r}"
            )
        if not isinstance(self.n_steps, numbers.Integral) or self.n_steps < 1:
            raise ValueError(f"n_steps must be an integer >= 1, got {self.n_steps!r}")
        theta = theta0 - iteration * (theta0 - final) / self.n_steps
        low, high = sorted((theta0, final))
        return float(np.clip(theta, low, high))


def check_schedule(regularization) -> Schedule:
    """Accept None (no regularisation), a non-negative number (constant) or a Schedule."""
    if regularization is None:
        return Constant(0.0)
    if isinstance(regularization, Schedule):
        regularization(0)  # validates its parameters
        return regularization
    if isinstance(regularization, numbers.Real) and not isinstance(regularization, bool):
        schedule = Constant(float(regularization))
        schedule(0)
        return schedule
    raise ValueError(
        "regularization must be None, a number >= 0 or a Schedule such as "
        f"LinearDecay(theta0=5.0, n_steps=5), got {regularization!r}"
    )


def penalised_update(references: np.ndarray, class_sums: np.ndarray, tau: float) -> np.ndarray:
    """Solve ``S_k (A_k - A_k^ML) + tau (K A_k - sum_l A_l) = 0`` for all classes.

    Parameters
    ----------
    references : ndarray of shape (K, ...)
        The unpenalised (maximum-likelihood) class averages, in any linear
        representation (real space or Fourier components).
    class_sums : ndarray of shape (K,)
        Posterior mass S_k of each class.
    tau : float
        Penalty strength, ``theta * N / K``.

    Returns
    -------
    ndarray of the shape and dtype of ``references``.
    """
    k = references.shape[0]
    if tau <= 0 or k < 2:
        return references.copy()
    s = np.asarray(class_sums, dtype=np.float64)
    system = np.diag(s) + tau * (k * np.eye(k) - np.ones((k, k)))
    flat = references.reshape(k, -1)
    solved = np.linalg.solve(system, s[:, None] * flat)
    return solved.reshape(references.shape).astype(references.dtype, copy=False)


def pairwise_squared_distances(references: np.ndarray, weights: np.ndarray) -> float:
    """``sum_{k,l} sum_q weights(q) |A_k(q) - A_l(q)|^2`` over ordered pairs of classes.

    Uses ``2 K sum_k ||A_k||^2 - 2 ||sum_k A_k||^2``, which avoids the K^2 loop.
    """
    k = references.shape[0]
    flat = references.reshape(k, -1)
    w = np.broadcast_to(weights, references.shape[1:]).reshape(-1)
    total = np.sum(w * np.abs(flat.sum(axis=0)) ** 2)
    each = np.sum(w * np.sum(np.abs(flat) ** 2, axis=0))
    return float(2 * k * each - 2 * total)
