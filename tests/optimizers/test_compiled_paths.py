"""The rule under a compiler: where the backend fuses (JAX under `jit`,
TensorFlow under XLA, `model.compile(jit_compile=True)`), the rule takes
its element-wise form; steps, the non-finite skip and resume must be the
ones of the plain path."""

import keras
import numpy as np
import pytest

from keras_lopt import backend as lopt_backend
from keras_lopt.optimizers import Celo2
from keras_lopt.optimizers import Celo2Base

tf_only = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                             reason="TensorFlow's XLA path (JAX is always compiled; torch has none)")


def _model():
    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((12,)),
        keras.layers.Dense(16, name="inp"),
        keras.layers.Dense(24, activation="tanh", name="h1"),
        keras.layers.Dense(16, activation="tanh", name="h2"),
        keras.layers.Dense(4, name="out"),
    ])


def _data(step):
    rng = np.random.default_rng(step)
    return rng.normal(size=(16, 12)).astype("float32"), rng.normal(size=(16, 4)).astype("float32")


def _train(cls, jit, steps=3):
    model = _model()
    model.compile(optimizer=cls(learning_rate=3e-3, weight_decay=0.01), loss="mse",
                  jit_compile=jit)
    for step in range(steps):
        model.train_on_batch(*_data(step))
    return model


@tf_only
def test_tensorflow_knows_when_it_is_under_xla():
    import tensorflow as tf

    probe = lambda: tf.constant(lopt_backend.compiles_elementwise_fusions(None))  # noqa: E731
    assert bool(tf.function(probe, jit_compile=True)())
    assert not bool(tf.function(probe)())
    assert not lopt_backend.compiles_elementwise_fusions(tf.constant(1.0))


@tf_only
@pytest.mark.parametrize("cls", [Celo2, Celo2Base], ids=lambda c: c.__name__)
def test_xla_steps_equal_the_graph_steps_and_skip_non_finite_gradients(cls):
    plain, xla = _train(cls, False), _train(cls, True)
    assert xla.jit_compile and not plain.jit_compile
    for a, b in zip(plain.trainable_variables, xla.trainable_variables):
        np.testing.assert_allclose(np.asarray(a.value), np.asarray(b.value), atol=2e-6,
                                   err_msg=a.path)
    # A step whose gradients are all NaN leaves weights and state untouched.
    x, y = _data(99)
    y[0, 0] = np.nan
    before = [np.asarray(v.value) for v in xla.trainable_variables + xla.optimizer.variables[2:]]
    xla.train_on_batch(x, y)
    after = xla.trainable_variables + xla.optimizer.variables[2:]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, np.asarray(b.value), err_msg=b.path)
    assert int(xla.optimizer.iterations.value) == 4


@tf_only
def test_xla_keeps_variable_dtypes_and_resumes_exactly(tmp_path):
    # bfloat16 variables stay bfloat16 (the rule computes in float32), and a
    # model saved mid-run and loaded in a fresh model continues under XLA
    # exactly as the uninterrupted run does.
    def model():
        keras.utils.set_random_seed(5)
        return keras.Sequential([
            keras.Input((12,)),
            keras.layers.Dense(16, name="inp"),
            keras.layers.Dense(24, activation="tanh", name="h1", dtype="bfloat16"),
            keras.layers.Dense(16, activation="tanh", name="h2"),
            keras.layers.Dense(4, name="out"),
        ])

    def compiled(net):
        net.compile(optimizer=Celo2(learning_rate=3e-3), loss="mse", jit_compile=True)
        return net

    straight = compiled(model())
    for step in range(3):
        straight.train_on_batch(*_data(step))
    assert {str(v.dtype) for v in straight.get_layer("h1").weights} == {"bfloat16"}

    first = compiled(model())
    for step in range(2):
        first.train_on_batch(*_data(step))
    path = str(tmp_path / "mid.keras")
    first.save(path)
    resumed = keras.saving.load_model(path)
    assert resumed.jit_compile
    resumed.train_on_batch(*_data(2))
    for a, b in zip(straight.weights, resumed.weights):
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value), err_msg=a.path)
