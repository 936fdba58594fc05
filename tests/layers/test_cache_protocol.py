"""One cache protocol for every mixer, driven generically: `init_cache`,
`prefill` then `step`s reproduce `call` on the whole sequence."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_lopt.layers import CausalSelfAttention
from keras_lopt.layers import LinearAttention
from keras_lopt.layers import Mamba
from keras_lopt.layers import Mamba2

D_MODEL, BATCH, PROMPT, LENGTH = 16, 2, 5, 9
TOL = dict(rtol=1e-5, atol=1e-5)

MIXERS = {
    "attention": lambda: CausalSelfAttention(num_heads=4, key_dim=4, num_key_value_heads=2,
                                             rotary=True),
    "linear_attention": lambda: LinearAttention(4, 4, num_key_value_heads=2, decay=True,
                                                rotary=True, feature_map="hedgehog",
                                                normalization="norm", chunk_size=4),
    "mamba": lambda: Mamba(d_state=4, chunk_size=4, seed=1),
    "mamba2": lambda: Mamba2(d_state=8, head_dim=8, chunk_size=4, seed=1),
}


def np_(x):
    return np.asarray(ops.convert_to_numpy(x), "float64")


def make(kind):
    keras.utils.set_random_seed(0)
    layer = MIXERS[kind]()
    layer.build((None, None, D_MODEL))
    rng = np.random.default_rng(1)
    for v in layer.weights:  # away from identity/zero initialisations
        v.assign((np_(v) + 0.1 * rng.standard_normal(v.shape)).astype("float32"))
    return layer


def generate_outputs(layer, x, prompt, max_length):
    outputs, cache = layer.prefill(x[:, :prompt], max_length=max_length)
    steps = [outputs]
    for t in range(prompt, x.shape[1]):
        y, cache = layer.step(x[:, t], cache)
        steps.append(y[:, None])
    return np.concatenate([np_(s) for s in steps], axis=1)


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_prefill_then_steps_equals_call(kind):
    layer = make(kind)
    x = np.random.default_rng(2).standard_normal((BATCH, LENGTH, D_MODEL)).astype("float32")
    want = np_(layer(x))
    np.testing.assert_allclose(generate_outputs(layer, x, PROMPT, LENGTH), want, **TOL)
    # From an empty cache, every token through `step`.
    cache = layer.init_cache(BATCH, max_length=LENGTH)
    for t in range(LENGTH):
        y, cache = layer.step(x[:, t], cache)
        np.testing.assert_allclose(np_(y), want[:, t], **TOL)


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_max_length_is_capacity(kind):
    layer = make(kind)
    x = np.random.default_rng(3).standard_normal((BATCH, PROMPT, D_MODEL)).astype("float32")
    _, cache = layer.prefill(x, max_length=LENGTH)
    _, roomy = layer.prefill(x, max_length=2 * LENGTH)
    shapes = {k: tuple(v.shape) for k, v in cache.items()}
    roomy_shapes = {k: tuple(v.shape) for k, v in roomy.items()}
    if kind == "attention":
        assert shapes["key"] == (BATCH, LENGTH, 2, 4)
        assert roomy_shapes["key"] == (BATCH, 2 * LENGTH, 2, 4)
        with pytest.raises(ValueError, match="needs max_length"):
            layer.init_cache(BATCH)
    else:
        # A fixed-size state: the capacity is accepted and changes nothing.
        assert shapes == roomy_shapes
        empty = layer.init_cache(BATCH)
        assert {k: tuple(v.shape) for k, v in empty.items()} == shapes
        for k in cache:
            np.testing.assert_array_equal(np_(cache[k]), np_(roomy[k]))


@pytest.mark.parametrize("kind", ["linear_attention", "mamba", "mamba2"])
def test_length_limit_is_max_sequence_length_in_config(kind):
    layer = MIXERS[kind]()
    config = layer.get_config()
    assert "max_sequence_length" in config and "max_length" not in config
    config["max_sequence_length"] = 7
    clone = type(layer).from_config(config)
    assert clone.max_sequence_length == 7 and clone.get_config() == config
    # Configs written before the rename still load.
    old = dict(config)
    old["max_length"] = old.pop("max_sequence_length")
    assert type(layer).from_config(old).get_config() == config
