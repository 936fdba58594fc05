"""Pure helpers of `benchmarks.evaluate`: grids, the schedule, evaluation points, speedups."""

import math

import numpy as np
import pytest

from benchmarks import evaluate


def test_half_decade_grids():
    assert evaluate.half_decades(-3, -2) == (0.001, 0.00316, 0.01)
    assert evaluate.next_rate(0.01, 1) == 0.0316
    assert evaluate.next_rate(0.001, -1) == 0.000316
    assert evaluate.next_rate(0.0316, 1) == 0.1  # on the lattice, no drift
    assert evaluate.next_rate(0.002, 1) == 0.00632


def test_schedule_is_warmup_then_cosine_to_zero():
    values = evaluate.schedule_values(2.0, 100)
    assert values[0] == 0.0
    assert values[5] == pytest.approx(2.0)  # 5% of 100 steps of warm-up
    np.testing.assert_allclose(values[:6], np.linspace(0.0, 2.0, 6), rtol=1e-6)
    assert np.all(np.diff(values[5:]) <= 1e-7)
    assert values[-1] < 0.01 and values.max() == pytest.approx(2.0)
    assert np.all(evaluate.schedule_values(2.0, 10, "constant") == 2.0)


def test_eval_points():
    assert evaluate.eval_points(100) == list(range(0, 101, 5))
    assert evaluate.eval_points(7) == list(range(8))
    assert evaluate.eval_points(45)[-1] == 45


def _run(val, train, steps=10):
    points = list(range(0, steps + 1, steps // (len(val) - 1)))
    return {"error": None, "eval_steps": points, "val_losses": val, "steps": steps,
            "smoothed_train": train, "final_train": train[-1]}


def test_speedup_interpolates_and_reports_not_reached():
    ref = _run([4.0, 3.0, 2.0], [3.0] * 9 + [2.0])
    fast = _run([4.0, 2.0, 1.0], [2.0] * 10)
    slow = _run([4.0, 3.5, 3.0], [3.0] * 10)
    s = evaluate.speedup_of(ref, fast, "val")
    assert s["target"] == 2.0 and s["reference_steps"] == 10 and s["steps"] == 5
    assert s["value"] == pytest.approx(2.0)
    assert evaluate.speedup_of(ref, slow, "val")["value"] is None
    assert evaluate.speedup_of(ref, fast, "train")["value"] == pytest.approx(10.0)
    assert evaluate.speedup_of(ref, dict(fast, error="boom"), "val") is None
    assert not math.isnan(evaluate.speedup_of(ref, fast, "val")["value"])


def test_split_tasks_balances():
    groups, loads = evaluate._split_tasks(["a", "b", "c", "d"],
                                          {"a": 10, "b": 6, "c": 5, "d": 1}, 2)
    assert sorted(map(sorted, groups)) == [["a", "d"], ["b", "c"]]
    assert loads == [11, 11]


def test_closed_form_matches_the_keras_schedule_at_every_step():
    peak, steps = 3e-3, 300
    schedule = evaluate.warmup_cosine(peak, steps)
    every = np.array([float(keras_ops_numpy(schedule(s))) for s in range(steps)])
    np.testing.assert_allclose(evaluate._warmup_cosine_numpy(peak, steps), every,
                               rtol=1e-5, atol=1e-10)


def keras_ops_numpy(x):
    import keras

    return keras.ops.convert_to_numpy(x)
