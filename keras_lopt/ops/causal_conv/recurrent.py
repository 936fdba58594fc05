"""One step of the causal depthwise convolution, for generation."""

from keras import ops

from keras_lopt.ops.causal_conv.chunk import chunk_causal_conv


def recurrent_causal_conv(x, kernel, bias=None, initial_state=None):
    """Advances `chunk_causal_conv` by one time step.

    Args:
        x: `(batch, channels)`, the new input.
        kernel: `(width, channels)`.
        bias: optional `(channels,)`.
        initial_state: `(batch, width - 1, channels)`, the preceding inputs;
            zeros when None.

    Returns:
        `(y (batch, channels), final_state (batch, width - 1, channels))`.

    Example:

    >>> y_t, state = recurrent_causal_conv(x_t, kernel, bias, state)
    """
    # A length-1 chunk: the same multiply-adds in the same order as training,
    # so generation reproduces the chunked outputs bit for bit.
    y, state = chunk_causal_conv(x[:, None, :], kernel, bias, initial_state)
    return y[:, 0], state
