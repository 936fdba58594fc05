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


def _assert_close(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_close(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_close(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-6)
    else:
        assert a == b


def test_reuse_takes_the_baselines_runs_from_an_earlier_report(tmp_path, monkeypatch):
    import json

    import keras

    # The harness's process-wide settings (one torch thread, TensorFlow op
    # determinism) would outlive this test and slow or change the others.
    monkeypatch.setattr(evaluate, "configure_backend", lambda jax_cache: "test")
    common = ["--tasks", "autoencoder_digits", "--steps", "4", "--lrs", "0.001", "0.01",
              "--seeds", "2", "--workers", "1", "--jax-cache", ""]
    first = str(tmp_path / "first")
    evaluate.main(common + ["--optimizers", "adamw", "celo2", "--out", first])
    with open(f"{first}/evaluate.json") as f:
        before = json.load(f)

    trained = []
    real_train = evaluate.train

    def spy(task, spec, lr, seed, config, steps):
        trained.append((spec.family, lr, seed))
        return real_train(task, spec, lr, seed, config, steps)

    monkeypatch.setattr(evaluate, "train", spy)
    second = str(tmp_path / "second")
    evaluate.main(common + ["--optimizers", "adamw", "celo2", "--out", second,
                            "--reuse", f"{first}/evaluate.json", "--reuse-optimizers", "adamw"])
    with open(f"{second}/evaluate.json") as f:
        after = json.load(f)
    # AdamW's grid and seeds came from the report; only Celo2 trained again,
    # and its runs (deterministic) and the speedups against AdamW are the same.
    assert trained and {family for family, _, _ in trained} == {"celo2"}
    task_before, task_after = before["tasks"]["autoencoder_digits"], after["tasks"]["autoencoder_digits"]
    assert task_after["tuning"]["adamw"] == task_before["tuning"]["adamw"]
    for name in ("adamw", "celo2"):
        for a, b in zip(task_before["runs"][name], task_after["runs"][name]):
            np.testing.assert_allclose(a["val_losses"], b["val_losses"], rtol=1e-6)
            np.testing.assert_allclose(a["train_losses"], b["train_losses"], rtol=1e-6)
    _assert_close(task_after["speedup"], task_before["speedup"])
    assert after["config"]["reused"]["optimizers"] == ["adamw"]

    # Settings that change a run must match.
    with pytest.raises(SystemExit, match="weight_decay"):
        evaluate.main(common + ["--optimizers", "adamw", "--out", second, "--weight-decay", "0.1",
                                "--reuse", f"{first}/evaluate.json"])
    with pytest.raises(SystemExit, match="muon did not run there"):
        evaluate.main(common + ["--optimizers", "adamw", "--out", second,
                                "--reuse", f"{first}/evaluate.json"])
    keras.backend.clear_session()


def test_celo2_options_parse():
    assert evaluate._parse_options(["adam_lr_ratio=5", "b=false", "x=1e-3", "c=0.5"]) == [
        ("adam_lr_ratio", 5), ("b", False), ("x", 0.001), ("c", 0.5)]
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        evaluate._parse_options(["adam_lr_ratio"])
