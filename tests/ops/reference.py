"""Float64 NumPy recurrences: an oracle independent of keras for every kernel."""

import numpy as np
from keras import ops


def np_(x):
    return ops.convert_to_numpy(x).astype("float64")


def f32(x):
    return None if x is None else np.asarray(x, "float32")


def numpy_linear_attention(q, k, v, log_decay, state):
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


def numpy_causal_conv(x, kernel, bias, state):
    width, length = kernel.shape[0], x.shape[1]
    full = np.concatenate([state, x], axis=1)
    y = sum(full[:, i : i + length] * kernel[i] for i in range(width))
    if bias is not None:
        y = y + bias
    return y, full[:, full.shape[1] - (width - 1):]
