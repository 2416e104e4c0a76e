"""Sufficient statistics of one EM iteration, summable across chunks and workers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SufficientStatistics"]


@dataclass
class SufficientStatistics:
    """What the M-step needs, accumulated over particles (design section 2b).

    All Fourier arrays are on the half grid of the reference frame, with the
    rotation centre at the origin (see :func:`mlsubtomo.transform.centre_for_fft`).

    Attributes
    ----------
    class_sums : ndarray of shape (K,)
        S_k, the posterior mass of each class.
    data_sums : ndarray of shape (K, D, D, D//2+1), complex128
        B_k, posterior-weighted sums of the observed particle components, rotated
        and shifted back into the reference frame.
    observation_counts : ndarray of shape (K, D, D, D//2+1), float64
        W_k, the posterior-weighted number of times each component was observed.
    residual_sum : float
        D_sigma, the posterior-weighted squared residual over the observed sets.
    shift_sum : float
        D_xi, the posterior-weighted squared shift length.
    log_likelihood : float
        Sum of the particles' log-likelihoods under the model that produced them.
    n_observed : float
        Sum of the particles' observed-component counts n_i (full grid).
    n_particles : int
    """

    class_sums: np.ndarray
    data_sums: np.ndarray
    observation_counts: np.ndarray
    residual_sum: float = 0.0
    shift_sum: float = 0.0
    log_likelihood: float = 0.0
    n_observed: float = 0.0
    n_particles: int = 0

    @classmethod
    def zeros(cls, n_classes: int, half_shape: tuple) -> SufficientStatistics:
        """Empty statistics for ``n_classes`` classes on a half grid of ``half_shape``."""
        return cls(
            class_sums=np.zeros(n_classes),
            data_sums=np.zeros((n_classes, *half_shape), dtype=np.complex128),
            observation_counts=np.zeros((n_classes, *half_shape)),
        )

    def __add__(self, other: SufficientStatistics) -> SufficientStatistics:
        if not isinstance(other, SufficientStatistics):
            return NotImplemented
        if other.data_sums.shape != self.data_sums.shape:
            raise ValueError(
                f"cannot add statistics of shapes {self.data_sums.shape} and "
                f"{other.data_sums.shape}"
            )
        return SufficientStatistics(
            class_sums=self.class_sums + other.class_sums,
            data_sums=self.data_sums + other.data_sums,
            observation_counts=self.observation_counts + other.observation_counts,
            residual_sum=self.residual_sum + other.residual_sum,
            shift_sum=self.shift_sum + other.shift_sum,
            log_likelihood=self.log_likelihood + other.log_likelihood,
            n_observed=self.n_observed + other.n_observed,
            n_particles=self.n_particles + other.n_particles,
        )

    def embedded(self, index: tuple, half_shape: tuple) -> SufficientStatistics:
        """These statistics of a Fourier crop placed at ``index`` of a larger half grid."""
        out = SufficientStatistics.zeros(len(self.class_sums), half_shape)
        out.data_sums[(slice(None), *index)] = self.data_sums
        out.observation_counts[(slice(None), *index)] = self.observation_counts
        for name in ("class_sums", "residual_sum", "shift_sum", "log_likelihood",
                     "n_observed", "n_particles"):
            setattr(out, name, getattr(self, name))
        return out

    def __radd__(self, other):
        # Lets sum() start from 0.
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented
