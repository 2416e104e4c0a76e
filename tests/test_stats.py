"""Sufficient statistics add up across chunks in any order."""

import numpy as np
import pytest

from mlsubtomo.stats import SufficientStatistics


def _random_stats(rng, k=2, shape=(4, 4, 3)):
    s = SufficientStatistics.zeros(k, shape)
    s.class_sums[:] = rng.random(k)
    s.data_sums[:] = rng.normal(size=s.data_sums.shape) + 1j * rng.normal(size=s.data_sums.shape)
    s.observation_counts[:] = rng.random(s.observation_counts.shape)
    s.residual_sum, s.shift_sum, s.log_likelihood = rng.random(3)
    s.n_observed, s.n_particles = float(rng.integers(10, 20)), int(rng.integers(1, 5))
    return s


def test_sum_is_order_independent():
    rng = np.random.default_rng(0)
    parts = [_random_stats(rng) for _ in range(5)]
    forward = sum(parts)
    backward = sum(reversed(parts))
    np.testing.assert_allclose(forward.data_sums, backward.data_sums, rtol=1e-12)
    np.testing.assert_allclose(forward.class_sums, backward.class_sums, rtol=1e-12)
    assert forward.n_particles == sum(p.n_particles for p in parts)
    assert forward.residual_sum == pytest.approx(sum(p.residual_sum for p in parts))


def test_mismatched_shapes_are_refused():
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="shapes"):
        _random_stats(rng) + _random_stats(rng, shape=(5, 5, 3))
