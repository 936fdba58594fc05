"""One rule, one routing, one scheduler step, two drivers.

The Keras optimizers and the meta-trainer must call the same functions of
`keras_lopt.rules`: each test changes one of them (the routing decision, the
Celo scheduler step) and checks that both drivers follow, the first step of
each equal to 1e-7, two more to 1e-6. A driver with a copy of its own would ignore the change and
diverge.
"""

import keras
import numpy as np
import pytest

from keras_lopt.rules import celo
from keras_lopt.rules import routing
from keras_lopt.rules.theta import init_theta

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="the meta-trainer runs on JAX only"
)


def _trainer(**config):
    from keras_lopt.meta import tasks
    from keras_lopt.meta.config import MetaTrainConfig
    from keras_lopt.meta.pes import PESMetaTrainer

    x, y = tasks.teacher_data(seed=0, n=64, features=6, classes=3)
    family = tasks.TaskFamily("tiny", x, y, (4, 5), 3, batch_size=8)
    base = dict(seed=0, pairs_per_family=2, truncation=3, min_horizon=50, max_horizon=50,
                warmup_cosine_fraction=0.0)
    return PESMetaTrainer(MetaTrainConfig(**dict(base, **config)), families=[family])


def _flip_first_kernel(monkeypatch):
    """Patches `routing.route` to send the first layer's kernel (6 x 4), an
    input layer that the deployment policy sends to Adam, to the rule."""
    original = routing.route
    seen = []

    def patched(shape, path, rule, **kwargs):
        got = original(shape, path, rule, **kwargs)
        seen.append(path)
        if tuple(shape) == (6, 4):
            assert got.branch == routing.ADAM
            return routing.Route(routing.RULE, got.shape)
        return got

    monkeypatch.setattr(routing, "route", patched)
    return seen


def test_both_drivers_share_the_routing(monkeypatch):
    from keras_lopt.optimizers import Celo2

    seen = _flip_first_kernel(monkeypatch)
    trainer = _trainer(rule="celo2")
    family = trainer.families[0]
    assert seen == family.paths
    expected = ["rule", "adam", "rule", "adam", "adam", "adam"]
    assert [r.branch for r in trainer._routes(family)] == expected
    theta = init_theta("celo2", seed=4)
    seen.clear()
    # The optimizer sees the task model's own variables (same paths).
    optimizer = Celo2(weights=theta, learning_rate=trainer.config.inner_lr)
    variables = family.model.trainable_variables
    optimizer.attach(family.model).build(variables)
    assert [r.branch for r in optimizer._routes] == expected
    _check_steps(trainer, optimizer, theta, variables)


def test_both_drivers_share_the_schedule():
    """An inner run on warm-up + cosine steps as `Celo2(total_steps=horizon)`."""
    from keras_lopt.optimizers import Celo2

    trainer = _trainer(rule="celo2", warmup_cosine_fraction=1.0, truncation=3)
    family = trainer.families[0]
    theta = init_theta("celo2", seed=4)
    optimizer = Celo2(weights=theta, learning_rate=trainer.config.inner_lr, total_steps=50)
    variables = family.model.trainable_variables
    optimizer.attach(family.model).build(variables)
    run = _check_steps(trainer, optimizer, theta, variables, steps=4)
    assert int(run["t"]) == 4
    # A constant-rate optimizer differs from the scheduled run.
    constant = Celo2(weights=theta, learning_rate=trainer.config.inner_lr).attach(family.model)
    constant.build(variables)
    with pytest.raises(AssertionError):
        _check_steps(trainer, constant, theta, variables, steps=2)


def _check_steps(trainer, optimizer, theta, variables, with_loss=False, steps=3):
    """`steps` inner steps and `optimizer.apply`s on the same gradients: the
    first equal to 1e-7, the later ones (state, step counters, Celo's LSTM)
    to 1e-6."""
    import jax
    import jax.numpy as jnp

    family = trainer.families[0]
    run = trainer._init_run(family, jax.random.PRNGKey(0))
    run["log_scale"] = jnp.zeros(())
    run["params"] = family.init_params(jax.random.PRNGKey(1))
    for v, p in zip(variables, run["params"]):
        v.assign(np.asarray(p))
    start = [np.asarray(p) for p in run["params"]]
    for step in range(steps):
        x, y = family.sample_batch(jax.random.fold_in(run["key"], run["t"]))
        loss, grads = jax.value_and_grad(lambda ps: family.loss(ps, x, y))(run["params"])
        run, _ = trainer._inner_step(family, theta, run)
        optimizer.apply(list(grads), variables, **({"loss": loss} if with_loss else {}))
        for v, p in zip(variables, run["params"]):
            np.testing.assert_allclose(np.asarray(v.value), np.asarray(p), rtol=0,
                                       atol=1e-7 if step == 0 else 1e-6, err_msg=f"step {step}")
    assert any(not np.allclose(np.asarray(p), p0) for p, p0 in zip(run["params"], start))
    return run


def test_both_drivers_share_the_celo_scheduler_step(monkeypatch, tmp_path):
    import jax.numpy as jnp

    from keras_lopt.optimizers import Celo
    from keras_lopt.rules.theta import save_theta

    theta = init_theta("celo", seed=2)
    rng = np.random.default_rng(0)
    # A scheduler that reacts to its inputs, so lr_mult differs from 1.
    theta["rnn_params/step_size/w"] = rng.normal(0, 0.3, (64, 1)).astype("float32")
    path = str(tmp_path / "theta.npz")
    save_theta(path, theta, "celo")
    original = celo.scheduler_update
    callers = []

    def patched(*args, **kwargs):
        # A change to the shared step: halve every tensor's lr_mult.
        lr_mult, control, loss_ok, state = original(*args, **kwargs)
        callers.append(kwargs.get("use_scheduler"))
        return 0.5 * lr_mult, control, loss_ok, state

    monkeypatch.setattr(celo, "scheduler_update", patched)
    trainer = _trainer(rule="celo", phase=2, init_weights=path)
    family = trainer.families[0]
    trained = {k: jnp.asarray(theta[k]) for k in celo.SCHEDULER_KEYS}
    optimizer = Celo(weights=theta, total_steps=50)
    variables = family.model.trainable_variables
    new_run = _check_steps(trainer, optimizer, trained, variables, with_loss=True)
    assert callers == [True] * 6
    # The halved multiplier reached both drivers: the LSTM state moved and
    # the optimizer reports lr_mult / 2 of the unpatched step.
    assert abs(optimizer.lr_mult - 1.0) > 1e-3
    np.testing.assert_allclose(
        np.asarray(optimizer._scheduler_state["hidden"].value),
        np.asarray(new_run["lstm"]["hidden"]), rtol=0, atol=1e-7,
    )
