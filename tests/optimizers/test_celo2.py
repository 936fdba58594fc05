"""Celo2 / Celo2Base as Keras optimizers: fit, serialization, base features."""

import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_lopt.callbacks import FeedLossAndHorizon
from keras_lopt.optimizers import Celo
from keras_lopt.optimizers import Celo2
from keras_lopt.optimizers import Celo2Base
from keras_lopt.rules import celo2
from keras_lopt.rules.theta import init_theta

OPTIMIZERS = [Celo2, Celo2Base]


def _data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 12)).astype("float32")
    w = rng.standard_normal((12, 3)).astype("float32")
    y = np.argmax(x @ w, axis=-1).astype("int32")
    return x, y


def _model(seed=1):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(3, name="logits"),
        ]
    )


def _compile(model, optimizer):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_fit_learns(cls):
    x, y = _data()
    model = _compile(_model(), cls())
    before = model.evaluate(x, y, verbose=0)[0]
    history = model.fit(x, y, epochs=5, batch_size=32, verbose=0, shuffle=False)
    after = model.evaluate(x, y, verbose=0)[0]
    assert np.isfinite(history.history["loss"]).all()
    assert after < before, (before, after)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_save_load_resumes_identical_trajectory(cls, tmp_path):
    x, y = _data()
    model = _compile(_model(), cls(learning_rate=3e-3, weight_decay=0.01))
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, shuffle=False)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert type(restored.optimizer) is cls
    assert int(restored.optimizer.iterations) == int(model.optimizer.iterations)
    for a, b in zip(model.optimizer.variables, restored.optimizer.variables):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, shuffle=False)
    restored.fit(x, y, epochs=1, batch_size=32, verbose=0, shuffle=False)
    for a, b in zip(model.trainable_variables, restored.trainable_variables):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))


def test_config_round_trip_with_custom_weights():
    theta = init_theta("celo2", seed=3)
    opt = Celo2(
        learning_rate=keras.optimizers.schedules.CosineDecay(1e-3, 100),
        weights=theta,
        weight_decay=0.1,
        adam_lr_ratio=10,
        adam_bias_correction=True,
        exclude_layers=["logits"],
        clipnorm=1.0,
    )
    config = opt.get_config()
    clone = Celo2.from_config(config)
    for k in theta:
        np.testing.assert_array_equal(clone.theta[k], theta[k])
    assert clone.adam_lr_ratio == 10 and clone.adam_bias_correction
    assert clone.exclude_layers == ["logits"] and clone.clipnorm == 1.0
    assert isinstance(clone._learning_rate, keras.optimizers.schedules.CosineDecay)
    serialized = keras.optimizers.serialize(opt)
    again = keras.optimizers.deserialize(serialized)
    assert isinstance(again, Celo2)
    # Custom weights travel as numbers in the config, never as a path.
    assert isinstance(config["weights"], dict)


@pytest.mark.parametrize("cls,name", [(Celo2, "celo2"), (Celo2Base, "celo2_base"), (Celo, "celo")])
def test_shipped_weights_travel_by_version_and_names_resolve(cls, name, tmp_path):
    """Shipped weights are named by their immutable version in the config
    (Celo's 37k meta-weights once made 800 KB configs); the optimizers
    resolve by name like Keras's own, and a saved model stays small."""
    import json

    from keras_lopt.rules import theta as theta_lib

    for weights, version in [(None, theta_lib.DEFAULT_VERSION[name]),
                             (theta_lib.SHIPPED[name][0], theta_lib.SHIPPED[name][0])]:
        opt = cls(weights=weights)
        config = opt.get_config()
        assert config["weights"] == version
        assert len(json.dumps(keras.optimizers.serialize(opt))) < 4000
        clone = keras.optimizers.deserialize(json.loads(json.dumps(keras.optimizers.serialize(opt))))
        assert type(clone) is cls
        for k in opt.theta:
            np.testing.assert_array_equal(clone.theta[k], opt.theta[k])
    for identifier in (name, cls.__name__):
        assert type(keras.optimizers.get(identifier)) is cls
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), keras.layers.Dense(8),
                              keras.layers.Dense(2)])
    model.compile(optimizer=name, loss="mse")
    assert type(model.optimizer) is cls
    x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    callbacks = [FeedLossAndHorizon()] if cls is Celo else []
    model.fit(x, x[:, :2], epochs=1, batch_size=8, verbose=0, callbacks=callbacks)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    assert os.path.getsize(path) < 100_000
    restored = keras.models.load_model(path)
    assert type(restored.optimizer) is cls


def test_routing_embeddings_biases_and_excluded_layers():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(20, 8, name="embedding"),
            keras.layers.Flatten(),
            keras.layers.Dense(8, name="body"),
            keras.layers.Dense(4, name="head"),
        ]
    )
    opt = Celo2(exclude_layers=["head"])
    opt.build(model.trainable_variables)
    routes = {
        v.path.split("/", 1)[1]: opt._routes[opt._get_variable_index(v)].branch
        for v in model.trainable_variables
    }
    assert routes == {
        "embedding/embeddings": "adam",
        "body/kernel": "rule",
        "body/bias": "adam",
        "head/kernel": "adam",
        "head/bias": "adam",
    }
    opt = Celo2(exclude_embeddings=False, routing="reference")
    opt.build(model.trainable_variables)
    assert opt._routes[0].branch == "rule"
    # Deployment: the embedding is also the input layer; include_layers overrides.
    opt = Celo2(exclude_embeddings=False)
    opt.build(model.trainable_variables)
    assert opt._routes[0].reason == "input layer"
    opt = Celo2(include_layers="embedding")
    opt.build(model.trainable_variables)
    assert opt._routes[0].branch == "rule"
    base = Celo2Base()
    base.build(model.trainable_variables)
    assert {r.branch for r in base._routes} == {"rule"}


def test_embedding_model_fits():
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).integers(0, 20, (64, 5)).astype("int32")
    y = (x.sum(-1) % 2).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(20, 8),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ]
    )
    _compile(model, Celo2())
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert all(np.isfinite(ops.convert_to_numpy(v)).all() for v in model.weights)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clipnorm": 0.5},
        {"global_clipnorm": 0.5},
        {"clipvalue": 0.01},
        {"use_ema": True, "ema_overwrite_frequency": 2},
        {"loss_scale_factor": 128.0},
        {"gradient_accumulation_steps": 2},
        {"learning_rate": keras.optimizers.schedules.ExponentialDecay(1e-3, 10, 0.5)},
    ],
    ids=["clipnorm", "global_clipnorm", "clipvalue", "ema", "loss_scale", "grad_accum", "schedule"],
)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_base_optimizer_features_in_fit(cls, kwargs):
    x, y = _data(128)
    model = _compile(_model(), cls(**kwargs))
    history = model.fit(x, y, epochs=2, batch_size=32, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"]).all()
    # `iterations` counts applied updates: 4 batches x 2 epochs.
    expected = 8 // kwargs.get("gradient_accumulation_steps", 1)
    assert int(model.optimizer.iterations) == expected


def _apply_once(opt, grads, variables):
    opt.apply([ops.convert_to_tensor(g) for g in grads], variables)
    return [ops.convert_to_numpy(v) for v in variables]


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_clipvalue_changes_the_step_as_keras_does(cls):
    rng = np.random.default_rng(0)
    init = rng.standard_normal((6, 4)).astype("float32")
    grad = (100.0 * rng.standard_normal((6, 4))).astype("float32")
    clipped = np.clip(grad, -0.5, 0.5)
    a = _apply_once(cls(clipvalue=0.5), [grad], [keras.Variable(init)])
    b = _apply_once(cls(), [clipped], [keras.Variable(init)])
    np.testing.assert_allclose(a[0], b[0], atol=1e-7)


def test_gradient_accumulation_updates_every_n_steps():
    rng = np.random.default_rng(0)
    var = keras.Variable(rng.standard_normal((4, 3)).astype("float32"))
    opt = Celo2Base(gradient_accumulation_steps=3)
    start = ops.convert_to_numpy(var)
    for i in range(3):
        opt.apply([ops.convert_to_tensor(rng.standard_normal((4, 3)).astype("float32"))], [var])
        changed = not np.array_equal(ops.convert_to_numpy(var), start)
        assert changed == (i == 2)


def test_weight_decay_and_exclusion():
    rng = np.random.default_rng(0)
    init = {n: rng.standard_normal((5, 4)).astype("float32") for n in ("a", "b")}
    grads = [rng.standard_normal((5, 4)).astype("float32") for _ in range(2)]

    def run(wd, exclude):
        va, vb = keras.Variable(init["a"], name="keep"), keras.Variable(init["b"], name="skip")
        opt = Celo2Base(learning_rate=0.1, weight_decay=wd)
        if exclude:
            opt.exclude_from_weight_decay(var_names=["skip"])
        return _apply_once(opt, grads, [va, vb])

    plain = run(None, False)
    decayed = run(0.5, True)
    np.testing.assert_allclose(decayed[1], plain[1], atol=1e-7)
    # Decoupled decay: p_new = p - lr * u - lr * wd * p.
    np.testing.assert_allclose(decayed[0], plain[0] - 0.1 * 0.5 * init["a"], atol=1e-6)


def test_adam_branch_bias_correction_option():
    g = np.array([0.5, -2.0, 3.0], "float32")
    for corrected in (False, True):
        var = keras.Variable(np.zeros(3, "float32"))
        opt = Celo2(learning_rate=1e-3, adam_bias_correction=corrected)
        out = _apply_once(opt, [g], [var])[0]
        m, v = 0.1 * g, 0.05 * g**2
        if corrected:
            step = (m / 0.1) / (np.sqrt(v / 0.05) + 1e-8)
        else:
            step = m / np.sqrt(v + 1e-8)
        np.testing.assert_allclose(out, -0.02 * step, rtol=1e-5)


def test_loss_scale_optimizer_mixed_float16():
    x, y = _data(128)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model()
        opt = keras.optimizers.LossScaleOptimizer(Celo2())
        _compile(model, opt)
        history = model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.isfinite(history.history["loss"]).all()
    assert all(np.isfinite(ops.convert_to_numpy(v)).all() for v in model.trainable_variables)
