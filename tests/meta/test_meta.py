"""Meta-training (JAX): PES bookkeeping, determinism, resume, sharding, CLI."""

import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_lopt.meta import tasks
from keras_lopt.meta.config import MetaTrainConfig

jax_only = pytest.mark.skipif(keras.backend.backend() != "jax", reason="needs KERAS_BACKEND=jax")


def tiny_families():
    # Two hidden layers: under the deployment routing the first and last
    # kernels take Adam, and the middle one the learned rule.
    x, y = tasks.teacher_data(seed=0, n=64, features=6, classes=3)
    return [tasks.TaskFamily("tiny", x, y, (4, 4), 3, batch_size=8)]


def tiny_config(**kw):
    base = dict(rule="celo2", seed=0, pairs_per_family=2, truncation=3, min_horizon=4,
                max_horizon=8, outer_lr=1e-2, validate_every=0)
    base.update(kw)
    return MetaTrainConfig(**base)


def test_normalised_loss_clips_and_maps_nan_to_max():
    if keras.backend.backend() != "jax":
        pytest.skip("needs KERAS_BACKEND=jax")
    fam = tiny_families()[0]
    values = np.asarray(fam.normalized_loss(np.array([np.nan, -1.0, 0.5, 100.0], "float32")))
    cap = 1.5 * math.log(3)
    np.testing.assert_allclose(values, [cap, 0.0, 0.5, cap], rtol=1e-6)


@pytest.mark.skipif(keras.backend.backend() == "jax", reason="checks the non-JAX error")
def test_non_jax_backend_is_refused_clearly():
    from keras_lopt.meta.pes import PESMetaTrainer

    with pytest.raises(RuntimeError, match="needs the JAX backend"):
        PESMetaTrainer(tiny_config(), families=[])
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    out = subprocess.run([sys.executable, "-m", "keras_lopt.cli", "meta-train", "--out", "x",
                          "--iterations", "1"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "needs the JAX backend" in out.stderr


@jax_only
def test_task_reparametrisation_and_horizons():
    import jax

    from keras_lopt.meta.pes import PESMetaTrainer

    trainer = PESMetaTrainer(tiny_config(min_horizon=10, max_horizon=1000), families=tiny_families())
    fam = trainer.families[0]
    for seed in range(20):
        key = jax.random.PRNGKey(seed)
        run = trainer._init_run(fam, key)
        assert 10 <= int(run["horizon"]) <= 1000
        s = float(np.exp(run["log_scale"]))
        assert 1e-3 <= s <= 1e3
        w0 = fam.init_params(jax.random.split(key, 3)[2])
        for p, w in zip(run["params"], w0):
            np.testing.assert_allclose(np.asarray(p) * s, np.asarray(w), rtol=1e-5, atol=1e-7)
    state = trainer.init()
    runs = state["populations"][0]["runs"]
    t, horizon = np.asarray(runs["t"]), np.asarray(runs["horizon"])
    assert ((0 <= t) & (t < horizon)).all()
    # Antithetic particles share task, horizon and clock.
    np.testing.assert_array_equal(t[:2], t[2:])


@jax_only
def test_pes_accumulators_reset_with_their_runs():
    import jax

    from keras_lopt.meta.pes import PESMetaTrainer

    trainer = PESMetaTrainer(tiny_config(min_horizon=5, max_horizon=5, truncation=2),
                             families=tiny_families())
    state = trainer.init()
    saw_reset = saw_continue = False
    for _ in range(6):
        xi_before = {k: np.asarray(v) for k, v in state["populations"][0]["xi"].items()}
        t_before = np.asarray(state["populations"][0]["runs"]["t"])[:2]
        _, k_eps = jax.random.split(state["key"])
        eps = trainer.perturbations(k_eps, 0, state["theta"])
        eps = {k: np.asarray(v) for k, v in eps.items()}
        state, metrics = trainer.outer_step(state)
        assert np.isfinite(float(metrics["meta_loss"]))
        t_after = np.asarray(state["populations"][0]["runs"]["t"])[:2]
        for pair in range(2):
            restarted = t_after[pair] != t_before[pair] + 2
            for k, xi in state["populations"][0]["xi"].items():
                want = eps[k][pair] if restarted else xi_before[k][pair] + eps[k][pair]
                np.testing.assert_allclose(np.asarray(xi)[pair], want, rtol=1e-5, atol=1e-7)
            saw_reset |= bool(restarted)
            saw_continue |= not restarted
    assert saw_reset and saw_continue


@jax_only
def test_determinism_and_exact_resume(tmp_path):
    from keras_lopt.meta.train import meta_train

    # `a` runs straight through; `c` is killed after 2 iterations and resumed.
    a = meta_train(tiny_config(), str(tmp_path / "a"), 4, checkpoint_every=2,
                   families=tiny_families(), verbose=0)
    meta_train(tiny_config(), str(tmp_path / "c"), 2, families=tiny_families(), verbose=0)
    c = meta_train(tiny_config(), str(tmp_path / "c"), 4, families=tiny_families(), verbose=0)
    start = tiny_config()
    from keras_lopt.rules import celo2
    from keras_lopt.rules.theta import init_theta

    theta0 = init_theta("celo2", start.seed)
    assert any(not np.array_equal(a[k], theta0[k]) for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], c[k])
    rows = open(tmp_path / "c" / "metrics.csv").read().strip().splitlines()
    assert len(rows) == 5  # header + 4 iterations, none duplicated by the resume
    assert os.path.exists(tmp_path / "a" / "meta_loss.png")


SHARDING_SCRIPT = """
import jax, numpy as np, sys
sys.path.insert(0, {repo!r})
from tests.meta.test_meta import tiny_config, tiny_families
from keras_lopt.meta.pes import PESMetaTrainer
# Every kernel through the rule (routing "reference"): a larger meta-gradient,
# so that float re-association across devices stays far below the tolerance.
trainer = PESMetaTrainer(tiny_config(pairs_per_family=4, outer_lr=1e-3, routing="reference"),
                         families=tiny_families())
state = trainer.init()
for _ in range(3):
    state, _ = trainer.outer_step(state)
t = state["populations"][0]["runs"]["t"]
print("DEVICES", len(t.sharding.device_set))
arrays = {{k: np.asarray(v) for k, v in state["theta"].items()}}
arrays.update({{"m/" + k: np.asarray(v) for k, v in state["adam_m"].items()}})
np.savez({out!r}, **arrays)
"""


@jax_only
def test_population_is_sharded_over_devices_with_same_result(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    results = {}
    for n in (1, 4):
        out = str(tmp_path / f"theta{n}.npz")
        env = dict(os.environ, KERAS_BACKEND="jax",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        proc = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT.format(repo=repo, out=out)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"DEVICES {n}" in proc.stdout
        results[n] = np.load(out)
    # Equal up to float re-association inside XLA's partitioned programs.
    # The outer Adam's first moments (an average of the meta-gradients, not
    # normalised) agree to 5% of their scale: PES's antithetic differences
    # (L+ - L-) / sigma cancel most digits, so re-association inside XLA's
    # partitioned programs shows at the 1e-3..1e-2 level (more with one CPU
    # thread than with two); a real error (other perturbations, a
    # mis-sharded pair) changes them by their own size.
    # theta: Adam's first steps, about sign(g) * lr (lr = 1e-3), magnify
    # re-association in near-zero gradients, so an element may be up to a
    # step or two apart (seen with one CPU thread: 1 of 24 elements, 1.8e-3);
    # nearly all agree to half a step. No element can move more than the
    # 3 steps' budget.
    close = []
    for k in results[1].files:
        a, b = results[1][k], results[4][k]
        if k.startswith("m/"):
            np.testing.assert_allclose(a, b, rtol=0, atol=5e-2 * np.abs(a).max(), err_msg=k)
        else:
            np.testing.assert_allclose(a, b, rtol=0, atol=2 * 3 * 1e-3, err_msg=k)
            close.append(np.abs(a - b).ravel() <= 5e-4)
    assert np.mean(np.concatenate(close)) >= 0.95


@jax_only
def test_cli_meta_train(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, KERAS_BACKEND="jax")
    proc = subprocess.run(
        [sys.executable, "-m", "keras_lopt.cli", "meta-train", "--rule", "celo2_base",
         "--out", str(out), "--iterations", "2", "--families", "teacher_mlp",
         "--pairs-per-family", "1", "--truncation", "2", "--quiet",
         "--validate-every", "1", "--validation-runs", "1", "--validation-horizon", "3"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from keras_lopt.optimizers import Celo2Base

    opt = Celo2Base(weights=str(out / "theta.npz"))
    assert opt.theta["w1"].shape == (8, 8)
    assert (out / "checkpoint.npz").exists() and (out / "metrics.csv").exists()
    # The weights say where they come from: run, settings, command, progress.
    from keras_lopt.rules.theta import provenance

    record = provenance(str(out / "theta.npz"))
    assert record["rule"] == "celo2_base" and record["iteration"] == 2
    assert record["config"]["truncation"] == 2 and record["config"]["families"] == ["teacher_mlp"]
    assert "meta-train" in record["command"] and record["run"].endswith("run")
    rows = (out / "validation.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2"]
    best = provenance(str(out / "theta_best.npz"))["validation"]
    # Other weights are scored on the run's validation runs; the best theta
    # scores what the run recorded.
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.meta_validate", str(out), "momentum",
         str(out / "theta_best.npz"), "--out", str(tmp_path / "scores.json")],
        env=dict(env, PYTHONPATH=repo), cwd=repo, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores[str(out / "theta_best.npz")]["val_loss"] == pytest.approx(best["val_loss"],
                                                                           rel=1e-5)
    assert scores["momentum"]["val_loss"] != best["val_loss"]


@jax_only
def test_validation_scores_fixed_runs_and_keeps_the_best_theta(tmp_path):
    """Validation runs are the same whatever the training seed or iteration;
    `theta_best.npz` holds the theta of the lowest row, and a resume neither
    repeats nor loses rows."""
    import csv

    from keras_lopt.meta.pes import PESMetaTrainer
    from keras_lopt.meta.train import meta_train
    from keras_lopt.rules.theta import load, provenance

    cfg = dict(validate_every=2, validation_runs=3, validation_horizon=6, outer_lr=3e-2)
    one = PESMetaTrainer(tiny_config(**cfg), families=tiny_families())
    other = PESMetaTrainer(tiny_config(seed=1, **cfg), families=tiny_families())
    theta = one.init()["theta"]
    first = one.validate(theta)
    assert first == other.validate(theta) == one.validate(theta)
    assert set(first) == {"val_loss", "val_final", "val_tiny", "final_tiny"}
    assert 0 < first["val_final"] < first["val_loss"]  # the runs do train
    # The validation runs are at unit scale whatever reparametrisation the
    # training runs draw: the same scores with another scale range.
    narrow = PESMetaTrainer(tiny_config(min_scale=1.0, max_scale=1.0, **cfg),
                            families=tiny_families())
    assert narrow.validate(theta)["val_loss"] == pytest.approx(first["val_loss"], rel=1e-5)
    # Another theta scores differently: the runs depend on the learned rule
    # (a perturbation, not a rescaling: orthogonalisation would undo that).
    rng = np.random.default_rng(0)
    moved = {k: v + 0.3 * rng.standard_normal(v.shape).astype("float32")
             for k, v in theta.items()}
    assert one.validate(moved)["val_loss"] != first["val_loss"]

    out = tmp_path / "v"
    meta_train(tiny_config(**cfg), str(out), 4, checkpoint_every=2,
               families=tiny_families(), verbose=0)
    meta_train(tiny_config(**cfg), str(out), 6, checkpoint_every=2,
               families=tiny_families(), verbose=0)
    with open(out / "validation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [0, 2, 4, 6]
    assert float(rows[0]["val_loss"]) == pytest.approx(first["val_loss"], rel=1e-6)
    best = min(rows, key=lambda r: float(r["val_loss"]))
    record = provenance(str(out / "theta_best.npz"))
    assert record["iteration"] == int(best["iteration"])
    rescored = one.validate(load("celo2", str(out / "theta_best.npz")))
    assert rescored["val_loss"] == pytest.approx(float(best["val_loss"]), rel=1e-5)


def _reference_gradient(trainer, family, theta, population, eps):
    """PES written out step by step, particle by particle, without vmap/scan."""
    import jax

    cfg = trainer.config
    pairs = cfg.pairs_per_family
    runs = population["runs"]
    sign = np.concatenate([np.ones(pairs), -np.ones(pairs)])
    losses = np.zeros((cfg.truncation, 2 * pairs))
    resets = np.zeros((cfg.truncation, 2 * pairs), bool)
    for i in range(2 * pairs):
        run = jax.tree_util.tree_map(lambda a: a[i], runs)
        th = {k: v + sign[i] * eps[k][i % pairs] for k, v in theta.items()}
        for step in range(cfg.truncation):
            run, (loss, reset) = trainer._inner_step(family, th, run)
            losses[step, i], resets[step, i] = float(loss), bool(reset)
    grad = {k: np.zeros_like(np.asarray(v)) for k, v in theta.items()}
    for p in range(pairs):
        new_run = np.cumsum(resets[:, p]) > 0
        diff = (losses[:, p] - losses[:, pairs + p]) / cfg.truncation
        d_old, d_new = diff[~new_run].sum(), diff[new_run].sum()
        for k in grad:
            xi, e = np.asarray(population["xi"][k][p]), np.asarray(eps[k][p])
            grad[k] += (d_old * (xi + e) + d_new * e) / (2 * cfg.sigma**2) / pairs
    return grad, losses, resets


@jax_only
def test_pes_gradient_matches_a_step_by_step_computation():
    import jax

    from keras_lopt.meta.pes import PESMetaTrainer

    trainer = PESMetaTrainer(tiny_config(pairs_per_family=2, truncation=4, min_horizon=5,
                                         max_horizon=5), families=tiny_families())
    state = trainer.init()
    theta = state["theta"]
    population = state["populations"][0]
    rng = np.random.default_rng(0)
    # Earlier perturbations already accumulated, so the xi term matters.
    population["xi"] = {k: 0.01 * rng.standard_normal(v.shape).astype("float32")
                        for k, v in population["xi"].items()}
    # Put one pair one step before its horizon: it restarts inside the truncation.
    runs = population["runs"]
    # The other pair starts fresh and does not.
    runs["t"] = runs["t"].at[0].set(runs["horizon"][0] - 1).at[2].set(runs["horizon"][2] - 1)
    runs["t"] = runs["t"].at[1].set(0).at[3].set(0)
    eps = trainer.perturbations(jax.random.PRNGKey(3), 0, theta)
    family = trainer.families[0]
    grad, new_pop, _ = trainer._family_gradient(family, theta, population, eps)
    want, losses, resets = _reference_gradient(trainer, family, theta, population, eps)
    assert resets[:, 0].any() and not resets[:, 1].any()
    for k in want:
        np.testing.assert_allclose(np.asarray(grad[k]), want[k], rtol=2e-3, atol=1e-5)
    # The restarted pair keeps only this truncation's perturbation.
    for k in want:
        np.testing.assert_allclose(np.asarray(new_pop["xi"][k][0]), np.asarray(eps[k][0]), atol=1e-7)


@jax_only
def test_pes_gradient_points_uphill_along_a_shared_direction():
    """With every pair perturbed along one direction d and fresh runs, the
    estimate projected on d is the finite-difference slope of the loss."""
    from keras_lopt.meta.pes import PESMetaTrainer

    # Every kernel through the rule (routing "reference"): under the
    # deployment routing only the 4x4 middle kernel depends on theta, and the
    # finite-difference slope is then too small for float32 to check to 1e-3.
    trainer = PESMetaTrainer(tiny_config(pairs_per_family=2, truncation=5, min_horizon=50,
                                         max_horizon=50, sigma=0.05, routing="reference"),
                             families=tiny_families())
    state = trainer.init()
    theta, population = state["theta"], state["populations"][0]
    population["runs"]["t"] = population["runs"]["t"] * 0
    rng = np.random.default_rng(1)
    d = {k: rng.standard_normal(v.shape).astype("float32") for k, v in theta.items()}
    eps = {k: np.stack([trainer.config.sigma * v] * 2) for k, v in d.items()}
    family = trainer.families[0]
    grad, _, _ = trainer._family_gradient(family, theta, population, eps)
    _, losses, _ = _reference_gradient(trainer, family, theta, population, eps)
    slope = (losses[:, :2].mean() - losses[:, 2:].mean()) / (2 * trainer.config.sigma)
    projected = sum(float(np.sum(np.asarray(grad[k]) * d[k])) for k in d)
    norm2 = sum(float(np.sum(d[k] ** 2)) for k in d)
    assert slope != 0
    np.testing.assert_allclose(projected / norm2, slope, rtol=1e-3)


@jax_only
@pytest.mark.parametrize("rule", ["celo2", "celo2_base"])
def test_inner_step_is_the_keras_optimizer_step(rule):
    """One learned rule, two drivers: an inner meta-training step equals
    `Celo2`/`Celo2Base.apply` on the same gradients (task scale s = 1)."""
    import jax
    import jax.numpy as jnp

    from keras_lopt.meta.pes import PESMetaTrainer
    from keras_lopt.optimizers import Celo2
    from keras_lopt.optimizers import Celo2Base
    from keras_lopt.rules import celo2
    from keras_lopt.rules.theta import init_theta

    trainer = PESMetaTrainer(tiny_config(rule=rule, min_horizon=50, max_horizon=50,
                                         warmup_cosine_fraction=0.0),
                             families=tiny_families())
    family = trainer.families[0]
    theta = init_theta("celo2", seed=4)
    run = trainer._init_run(family, jax.random.PRNGKey(0))
    run["log_scale"] = jnp.zeros(())
    run["params"] = family.init_params(jax.random.PRNGKey(1))
    x, y = family.sample_batch(jax.random.fold_in(run["key"], run["t"]))
    grads = jax.grad(lambda ps: family.loss(ps, x, y))(run["params"])
    new_run, _ = trainer._inner_step(family, theta, run)

    cls = Celo2 if rule == "celo2" else Celo2Base
    opt = cls(weights=theta, learning_rate=trainer.config.inner_lr)
    variables = [keras.Variable(np.asarray(p)) for p in run["params"]]
    opt.apply(list(grads), variables)
    for v, p in zip(variables, new_run["params"]):
        np.testing.assert_allclose(np.asarray(v.value), np.asarray(p), rtol=0, atol=1e-7)


SHALLOW_FAMILIES = ("digits_mlp", "mnist1d_mlp", "teacher_mlp", "teacher_regression",
                    "raw_scale_binary")


@jax_only
def test_families_without_learned_tensors_are_refused():
    """Meta-training on a family the rule never touches only adds noise."""
    from keras_lopt.meta.pes import PESMetaTrainer

    families = tasks.make_families(["digits_mlp", "digits_deep_mlp"])
    with pytest.raises(ValueError, match=r"families \['digits_mlp'\] send no tensor"):
        PESMetaTrainer(tiny_config(), families=families)
    PESMetaTrainer(tiny_config(routing="reference"), families=families)
    # The default distribution is fit for the default (deployment) routing.
    PESMetaTrainer(tiny_config(), families=tasks.default_families())


@jax_only
@pytest.mark.parametrize("name", sorted(tasks.FAMILIES))
def test_every_family_builds_and_trains_one_inner_step(name):
    """Each registered family runs through the trainer's inner step."""
    import jax

    from keras_lopt.meta.pes import PESMetaTrainer

    family = tasks.make_families([name])[0]
    assert family.num_params > 0 and family.max_loss > 0
    # One hidden layer: under the deployment routing both kernels are the
    # input and output layers' (Adam), so nothing depends on theta.
    shallow = name in SHALLOW_FAMILIES
    config = tiny_config(routing="reference" if shallow else "deployment")
    trainer = PESMetaTrainer(config, families=[family])
    run = trainer._init_run(family, jax.random.PRNGKey(0))
    for shape, p in zip(family.shapes, run["params"]):
        assert tuple(p.shape) == shape
    new_run, (loss, reset) = trainer._inner_step(family, trainer.theta0, run)
    assert np.isfinite(float(loss)) and 0.0 <= float(loss) <= family.max_loss * (1 + 1e-6)
    moved = [not np.allclose(a, b) for a, b in zip(run["params"], new_run["params"])]
    assert any(moved)


def test_regression_family_and_init_weights(tmp_path):
    if keras.backend.backend() != "jax":
        pytest.skip("needs KERAS_BACKEND=jax")
    from keras_lopt.meta.pes import PESMetaTrainer
    from keras_lopt.rules import celo2
    from keras_lopt.rules.theta import init_theta
    from keras_lopt.rules.theta import save_theta

    family = tasks.make_families(["teacher_regression"])[0]
    assert family.objective == "regression" and family.y.dtype == np.float32
    np.testing.assert_allclose(family.y.std(0), 1.0, rtol=1e-3)
    # Predicting zero on standardised targets costs an MSE of 1.
    zeros = [np.zeros(s, "float32") for s in family.shapes]
    assert abs(float(family.loss(zeros, family.x, family.y)) - 1.0) < 1e-3
    with pytest.raises(ValueError, match="objective"):
        tasks.TaskFamily("bad", family.x, family.y, (4,), 4, objective="ranking")

    theta = {k: v + 0.5 for k, v in init_theta("celo2", 3).items()}
    path = str(tmp_path / "start.npz")
    save_theta(path, theta, "celo2")
    trainer = PESMetaTrainer(tiny_config(init_weights=path), families=tiny_families())
    for k in theta:
        np.testing.assert_array_equal(trainer.theta0[k], theta[k])


@jax_only
def test_celo_inner_steps_are_the_keras_optimizer_steps(tmp_path):
    """Celo's inner runs hand their loss and horizon to the same rule that
    `Celo.apply(..., loss=)` runs: three steps agree, scheduler included."""
    import jax
    import jax.numpy as jnp

    from keras_lopt.meta.pes import PESMetaTrainer
    from keras_lopt.optimizers import Celo
    from keras_lopt.rules import celo
    from keras_lopt.rules.theta import init_theta

    theta = init_theta("celo", seed=2)
    rng = np.random.default_rng(0)
    # A scheduler that reacts to its inputs, so lr_mult differs from 1.
    theta["rnn_params/step_size/w"] = rng.normal(0, 0.3, (64, 1)).astype("float32")
    from keras_lopt.optimizers import save_theta

    path = str(tmp_path / "theta.npz")
    save_theta(path, theta, "celo")
    trainer = PESMetaTrainer(
        tiny_config(rule="celo", phase=2, init_weights=path, min_horizon=50, max_horizon=50),
        families=tiny_families(),
    )
    family = trainer.families[0]
    run = trainer._init_run(family, jax.random.PRNGKey(0))
    run["log_scale"] = jnp.zeros(())
    opt = Celo(weights=theta, total_steps=int(run["horizon"]))
    variables = [keras.Variable(np.asarray(p)) for p in run["params"]]
    trained = {k: jnp.asarray(theta[k]) for k in celo.SCHEDULER_KEYS}
    for _ in range(3):
        x, y = family.sample_batch(jax.random.fold_in(run["key"], run["t"]))
        loss, grads = jax.value_and_grad(lambda ps: family.loss(ps, x, y))(run["params"])
        run, _ = trainer._inner_step(family, trained, run)
        opt.apply(list(grads), variables, loss=loss)
        for v, p in zip(variables, run["params"]):
            np.testing.assert_allclose(np.asarray(v.value), np.asarray(p), rtol=0, atol=1e-6)
    assert abs(opt.lr_mult - 1.0) > 1e-3


@jax_only
def test_celo_two_phases_train_their_own_half(tmp_path):
    from keras_lopt.meta.train import meta_train
    from keras_lopt.optimizers import Celo
    from keras_lopt.rules import celo
    from keras_lopt.rules.theta import init_theta

    with pytest.raises(ValueError, match="init_weights"):
        tiny_config(rule="celo", phase=2)
    start = init_theta("celo", 0)
    # No outer weight decay: a change of theta then comes from the gradient.
    one = meta_train(tiny_config(rule="celo", phase=1, outer_weight_decay=0.0),
                     str(tmp_path / "p1"), 2, families=tiny_families(), verbose=0)
    for k in celo.SCHEDULER_KEYS:
        np.testing.assert_array_equal(one[k], start[k])
    assert any(not np.array_equal(one[k], start[k]) for k in celo.MLP_KEYS)
    two = meta_train(
        tiny_config(rule="celo", phase=2, outer_weight_decay=0.0,
                    init_weights=str(tmp_path / "p1" / "theta.npz")),
        str(tmp_path / "p2"), 2, families=tiny_families(), verbose=0,
    )
    for k in celo.MLP_KEYS:
        np.testing.assert_array_equal(two[k], one[k])
    assert any(not np.array_equal(two[k], one[k]) for k in celo.SCHEDULER_KEYS)
    # The written theta is complete: Celo loads it as is.
    Celo(weights=str(tmp_path / "p2" / "theta.npz"), total_steps=10)


@jax_only
def test_resume_reports_each_changed_setting(tmp_path):
    """A resumed run keeps its recorded settings and names every one passed
    differently; other task families are refused, not silently swapped."""
    import warnings

    from keras_lopt.meta.train import _changed_settings, meta_train

    meta_train(tiny_config(), str(tmp_path / "r"), 1, families=tiny_families(), verbose=0)
    with pytest.warns(UserWarning, match=r"sigma: 0.01 -> 0.02"):
        meta_train(tiny_config(sigma=0.02), str(tmp_path / "r"), 2,
                   families=tiny_families(), verbose=0)
    other = tiny_families()
    other[0].name = "tiny_renamed"
    with pytest.raises(ValueError, match="meta-trained on the families"):
        meta_train(tiny_config(), str(tmp_path / "r"), 3, families=other, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        meta_train(tiny_config(), str(tmp_path / "r"), 3, families=tiny_families(), verbose=0)
    # The command line names families: a changed list is reported like the rest.
    text = _changed_settings(tiny_config(families=("a", "b")), tiny_config(families=("a",)))
    assert text == "families: ('a', 'b') -> ('a',)"
