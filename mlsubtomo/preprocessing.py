"""Per-particle normalisation, a scikit-learn transformer for pipelines."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin

__all__ = ["ParticleNormalizer"]


class ParticleNormalizer(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Scale each particle to zero mean and unit standard deviation.

    The likelihood model assumes white noise of one sigma for all particles, so
    particles extracted from tomograms of different contrast are brought to a
    common scale first (as xmipp_ml_tomo's users were told to do by hand).

    Parameters
    ----------
    radius : float, default=None
        Compute the mean and standard deviation inside a sphere of this radius (in
        voxels, about the box centre) only, e.g. over the background around the
        particle; None uses the whole box.

    Examples
    --------
    >>> import numpy as np
    >>> from mlsubtomo.preprocessing import ParticleNormalizer
    >>> X = np.random.default_rng(0).normal(3.0, 2.0, size=(4, 8, 8, 8))
    >>> Z = ParticleNormalizer().fit_transform(X)
    >>> bool(np.allclose(Z.mean(axis=(1, 2, 3)), 0, atol=1e-5))
    True
    """

    def __init__(self, radius=None):
        self.radius = radius

    def fit(self, X, y=None):
        """Nothing to learn; checks the input."""
        self._region(np.asarray(X))
        return self

    def transform(self, X):
        """Normalised copy of ``X`` as float32, shape (N, D, D, D)."""
        X = np.asarray(X, dtype=np.float64)
        region = self._region(X)
        values = X[:, region]
        mean = values.mean(axis=1)
        std = values.std(axis=1)
        # A constant particle has nothing to scale; leave it centred at zero.
        std = np.where(std > 0, std, 1.0)
        out = (X - mean[:, None, None, None]) / std[:, None, None, None]
        return out.astype(np.float32)

    def _region(self, X):
        if X.ndim != 4 or not (X.shape[1] == X.shape[2] == X.shape[3]):
            raise ValueError(f"X must have shape (N, D, D, D) with cubic boxes, got {X.shape}")
        d = X.shape[-1]
        if self.radius is None:
            return np.ones((d, d, d), dtype=bool)
        if not np.isfinite(self.radius) or self.radius <= 0:
            raise ValueError(f"radius must be a positive number, got {self.radius!r}")
        axis = np.arange(d) - d // 2
        z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
        region = x * x + y * y + z * z <= self.radius**2
        if not region.any():
            raise ValueError(f"radius={self.radius} selects no voxel")
        return region
