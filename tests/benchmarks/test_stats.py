"""The pure statistics of the evaluation harness (`benchmarks.stats`)."""

import math

import numpy as np
import pytest
from scipy.stats import trim_mean

from benchmarks import stats


def test_iqm_matches_scipy_trim_mean():
    rng = np.random.default_rng(0)
    for n in (1, 2, 4, 5, 8, 24, 25):
        x = rng.normal(size=n)
        assert stats.iqm(x) == pytest.approx(trim_mean(x, 0.25))
    # The middle half of 1..8 is 3..6.
    assert stats.iqm(np.arange(1, 9)) == pytest.approx(4.5)


def test_iqm_ignores_nan_and_empty_is_nan():
    assert stats.iqm([1.0, math.nan, 3.0]) == pytest.approx(2.0)
    assert math.isnan(stats.iqm([math.nan]))


def test_bootstrap_ci_contains_statistic_and_degenerates():
    rng = np.random.default_rng(1)
    scores = rng.normal(1.0, 0.2, size=(8, 3))
    low, high = stats.stratified_bootstrap_ci(scores, reps=500)
    assert low < stats.iqm(scores) < high
    assert high - low < 0.5
    # Constant scores: a zero-width interval at the constant.
    assert stats.stratified_bootstrap_ci(np.full((4, 3), 2.0), reps=100) == (2.0, 2.0)
    # Seeds are resampled within a task: one seed per task gives no spread.
    one = np.arange(6.0)[:, None]
    low, high = stats.stratified_bootstrap_ci(one, statistic=np.mean, reps=50)
    assert low == high == pytest.approx(2.5)


def test_steps_to_reach_interpolates():
    steps = [0, 10, 20, 30]
    values = [4.0, 3.0, 1.0, 0.5]
    assert stats.steps_to_reach(steps, values, 2.0) == pytest.approx(15.0)
    assert stats.steps_to_reach(steps, values, 3.0) == pytest.approx(10.0)
    assert stats.steps_to_reach(steps, values, 5.0) == 0.0
    assert stats.steps_to_reach(steps, values, 0.1) is None
    # A diverged run stops counting at its first non-finite sample.
    assert stats.steps_to_reach(steps, [4.0, math.nan, 0.0, 0.0], 1.0) is None
    assert stats.steps_to_reach(steps, values, math.nan) is None


def test_grid_edge():
    grid = [1e-4, 3.16e-4, 1e-3]
    assert stats.grid_edge(grid, 0) == "low"
    assert stats.grid_edge(grid, 1) is None
    assert stats.grid_edge(grid, 2) == "high"
    assert stats.grid_edge([1e-3], 0) is None


def test_performance_profile():
    losses = {"a": [1.0, 2.0, math.nan], "b": [2.0, 1.0, 1.0]}
    profile = stats.performance_profile(losses, [1.0, 2.0])
    np.testing.assert_allclose(profile["a"], [1 / 3, 2 / 3])
    np.testing.assert_allclose(profile["b"], [2 / 3, 1.0])


def test_smooth():
    np.testing.assert_allclose(stats.smooth([1.0, 3.0, 5.0, 7.0], 2), [1.0, 2.0, 4.0, 6.0])
