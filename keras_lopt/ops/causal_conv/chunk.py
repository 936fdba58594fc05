"""Causal depthwise 1-D convolution over a whole sequence."""

from keras import ops


def chunk_causal_conv(x, kernel, bias=None, initial_state=None):
    """Causal depthwise 1-D convolution, optionally continuing from a state.

    Output `t` is `sum_i kernel[i] * input[t - width + 1 + i]`, with the
    inputs before `x` taken from `initial_state` (zeros at the start of a
    sequence). Computed as `width` shifted multiply-adds, which every backend
    runs without a convolution primitive for depthwise 1-D.

    Args:
        x: `(batch, length, channels)`.
        kernel: `(width, channels)`.
        bias: optional `(channels,)`.
        initial_state: optional `(batch, width - 1, channels)`, the inputs
            preceding `x`.

    Returns:
        `(y, final_state)`: `y` of `x`'s shape and dtype, and the last
        `width - 1` inputs (the state to continue from).

    Example:

    >>> y, state = chunk_causal_conv(x, kernel, bias)
    >>> y_next, state = chunk_causal_conv(x_next, kernel, bias, initial_state=state)
    """
    width = kernel.shape[0]
    batch = ops.shape(x)[0]
    if initial_state is None:
        initial_state = ops.zeros((batch, width - 1, x.shape[-1]), x.dtype)
    full = ops.concatenate([ops.cast(initial_state, x.dtype), x], axis=1)
    length = x.shape[1]
    y = 0.0
    for i in range(width):
        y = y + full[:, i : i + length] * ops.cast(kernel[i], x.dtype)
    if bias is not None:
        y = y + ops.cast(bias, x.dtype)
    return y, full[:, full.shape[1] - (width - 1) :]
