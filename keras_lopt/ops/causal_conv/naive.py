"""The causal depthwise convolution, one output position at a time: the oracle."""

from keras import ops


def naive_causal_conv(x, kernel, bias=None, initial_state=None):
    """`chunk_causal_conv` written per output position (slow; for tests).

    Args:
        x: `(batch, length, channels)`.
        kernel: `(width, channels)`.
        bias: optional `(channels,)`.
        initial_state: optional `(batch, width - 1, channels)`.

    Returns:
        `(y, final_state)` as `chunk_causal_conv`.

    Example:

    >>> y, state = naive_causal_conv(x, kernel)
    """
    width, channels = kernel.shape
    batch, length = ops.shape(x)[0], x.shape[1]
    if initial_state is None:
        initial_state = ops.zeros((batch, width - 1, channels), x.dtype)
    window = ops.cast(initial_state, x.dtype)
    kernel = ops.cast(kernel, x.dtype)
    ys = []
    for t in range(length):
        window = ops.concatenate([window, x[:, t : t + 1]], axis=1)
        y = ops.sum(window * kernel[None], axis=1)
        if bias is not None:
            y = y + ops.cast(bias, x.dtype)
        ys.append(y)
        window = window[:, 1:]
    return ops.stack(ys, axis=1), window
