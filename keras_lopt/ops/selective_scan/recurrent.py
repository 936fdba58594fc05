"""One step of Mamba-1's selective scan, and that step scanned over time."""

from keras import ops

from keras_lopt import backend as _backend


def recurrent_selective_scan(x, delta, a, b, c, initial_state=None):
    """Advances `chunk_selective_scan`'s recurrence by one time step.

    Args:
        x, delta: `(batch, d_inner)`.
        a: `(d_inner, d_state)`, negative.
        b, c: `(batch, d_state)`.
        initial_state: `(batch, d_inner, d_state)`, the state before this
            step; zeros when None.

    Returns:
        `(y (batch, d_inner), final_state (batch, d_inner, d_state))`,
        float32.

    Example:

    >>> y_t, state = recurrent_selective_scan(x_t, delta_t, a, b_t, c_t, state)
    """
    if initial_state is None:
        initial_state = ops.zeros((ops.shape(x)[0], x.shape[-1], a.shape[-1]), "float32")
    x, delta, a, b, c, state = (
        ops.cast(t, "float32") for t in (x, delta, a, b, c, initial_state))
    state = ops.exp(delta[..., None] * a) * state + (delta * x)[..., None] * b[:, None, :]
    return ops.einsum("bdn,bn->bd", state, c), state


def sequential_selective_scan(x, delta, a, b, c, initial_state=None):
    """`recurrent_selective_scan` over a sequence, as one `keras.ops.scan`.

    Same arguments and results as `chunk_selective_scan` (without its chunk
    options); the chunked form's `within_chunk="sequential"` runs this on
    each chunk.

    Example:

    >>> y, state = sequential_selective_scan(x, delta, a, b, c)
    """
    batch, d_inner, d_state = ops.shape(x)[0], x.shape[2], a.shape[-1]
    if initial_state is None:
        initial_state = ops.zeros((batch, d_inner, d_state), "float32")

    def body(state, inputs):
        y, state = recurrent_selective_scan(*inputs[:2], a, *inputs[2:], state)
        return state, y

    xs = tuple(ops.moveaxis(ops.cast(t, "float32"), 1, 0) for t in (x, delta, b, c))
    final_state, y = _backend.scan(body, ops.cast(initial_state, "float32"), xs)
    return ops.moveaxis(y, 0, 1), final_state
