"""Regularisation schedules and the penalised class-average update."""

import numpy as np
import pytest

from mlsubtomo.regularization import (
    Constant,
    LinearDecay,
    check_schedule,
    pairwise_squared_distances,
    penalised_update,
)


def test_paper_schedule_values():
    schedule = LinearDecay(theta0=5.0, n_steps=5)
    assert [schedule(i) for i in range(8)] == [5, 4, 3, 2, 1, 0, 0, 0]
    assert Constant(2.5)(17) == 2.5
    assert LinearDecay(1.0, 4, theta_final=0.5)(10) == 0.5


def test_check_schedule():
    assert check_schedule(None)(3) == 0.0
    assert check_schedule(3)(0) == 3.0
    assert check_schedule(LinearDecay()) == LinearDecay()
    for bad in (-1.0, "strong", Constant(-2.0), LinearDecay(5.0, 0)):
        with pytest.raises(ValueError, match="theta|n_steps|regularization"):
            check_schedule(bad)


def test_penalised_update_solves_the_stationarity_condition():
    rng = np.random.default_rng(0)
    k = 3
    ml = rng.normal(size=(k, 5, 4)) + 1j * rng.normal(size=(k, 5, 4))
    sums = np.array([10.0, 3.0, 0.0])
    tau = 2.5
    reg = penalised_update(ml, sums, tau)
    total = reg.sum(axis=0)
    residual = sums[:, None, None] * (reg - ml) + tau * (k * reg - total)
    np.testing.assert_allclose(residual, 0, atol=1e-10)
    # With equal class sums the solution is the one-step formula of xmipp.
    equal = np.full(k, 4.0)
    one_step = (equal[:, None, None] * ml + tau * ml.sum(axis=0)) / (equal[0] + k * tau)
    np.testing.assert_allclose(penalised_update(ml, equal, tau), one_step, atol=1e-12)
    np.testing.assert_array_equal(penalised_update(ml, sums, 0.0), ml)


def test_pairwise_squared_distances_matches_the_double_sum():
    rng = np.random.default_rng(1)
    refs = rng.normal(size=(4, 3, 3)) + 1j * rng.normal(size=(4, 3, 3))
    weights = rng.random((3, 3))
    direct = sum(
        np.sum(weights * np.abs(refs[a] - refs[b]) ** 2) for a in range(4) for b in range(4)
    )
    assert pairwise_squared_distances(refs, weights) == pytest.approx(direct, rel=1e-12)
