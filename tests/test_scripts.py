"""Smoke tests: the benchmark and demo scripts still run end to end."""

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def _run(args, tmp_path, check=True):
    # Run from the repository root, as the docs say (`python -m benchmarks.evaluate`,
    # `python examples/demo.py`, `python -m examples.distill_stdlib`). PYTHONPATH is
    # not what makes them run (keras_lopt is installed): it makes a script path's
    # keras_lopt the checkout under test rather than wherever the virtualenv's
    # editable install points.
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    proc = subprocess.run([sys.executable] + args, cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_evaluate_harness_quick(tmp_path):
    from keras_lopt.rules.theta import init_theta
    from keras_lopt.rules.theta import save_theta

    celo_weights = str(tmp_path / "celo.npz")
    save_theta(celo_weights, init_theta("celo", 0), "celo")
    out = _run(["-m", "benchmarks.evaluate", "--quick", "--steps", "6",
                "--tasks", "mlp_breast_cancer", "--optimizers", "celo", "celo2", "adamw",
                "--lrs", "1e-3", "--celo-weights", celo_weights, "--out", str(tmp_path)],
               tmp_path).stdout
    assert "mlp_breast_cancer" in out and "| Celo |" in out
    assert (tmp_path / "evaluate.md").exists() and (tmp_path / "evaluate.json").exists()
    assert (tmp_path / "evaluate_lr_mult.png").exists()


def test_script_paths_point_to_module_form(tmp_path):
    # Scripts that import the `benchmarks` package, run as a path, stop before
    # doing anything and say how to run them.
    for path, module in [("benchmarks/evaluate.py", "benchmarks.evaluate"),
                         ("benchmarks/optimizer_speed.py", "benchmarks.optimizer_speed"),
                         ("examples/distill_stdlib.py", "examples.distill_stdlib")]:
        proc = _run([path, "--quick"], tmp_path, check=False)
        assert proc.returncode != 0
        assert f"python -m {module} --quick" in proc.stderr


def test_demo_runs(tmp_path):
    out = _run(["examples/demo.py", "--epochs", "1", "--out-dir", str(tmp_path)], tmp_path).stdout
    assert "Celo2" in out and (tmp_path / "demo_celo2_vs_adamw.png").exists()


def test_distillation_example_quick(tmp_path):
    # Each phase saves its model; the JSON holds every perplexity and the throughputs.
    import json

    out = _run(["-m", "examples.distill_stdlib", "--quick", "--out", str(tmp_path)],
               tmp_path).stdout
    assert "held-out perplexity stage2_mamba2" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["perplexity"]) == {"teacher", "stage1_linear_attention", "stage2_mamba2",
                                          "mamba2_scratch", "mamba2_naive"}
    assert all(1.0 < p < 256.0 for p in results["perplexity"].values())
    assert all(t > 0 for t in results["tokens_per_second"].values())
    # Run again: every phase is loaded, nothing retrains.
    again = _run(["-m", "examples.distill_stdlib", "--quick", "--out", str(tmp_path)],
                 tmp_path).stdout
    assert "teacher: loaded" in again and "naive: loaded" in again
