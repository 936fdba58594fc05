"""Rotary position embedding (RoPE), shared by softmax and linear attention."""

from keras import ops


def positions_from_mask(padding_mask, length, batch_size):
    """Token positions counting real tokens only (left padding does not shift them).

    Args:
        padding_mask: `(batch, length)` with 1 for real tokens, or None.
        length: sequence length.
        batch_size: batch size (used when `padding_mask` is None).

    Returns:
        int32 `(batch, length)`; padded positions get position 0.
    """
    if padding_mask is None:
        return ops.broadcast_to(ops.arange(length, dtype="int32")[None], (batch_size, length))
    mask = ops.cast(padding_mask, "int32")
    return ops.maximum(ops.cumsum(mask, axis=1) - 1, 0)


def apply_rotary(x, positions, max_wavelength=10000.0):
    """Rotates pairs of features of `x` by position-dependent angles.

    Uses the "rotate half" layout of GPT-NeoX / Llama / keras-hub: feature
    `i` is paired with feature `i + dim/2`.

    Args:
        x: `(batch, length, heads, dim)` with an even `dim`.
        positions: int `(batch, length)`.
        max_wavelength: the base of the geometric frequency progression.

    Returns:
        The rotated `x`, in `x`'s dtype.
    """
    dim = x.shape[-1]
    if dim % 2:
        raise ValueError(f"Rotary embedding needs an even feature size; received {dim}.")
    half = dim // 2
    inv_freq = 1.0 / (max_wavelength ** (ops.arange(half, dtype="float32") * 2.0 / dim))
    angles = ops.cast(positions, "float32")[..., None] * inv_freq  # (batch, length, half)
    cos = ops.cast(ops.cos(angles)[:, :, None, :], x.dtype)
    sin = ops.cast(ops.sin(angles)[:, :, None, :], x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return ops.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
