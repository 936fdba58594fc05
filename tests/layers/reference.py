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
