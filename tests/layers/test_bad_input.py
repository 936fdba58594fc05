"""Every mixer rejects the common mistakes with a message that names them
(instead of a backend's shape error, a division by zero, or on TensorFlow
a silently wrong result)."""

import keras
import numpy as np
import pytest

from keras_lopt.layers import CausalSelfAttention
from keras_lopt.layers import LinearAttention
from keras_lopt.layers import Mamba
from keras_lopt.layers import Mamba2
from keras_lopt.models import CausalLM

MIXERS = {
    "attention": lambda: CausalSelfAttention(2, 8),
    "linear_attention": lambda: LinearAttention(num_heads=2, key_dim=8),
    "mamba": lambda: Mamba(d_state=4),
    "mamba2": lambda: Mamba2(d_state=4, head_dim=8),
}


def _x(length=5, width=16):
    return np.random.default_rng(0).normal(size=(2, length, width)).astype("float32")


@pytest.mark.parametrize("cls", [CausalSelfAttention, LinearAttention])
@pytest.mark.parametrize("arg", ["num_heads", "key_dim"])
def test_zero_heads_or_key_dim(cls, arg):
    kwargs = {"num_heads": 2, "key_dim": 8, arg: 0}
    with pytest.raises(ValueError, match=f"{arg} must be a positive integer"):
        cls(**kwargs)


@pytest.mark.parametrize("name", list(MIXERS))
def test_empty_sequence_wrong_width_and_mask_length(name):
    with pytest.raises(ValueError, match="empty sequence"):
        MIXERS[name]()(_x(length=0))
    layer = MIXERS[name]()
    layer(_x())
    with pytest.raises(ValueError, match="width|d_model"):
        layer(_x(width=8))
    with pytest.raises(ValueError, match=r"padding_mask must have shape \(batch, length\)"):
        MIXERS[name]()(_x(), padding_mask=np.ones((2, 6), "int32"))


def test_attention_step_past_the_cache_capacity_raises():
    layer = CausalSelfAttention(2, 8)
    x = _x()
    _, cache = layer.prefill(x, max_length=6)
    _, cache = layer.step(x[:, 0], cache)  # the sixth token fills the cache
    with pytest.raises(ValueError, match="KV cache is full"):
        layer.step(x[:, 0], cache)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="a traced step (jax.jit)")
def test_a_compiled_step_past_the_capacity_returns_nan_not_an_overwrite():
    import jax

    layer = CausalSelfAttention(2, 8)
    x = _x()
    _, cache = layer.prefill(x, max_length=6)
    step = jax.jit(layer.step)
    out, cache = step(x[:, 0], cache)
    assert np.isfinite(np.asarray(out)).all()
    out, _ = step(x[:, 0], cache)
    assert np.isnan(np.asarray(out)).all()


@pytest.mark.parametrize("mixer", ["attention", "mamba2"])
def test_generate_rejects_empty_prompts_and_negative_lengths(mixer):
    config = {"num_heads": 2, "key_dim": 8} if mixer == "attention" else \
        {"d_state": 4, "head_dim": 8}
    lm = CausalLM(vocab_size=20, num_layers=1, hidden_dim=16, mixer=mixer, mixer_config=config)
    prompt = np.ones((2, 3), "int32")
    with pytest.raises(ValueError, match="at least one token"):
        lm.generate(np.zeros((2, 0), "int32"), 3)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        lm.generate(prompt, -1)
    assert lm.generate(prompt, 0).shape == (2, 3)
    assert lm.generate(prompt, 2).shape == (2, 5)
