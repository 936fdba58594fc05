"""Data-parallel training on several (virtual) JAX devices."""

import os
import subprocess
import sys
import textwrap

import keras
import pytest

SCRIPT = textwrap.dedent(
    """
    import keras, numpy as np
    from keras_lopt.optimizers import Celo2, Celo2Base
    assert len(keras.distribution.list_devices()) == 4

    def train(cls, distributed):
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=keras.distribution.list_devices())
            if distributed else None)
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((128, 10)).astype("float32")
        y = rng.integers(0, 4, 128).astype("int32")
        model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(32, activation="relu"),
                                  keras.layers.Dense(4)])
        model.compile(optimizer=cls(learning_rate=3e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
        return [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]

    for cls in (Celo2, Celo2Base):
        single, parallel = train(cls, False), train(cls, True)
        err = max(float(np.abs(a - b).max()) for a, b in zip(single, parallel))
        print(cls.__name__, "max abs diff", err)
        assert err < 1e-5, (cls.__name__, err)
    print("OK")
    """
)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="needs KERAS_BACKEND=jax")
def test_data_parallel_matches_single_device():
    env = dict(os.environ, KERAS_BACKEND="jax",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr[-3000:]
