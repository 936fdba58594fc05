"""`benchmarks.matrix_muon.MatrixMuon`: Muon with Celo2's routing and matrix views."""

import keras
import numpy as np

from benchmarks.matrix_muon import ADAM
from benchmarks.matrix_muon import RULE
from benchmarks.matrix_muon import MatrixMuon
from benchmarks.matrix_muon import local_plan


def _steps(optimizer, variable, gradients, others=()):
    """`variable` after applying `gradients`; `others` are trained alongside
    it with zero gradients."""
    for g in gradients:
        pairs = [(keras.ops.convert_to_tensor(g), variable)]
        pairs += [(keras.ops.zeros(v.shape), v) for v in others]
        optimizer.apply_gradients(pairs)
    return keras.ops.convert_to_numpy(variable)


def _cnn():
    return keras.Sequential([
        keras.Input((6, 6, 4)),
        keras.layers.Conv2D(4, 3, padding="same", name="conv_in"),
        keras.layers.Conv2D(8, 3, padding="same", name="conv_mid"),
        keras.layers.Flatten(),
        keras.layers.Dense(5, name="head"),
    ])


def test_conv_kernel_step_equals_muon_on_the_explicit_matrix():
    # The hidden conv kernel (3, 3, 4, 8) of a model takes Muon's step on
    # its (36, 8) matrix (with the library's `plan` or the local fallback).
    model = _cnn()
    conv = model.get_layer("conv_mid").kernel
    others = [v for v in model.trainable_variables if v is not conv]
    kernel = keras.ops.convert_to_numpy(conv)
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=kernel.shape).astype("float32") for _ in range(3)]
    optimizer = MatrixMuon(learning_rate=0.01, model=model)
    got = _steps(optimizer, conv, grads, others)
    route = optimizer.routes[0]
    assert route.branch == RULE and tuple(route.shape) == (36, 8)
    matrix = keras.Variable(kernel.reshape(36, 8), name="kernel")
    want = _steps(keras.optimizers.Muon(learning_rate=0.01), matrix,
                  [g.reshape(36, 8) for g in grads])
    np.testing.assert_allclose(got.reshape(36, 8), want, rtol=1e-5, atol=1e-6)
    # And it is not what Keras Muon does to the 4-D kernel (its AdamW branch).
    adamw = _steps(keras.optimizers.Muon(learning_rate=0.01),
                   keras.Variable(kernel, name="kernel"), grads)
    assert not np.allclose(adamw, got, atol=1e-4)


def test_local_plan_routes_sequential_cnn():
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, name="conv_in"),
        keras.layers.Conv2D(6, 3, name="conv_mid"),
        keras.layers.Flatten(),
        keras.layers.Dense(5, name="head"),
    ])
    routes = {v.path.split("/", 1)[-1]: r for v, r in zip(
        model.trainable_variables, local_plan(model.trainable_variables, model))}
    assert routes["conv_in/kernel"].branch == ADAM
    assert routes["head/kernel"].branch == ADAM
    assert routes["conv_mid/bias"].branch == ADAM
    assert routes["conv_mid/kernel"].branch == RULE
    assert tuple(routes["conv_mid/kernel"].shape) == (36, 6)


def test_local_plan_views_attention_kernels():
    x = keras.Input((5, 8))
    h = keras.layers.Dense(8, name="inp")(x)
    h = keras.layers.MultiHeadAttention(2, 4, name="mha")(h, h)
    model = keras.Model(x, keras.layers.Dense(3, name="out")(h))
    routes = {v.path: r for v, r in zip(model.trainable_variables,
                                        local_plan(model.trainable_variables, model))}
    assert tuple(routes["mha/query/kernel"].shape) == (8, 8)
    assert tuple(routes["mha/attention_output/kernel"].shape) == (8, 8)
    assert routes["mha/query/kernel"].branch == RULE
    assert routes["inp/kernel"].branch == ADAM and routes["out/kernel"].branch == ADAM


def test_matrix_muon_trains_a_model():
    model = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Conv2D(3, 3),
                              keras.layers.Conv2D(3, 2), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    opt = MatrixMuon(learning_rate=1e-2, model=model)
    model.compile(optimizer=opt, loss="mse")
    x = np.random.default_rng(0).normal(size=(8, 4, 4, 2)).astype("float32")
    y = np.zeros((8, 2), "float32")
    first = model.train_on_batch(x, y)
    for _ in range(5):
        last = model.train_on_batch(x, y)
    assert np.isfinite(last) and last < first
    assert "rule" in opt.routing_summary()
