"""Float64 NumPy pieces shared by the layer tests' reference recurrences."""

import numpy as np


def numpy_rotary(x, positions, max_wavelength):
    """Rotate-half RoPE on `(batch, length, heads, dim)` at `(batch, length)` positions."""
    half = x.shape[-1] // 2
    inv_freq = max_wavelength ** (-np.arange(half) * 2.0 / x.shape[-1])
    angles = positions[:, :, None, None] * inv_freq
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = np.cos(angles), np.sin(angles)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def numpy_feature_map(name, x, kernel=None):
    """A named feature map on `(batch, length, heads, dim)`; hedgehog needs its kernel."""
    if name is None or name == "identity":
        return x
    if name == "elu":
        return np.where(x > 0, x + 1.0, np.exp(x))
    if name == "relu":
        return np.maximum(x, 0.0)
    assert name == "hedgehog", name
    xw = np.einsum("blhd,hdf->blhf", x, kernel)
    logits = np.concatenate([xw, -xw], axis=-1)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
