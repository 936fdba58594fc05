"""Small causal LMs: cache-based generation equals the full forward pass."""

import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_lopt.models import CausalLM
from keras_lopt.models import LinearAttentionLM
from keras_lopt.models import Mamba2LM
from keras_lopt.models import MambaLM
from keras_lopt.models import TransformerLM

VOCAB = 40
MIXED_TOL = 3e-2  # relative to the largest logit


def make(kind):
    keras.utils.set_random_seed(1)
    if kind == "transformer":
        return TransformerLM(VOCAB, 2, 32, mixer_config={"num_heads": 4, "key_dim": 8,
                                                         "num_key_value_heads": 2, "rotary": True})
    if kind == "linear_attention":
        return LinearAttentionLM(VOCAB, 2, 32, mixer_config={
            "num_heads": 4, "key_dim": 8, "feature_map": "hedgehog", "chunk_size": 4})
    if kind == "gpt2_style":  # LayerNorm, learned positions, tanh-GELU, biased attention
        return TransformerLM(VOCAB, 2, 32, mixer_config={"num_heads": 4, "key_dim": 8,
                                                         "use_bias": True},
                             norm="layer", mlp_activation="gelu_tanh", max_positions=16)
    if kind == "llama_style":  # SwiGLU without biases, separate output embedding
        return TransformerLM(VOCAB, 2, 32, mixer_config={"num_heads": 4, "key_dim": 8,
                                                         "num_key_value_heads": 2, "rotary": True},
                             mlp_activation="silu", gated_mlp=True, mlp_bias=False,
                             tie_embeddings=False, norm_epsilon=1e-6)
    if kind == "mamba":
        return MambaLM(VOCAB, 2, 32, mixer_config={"d_state": 8, "chunk_size": 4})
    return Mamba2LM(VOCAB, 2, 32, mixer_config={"d_state": 8, "head_dim": 16, "chunk_size": 4})


KINDS = ["transformer", "linear_attention", "mamba", "mamba2"]
BLOCK_VARIANTS = ["gpt2_style", "llama_style"]


def tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(1, VOCAB, shape).astype("int32")


def close(a, b, tol=1e-4):
    a, b = ops.convert_to_numpy(a), ops.convert_to_numpy(b)
    np.testing.assert_allclose(a, b, atol=tol * max(1.0, np.abs(b).max()), rtol=tol)


@pytest.mark.parametrize("kind", KINDS + BLOCK_VARIANTS)
def test_prefill_then_steps_equal_full_forward(kind):
    lm = make(kind)
    ids = tokens((2, 11))
    full = lm(ids)
    logits, caches = lm.prefill(ids[:, :6], max_length=11)
    close(logits, full[:, :6])
    for t in range(6, 11):
        step_logits, caches = lm.step(ids[:, t], caches)
        close(step_logits, full[:, t])


@pytest.mark.parametrize("kind", KINDS + BLOCK_VARIANTS)
def test_generate_left_padded_batch_matches_single_prompts(kind):
    lm = make(kind)
    short, long = tokens((1, 3), 1), tokens((1, 6), 2)
    batch = np.concatenate([np.concatenate([np.zeros((1, 3), "int32"), short], 1), long])
    mask = np.ones((2, 6), "int32")
    mask[0, :3] = 0
    together = lm.generate(batch, 5, padding_mask=mask)
    assert together.shape == (2, 11) and together.dtype == np.int32
    np.testing.assert_array_equal(together[0, 6:], lm.generate(short, 5)[0, 3:])
    np.testing.assert_array_equal(together[1, 6:], lm.generate(long, 5)[0, 6:])
    sampled = lm.generate(long, 4, temperature=1.0, seed=3)
    assert sampled.shape == (1, 10) and sampled.max() < VOCAB


@pytest.mark.parametrize("kind", KINDS + BLOCK_VARIANTS)
def test_fit_save_load_round_trip(kind, tmp_path):
    lm = make(kind)
    ids = tokens((8, 13))
    lm.compile(keras.optimizers.AdamW(3e-3),
               keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = lm.fit(ids[:, :-1], ids[:, 1:], epochs=4, batch_size=4, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    path = os.path.join(str(tmp_path), "lm.keras")
    lm.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(lm)
    close(loaded(ids), lm(ids), 1e-6)
    assert loaded.get_config() == lm.get_config()


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_bfloat16_trains_and_computes_what_float32_does(kind):
    ids = tokens((4, 9))
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        lm = make(kind)
        lm(ids)
        before = [ops.convert_to_numpy(v) for v in lm.trainable_variables]
        lm.compile(keras.optimizers.AdamW(1e-3),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = lm.fit(ids[:, :-1], ids[:, 1:], epochs=2, batch_size=4, verbose=0)
        mixed = lm(ids)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.all(np.isfinite(history.history["loss"]))
    # Weights stay float32 and every one of them trained.
    assert {keras.backend.standardize_dtype(v.dtype) for v in lm.weights} == {"float32"}
    assert all(not np.array_equal(b, ops.convert_to_numpy(v))
               for b, v in zip(before, lm.trainable_variables))
    # With the trained weights, the bfloat16 forward is the float32 one up to
    # bfloat16 round-off (8 bits of mantissa: ~0.4% per operation).
    assert keras.backend.standardize_dtype(mixed.dtype) == "bfloat16"
    reference = make(kind)
    reference(ids)
    reference.set_weights(lm.get_weights())
    want = np.asarray(ops.convert_to_numpy(reference(ids)), "float64")
    got = np.asarray(ops.convert_to_numpy(ops.cast(mixed, "float32")), "float64")
    assert np.abs(got - want).max() <= MIXED_TOL * np.abs(want).max()


def test_bad_inputs():
    lm = make("mamba2")
    with pytest.raises(TypeError, match="integer token ids"):
        lm(np.zeros((1, 4), "float32"))
    with pytest.raises(ValueError, match="Unknown mixer"):
        CausalLM(VOCAB, 1, 16, mixer="lstm")
    with pytest.raises(ValueError, match="prompt must be"):
        lm.generate(np.zeros((4,), "int32"), 2)
    with pytest.raises(ValueError, match="Unknown norm"):
        CausalLM(VOCAB, 1, 16, norm="batch")
    with pytest.raises(ValueError, match="Unknown mlp_activation"):
        CausalLM(VOCAB, 1, 16, mlp_activation="swish2")
    positional = make("gpt2_style")
    with pytest.raises(ValueError, match="exceeds max_positions=16"):
        positional(tokens((1, 17)))


def greedy_without_cache(lm, prompt, new_tokens):
    ids = np.asarray(prompt)
    for _ in range(new_tokens):
        nxt = np.argmax(ops.convert_to_numpy(lm(ids))[:, -1], axis=-1).astype("int32")
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
    return ids


@pytest.mark.parametrize("kind", ["transformer", "mamba2"])
def test_generate_equals_greedy_full_forward_and_sees_new_weights(kind):
    lm = make(kind)
    prompt = tokens((2, 5), 4)
    np.testing.assert_array_equal(lm.generate(prompt, 6), greedy_without_cache(lm, prompt, 6))
    # Change the weights after a first generate: the compiled step must follow.
    for v in lm.trainable_variables:
        v.assign(v * 1.5 + 0.01)
    np.testing.assert_array_equal(lm.generate(prompt, 6), greedy_without_cache(lm, prompt, 6))
