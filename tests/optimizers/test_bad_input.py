"""Non-finite gradients, unusual shapes and dtypes, wrong weights."""

import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_lopt.optimizers import Celo2
from keras_lopt.optimizers import Celo2Base
from keras_lopt.rules import celo2
from keras_lopt.rules.theta import init_theta
from keras_lopt.optimizers import save_theta

OPTIMIZERS = [Celo2, Celo2Base]


def _numpy(values):
    return [ops.convert_to_numpy(v) for v in values]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_non_finite_gradient_leaves_tensor_and_state_untouched(cls, bad):
    rng = np.random.default_rng(0)
    shapes = [(6, 4), (4,), ()]
    variables = [keras.Variable(rng.standard_normal(s).astype("float32")) for s in shapes]
    opt = cls()
    good = [rng.standard_normal(s).astype("float32") for s in shapes]
    opt.apply([ops.convert_to_tensor(g) for g in good], variables)
    params_before = _numpy(variables)
    state_before = _numpy(opt.variables)
    poisoned = [g.copy() for g in good]
    poisoned[0][1, 2] = bad
    poisoned[1][0] = bad
    poisoned[2] = np.float32(bad)
    opt.apply([ops.convert_to_tensor(g) for g in poisoned], variables)
    for before, after in zip(params_before, _numpy(variables)):
        np.testing.assert_array_equal(before, after)
    for before, after in zip(state_before, _numpy(opt.variables)):
        if before.shape == ():  # iteration counter and learning rate
            continue
        np.testing.assert_array_equal(before, after)
    assert int(opt.iterations) == 2
    # A later finite gradient updates normally.
    opt.apply([ops.convert_to_tensor(g) for g in good], variables)
    after = _numpy(variables)
    assert all(np.isfinite(a).all() for a in after)
    assert not np.array_equal(after[0], params_before[0])


def _compiled_apply(optimizer, grads, variables):
    """One update through the backend's compiled path (`fit` uses it)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        values, states = jax.jit(optimizer.stateless_apply)(
            [v.value for v in optimizer.variables], grads, [v.value for v in variables]
        )
        for var, value in zip(variables, values):
            var.assign(value)
        for var, value in zip(optimizer.variables, states):
            var.assign(value)
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.function(lambda: optimizer.apply(grads, variables))()
    else:  # torch has no graph mode here: eager is what `fit` runs
        optimizer.apply(grads, variables)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_non_finite_gradient_is_skipped_in_a_compiled_step(cls):
    rng = np.random.default_rng(2)
    shapes = [(5, 3), (3,)]
    variables = [keras.Variable(rng.standard_normal(s).astype("float32")) for s in shapes]
    optimizer = cls()
    optimizer.build(variables)
    grads = [rng.standard_normal(s).astype("float32") for s in shapes]
    _compiled_apply(optimizer, [ops.convert_to_tensor(g) for g in grads], variables)
    params_before, state_before = _numpy(variables), _numpy(optimizer.variables)
    grads[0][4, 1] = np.inf
    _compiled_apply(optimizer, [ops.convert_to_tensor(g) for g in grads], variables)
    after, state_after = _numpy(variables), _numpy(optimizer.variables)
    np.testing.assert_array_equal(after[0], params_before[0])
    assert not np.array_equal(after[1], params_before[1])
    for variable, before, now in zip(optimizer.variables, state_before, state_after):
        if variable.path.startswith(optimizer.name) and variable.shape == (5, 3):
            np.testing.assert_array_equal(before, now)
    assert all(np.isfinite(a).all() for a in after)
    assert int(optimizer.iterations) == 2


def test_only_the_poisoned_tensor_is_skipped():
    rng = np.random.default_rng(1)
    a = keras.Variable(rng.standard_normal((3, 3)).astype("float32"))
    b = keras.Variable(rng.standard_normal((3, 3)).astype("float32"))
    start = _numpy([a, b])
    g = rng.standard_normal((3, 3)).astype("float32")
    bad = g.copy()
    bad[0, 0] = np.nan
    Celo2().apply([ops.convert_to_tensor(bad), ops.convert_to_tensor(g)], [a, b])
    np.testing.assert_array_equal(ops.convert_to_numpy(a), start[0])
    assert not np.array_equal(ops.convert_to_numpy(b), start[1])


@pytest.mark.parametrize(
    "shape", [(), (1,), (1, 1), (1, 50), (50, 1), (2, 300), (3, 3, 4, 8), (5, 7, 3), (2, 1, 6)]
)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_unusual_shapes_give_unit_rms_finite_steps(cls, shape):
    rng = np.random.default_rng(0)
    init = rng.standard_normal(shape).astype("float32")
    var = keras.Variable(init)
    opt = cls(learning_rate=1.0)
    for _ in range(3):
        before = ops.convert_to_numpy(var)
        opt.apply([ops.convert_to_tensor(rng.standard_normal(shape).astype("float32"))], [var])
    after = ops.convert_to_numpy(var)
    assert after.shape == tuple(shape)
    assert np.isfinite(after).all()
    step = (before - after).reshape(celo2.working_shape(shape))
    route = opt._routes[0]
    if route.branch == "rule":
        # Unit RMS over the last two axes (one axis for vectors).
        axes = (-1,) if step.ndim == 1 else (-2, -1)
        rms = np.sqrt(np.mean(step.astype("float64") ** 2, axis=axes))
        np.testing.assert_allclose(rms, 1.0, rtol=1e-3)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_low_precision_variables_keep_dtype_and_float32_state(cls, dtype):
    rng = np.random.default_rng(0)
    var = keras.Variable(rng.standard_normal((8, 4)).astype("float32"), dtype=dtype)
    vec = keras.Variable(np.zeros(4, "float32"), dtype=dtype)
    opt = cls(learning_rate=1e-2)
    for _ in range(2):
        opt.apply(
            [
                ops.cast(ops.convert_to_tensor(rng.standard_normal((8, 4)).astype("float32")), dtype),
                ops.cast(ops.ones((4,)), dtype),
            ],
            [var, vec],
        )
    assert keras.backend.standardize_dtype(var.dtype) == dtype
    assert np.isfinite(ops.convert_to_numpy(ops.cast(var, "float32"))).all()
    for v in opt.variables:
        if len(v.shape):
            assert keras.backend.standardize_dtype(v.dtype) == "float32"


def test_integer_variables_are_rejected():
    var = keras.Variable(np.zeros((3, 3), "int32"), dtype="int32", trainable=False)
    with pytest.raises(TypeError, match="floating-point"):
        Celo2().build([var])


def test_missing_and_misshaped_weights_are_named(tmp_path):
    theta = init_theta("celo2")
    del theta["w1"]
    theta["w0__3"] = np.zeros((2, 8), "float32")
    with pytest.raises(ValueError, match=r"missing entries \['w1'\].*'w0__3' has shape \(2, 8\)"):
        Celo2(weights=theta)
    path = os.path.join(tmp_path, "bad.npz")
    save_theta(path, theta, "celo2_base")
    with pytest.raises(ValueError, match="missing entries"):
        Celo2Base(weights=path)


def test_weights_of_another_rule_are_refused(tmp_path):
    # Celo2 and Celo2-base meta-weights have the same shapes but mean
    # different rules: the file's `__rule__` tag decides.
    from keras_lopt.optimizers import Celo
    from keras_lopt.rules.theta import shipped_path

    shipped_celo2 = shipped_path("celo2-v2")
    with pytest.raises(ValueError, match="holds 'celo2' meta-weights, not 'celo2_base'"):
        Celo2Base(weights=shipped_celo2)
    with pytest.raises(ValueError, match="holds 'celo2_base' meta-weights, not 'celo2'"):
        Celo2(weights=shipped_path("celo2_base-v2"))
    # A version name is checked against the rule too.
    with pytest.raises(ValueError, match="not a shipped version of 'celo2'"):
        Celo2(weights="celo2_base-v2")
    with pytest.raises(ValueError, match="holds 'celo2' meta-weights, not 'celo'"):
        Celo(weights=shipped_celo2, total_steps=10)
    # The same arrays pass as a dict (no tag) and under their own rule.
    Celo2Base(weights=dict(Celo2(weights=shipped_celo2).theta))


def test_unreadable_weight_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        Celo2(weights=os.path.join(tmp_path, "nope.state"))
    junk = os.path.join(tmp_path, "junk.state")
    with open(junk, "wb") as f:
        f.write(b"\xc1 not msgpack")
    with pytest.raises(ValueError, match="Could not decode|holds no weights|not a flax"):
        Celo2(weights=junk)
    with pytest.raises(TypeError, match="path or a dict"):
        Celo2(weights=3.0)


def test_weights_round_trip_through_npz(tmp_path):
    theta = init_theta("celo2", seed=5)
    path = os.path.join(tmp_path, "theta.npz")
    save_theta(path, theta, "celo2")
    opt = Celo2(weights=path)
    for k, v in theta.items():
        np.testing.assert_array_equal(opt.theta[k], v)
    clone = Celo2.from_config(opt.get_config())
    for k, v in theta.items():
        np.testing.assert_array_equal(clone.theta[k], v)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="raw tf.Variable")
def test_raw_tensorflow_variables():
    import tensorflow as tf

    kernel = tf.Variable(np.ones((4, 3), "float32"), name="dense_kernel")
    bias = tf.Variable(np.zeros(3, "float32"), name="dense_bias")
    emb = tf.Variable(np.ones((10, 4), "float32"), name="embedding_table")
    from keras_lopt.rules import adam
    from keras_lopt.rules import routing

    # Per tensor (the deployment policy would call the lone kernel both
    # input and output layer; see below), with the Adam the weights know.
    opt = Celo2(routing="reference", adam_bias_correction=False)
    grads = [tf.ones((4, 3)), tf.ones(3), tf.ones((10, 4))]
    starts = [v.numpy() for v in (kernel, bias, emb)]
    opt.apply(grads, [kernel, bias, emb])
    assert [r.branch for r in opt._routes] == ["rule", "adam", "adam"]
    # Named by `name` alone, the variables get the rules' exact first steps.
    zeros = lambda route: {k: np.zeros(s, "float32") for k, s in routing.state_shapes(route).items()}
    want_kernel, _ = celo2.update(opt.theta, zeros(opt._routes[0]), grads[0], starts[0], 1e-3)
    np.testing.assert_allclose(kernel.numpy(), np.asarray(want_kernel), rtol=0, atol=1e-7)
    for var, g, p, route in zip((bias, emb), grads[1:], starts[1:], opt._routes[1:]):
        want, _ = adam.update(zeros(route), g, p, 20 * 1e-3, 1)
        np.testing.assert_allclose(var.numpy(), np.asarray(want), rtol=0, atol=1e-7)
    # Deployment, no model: names without a layer part are layers of their
    # own, and the first and last matrices stand for the input and output layers.
    raw = [tf.Variable(np.ones((4, 4), "float32"), name=f"kernel_{i}") for i in range(3)]
    deployed = Celo2()
    deployed.build(raw)
    assert [r.reason for r in deployed._routes] == ["input layer", "matrix", "output layer"]
