"""Mamba-1's selective scan as a plain loop over time: the tests' oracle."""

from keras import ops


def naive_selective_scan(x, delta, a, b, c, initial_state=None):
    """`chunk_selective_scan`, one time step after another (slow; for tests).

    Args:
        x, delta: `(batch, length, d_inner)`.
        a: `(d_inner, d_state)`, negative.
        b, c: `(batch, length, d_state)`.
        initial_state: optional `(batch, d_inner, d_state)`.

    Returns:
        `(y (batch, length, d_inner), final_state)`, float32.

    Example:

    >>> y, state = naive_selective_scan(x, delta, a, b, c)
    """
    x, delta, a, b, c = (ops.cast(t, "float32") for t in (x, delta, a, b, c))
    state = (ops.zeros((ops.shape(x)[0], x.shape[2], a.shape[-1]), "float32")
             if initial_state is None else ops.cast(initial_state, "float32"))
    ys = []
    for t in range(x.shape[1]):
        state = ops.exp(delta[:, t, :, None] * a) * state
        state = state + (delta[:, t] * x[:, t])[..., None] * b[:, t, None, :]
        ys.append(ops.sum(state * c[:, t, None, :], axis=-1))
    return ops.stack(ys, axis=1), state
