"""The shared kernels: chunked == step-by-step == a float64 NumPy recurrence."""

import numpy as np
import pytest
from keras import ops

from keras_lopt.layers import scan


def numpy_decay_attention(q, k, v, log_decay, state):
    out = np.zeros(q.shape[:3] + v.shape[-1:])
    for t in range(q.shape[1]):
        state = np.exp(log_decay[:, t])[..., None, None] * state
        state = state + k[:, t, :, :, None] * v[:, t, :, None, :]
        out[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], state)
    return out, state


def numpy_selective_scan(x, delta, a, b, c, state):
    y = np.zeros(x.shape)
    for t in range(x.shape[1]):
        state = np.exp(delta[:, t, :, None] * a) * state
        state = state + (delta[:, t] * x[:, t])[..., None] * b[:, t, None, :]
        y[:, t] = np.einsum("bdn,bn->bd", state, c[:, t])
    return y, state


def np_(x):
    return ops.convert_to_numpy(x).astype("float64")


@pytest.mark.parametrize("length,chunk", [(1, 4), (7, 4), (16, 4), (33, 8), (5, 64)])
def test_chunked_decay_attention_matches_numpy_and_steps(length, chunk):
    rng = np.random.default_rng(length)
    q, k = rng.standard_normal((2, 2, length, 3, 5))
    v = rng.standard_normal((2, length, 3, 6))
    log_decay = -rng.uniform(0, 1, (2, length, 3))
    s0 = rng.standard_normal((2, 3, 5, 6))
    want, want_state = numpy_decay_attention(q, k, v, log_decay, s0)
    f32 = lambda x: x.astype("float32")  # noqa: E731
    out, state = scan.chunked_decay_attention(
        f32(q), f32(k), f32(v), f32(log_decay), chunk, f32(s0)
    )
    np.testing.assert_allclose(np_(out), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np_(state), want_state, atol=1e-5, rtol=1e-5)
    state = f32(s0)
    for t in range(length):
        o, state = scan.decay_attention_step(
            f32(q[:, t]), f32(k[:, t]), f32(v[:, t]), state, f32(log_decay[:, t])
        )
        np.testing.assert_allclose(np_(o), want[:, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length,chunk", [(1, 4), (7, 4), (33, 8)])
def test_chunked_selective_scan_matches_numpy_and_sequential(length, chunk):
    rng = np.random.default_rng(length)
    x, b, c = (rng.standard_normal((2, length, n)) for n in (6, 4, 4))
    delta = rng.uniform(0.01, 0.5, (2, length, 6))
    a = -rng.uniform(0.5, 4, (6, 4))
    h0 = rng.standard_normal((2, 6, 4))
    want, want_state = numpy_selective_scan(x, delta, a, b, c, h0)
    args = [t.astype("float32") for t in (x, delta, a, b, c)]
    for within_chunk in ("associative", "sequential"):
        y, state = scan.chunked_selective_scan(*args, chunk, h0.astype("float32"),
                                               within_chunk=within_chunk)
        np.testing.assert_allclose(np_(y), want, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np_(state), want_state, atol=1e-5, rtol=1e-5)
    y_seq, _ = scan.sequential_selective_scan(*args, h0.astype("float32"))
    np.testing.assert_allclose(np_(y_seq), want, atol=1e-5, rtol=1e-5)


def test_causal_depthwise_conv_continues_from_cache():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 3)).astype("float32")
    kernel = rng.standard_normal((4, 3)).astype("float32")
    full, _ = scan.causal_depthwise_conv(x, kernel)
    padded = np.concatenate([np.zeros((2, 3, 3)), x], axis=1)
    want = sum(padded[:, i : i + 9] * kernel[i] for i in range(4))
    np.testing.assert_allclose(np_(full), want, atol=1e-5)
    head, cache = scan.causal_depthwise_conv(x[:, :5], kernel)
    tail, _ = scan.causal_depthwise_conv(x[:, 5:], kernel, cache=cache)
    np.testing.assert_allclose(np_(tail), want[:, 5:], atol=1e-5)


def test_bad_chunk_size_and_mode():
    with pytest.raises(ValueError, match="within_chunk"):
        scan.chunked_selective_scan(*(np.zeros((1, 2, 1), "float32"),) * 2,
                                    np.zeros((1, 1), "float32"),
                                    *(np.zeros((1, 2, 1), "float32"),) * 2, within_chunk="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        scan.chunked_decay_attention(np.zeros((1, 2, 1, 1)), np.zeros((1, 2, 1, 1)),
                                     np.zeros((1, 2, 1, 1)), chunk_size=0)
