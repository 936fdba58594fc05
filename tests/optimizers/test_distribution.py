"""Training on several (virtual) JAX devices: data parallel, and model
parallel with the optimizer state sharded like its variables."""

import os
import subprocess
import sys
import textwrap

import keras
import pytest

SCRIPT = textwrap.dedent(
    """
    import keras, numpy as np
    from keras import distribution as dist
    from keras_lopt.optimizers import Celo2, Celo2Base
    devices = dist.list_devices()
    assert len(devices) == 8

    def layout_map():
        mesh = dist.DeviceMesh((2, 4), ("batch", "model"), devices)
        layouts = dist.LayoutMap(mesh)
        layouts["conv.*kernel"] = (None, None, None, "model")
        layouts[".*/(query|key|value)/kernel"] = (None, "model", None)
        layouts[".*/attention_output/kernel"] = ("model", None, None)
        layouts["dense.*kernel"] = (None, "model")
        layouts["dense.*bias"] = ("model",)
        return layouts

    def model():
        # A conv kernel, attention projections and dense layers: the
        # optimizer sees conv and einsum kernels as matrices (reshaped
        # views), whose state must still follow the variable's sharding.
        # No attention biases: the key bias's gradient is zero in exact
        # arithmetic, and a normalising rule blows the rounding noise that
        # replaces it (which differs with the reduction order on other
        # devices) up to full-size steps. tanh, not relu: no dead units,
        # whose near-zero gradients behave alike.
        x = inp = keras.Input((6, 6, 4))
        x = keras.layers.Conv2D(16, 3, padding="same", activation="tanh", name="conv_in")(x)
        x = keras.layers.Conv2D(16, 3, padding="same", activation="tanh", name="conv_h")(x)
        x = keras.layers.Reshape((36, 16))(x)
        x = keras.layers.MultiHeadAttention(4, 8, use_bias=False, name="mha")(x, x)
        x = keras.layers.GlobalAveragePooling1D()(x)
        x = keras.layers.Dense(32, activation="tanh", name="dense_h")(x)
        return keras.Model(inp, keras.layers.Dense(4, name="dense_out")(x))

    def train(cls, distribution):
        dist.set_distribution(distribution)
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((64, 6, 6, 4)).astype("float32")
        y = rng.integers(0, 4, 64).astype("int32")
        net = model()
        optimizer = cls(learning_rate=3e-3)
        net.compile(optimizer=optimizer,
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        net.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        dist.set_distribution(None)
        return net, optimizer

    def spec(v):
        return tuple(v.value.sharding.spec) + (None,) * (len(v.shape) - len(v.value.sharding.spec))

    # The reshaped views' state: conv_h's kernel (3, 3, 16, 16) is the
    # (144, 16) matrix, the query kernel (16, 4, 8) the (16, 32) one, the
    # output kernel (4, 8, 16) the (32, 16) one.
    views = {"conv_h/kernel": (None, "model"), "mha/query/kernel": (None, "model"),
             "mha/attention_output/kernel": ("model", None)}
    for cls in (Celo2, Celo2Base):
        single = train(cls, None)[0]
        parallel = train(cls, dist.DataParallel(devices=devices))[0]
        sharded, optimizer = train(cls, dist.ModelParallel(layout_map=layout_map(),
                                                          batch_dim_name="batch"))
        checked = 0
        for v in sharded.trainable_variables:
            state = optimizer._states[optimizer._get_variable_index(v)]
            for key, s in state.items():
                if tuple(s.shape) == tuple(v.shape):
                    assert spec(s) == spec(v), (v.path, key, spec(s), spec(v))
                    checked += 1
                elif tuple(s.shape[1:]) == tuple(v.shape):  # the decay channels
                    assert spec(s) == (None,) + spec(v), (v.path, key, spec(s), spec(v))
                    checked += 1
            if v.path in views and cls is Celo2:
                assert spec(state["rms"]) == views[v.path], (v.path, spec(state["rms"]))
                assert spec(state["mom"]) == (None,) + views[v.path]
                checked += 1
        assert any("model" in spec(v) for v in sharded.trainable_variables)
        print(cls.__name__, "state entries checked", checked)
        assert checked >= 15, checked
        for name, other in (("data parallel", parallel), ("model parallel", sharded)):
            err = max(float(np.abs(keras.ops.convert_to_numpy(a) - keras.ops.convert_to_numpy(b)).max())
                      for a, b in zip(single.trainable_variables, other.trainable_variables))
            print(cls.__name__, name, "max abs diff from one device", err)
            assert err < 5e-6, (cls.__name__, name, err)
    print("OK")
    """
)


@pytest.mark.skipif(keras.backend.backend() != "jax",
                    reason="keras.distribution runs on JAX only")
def test_parallel_runs_match_one_device_and_state_is_sharded_like_its_variable():
    env = dict(os.environ, KERAS_BACKEND="jax",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr[-3000:]
    print(out.stdout)
