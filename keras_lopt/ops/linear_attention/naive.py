"""Causal linear attention as a plain loop over time: the tests' oracle."""

from keras import ops


def naive_linear_attention(q, k, v, log_decay=None, initial_state=None):
    """`chunk_linear_attention`, one time step after another (slow; for tests).

    Args:
        q, k: `(batch, length, heads, key_dim)`.
        v: `(batch, length, heads, value_dim)`.
        log_decay: optional `(batch, length, heads)`, values <= 0.
        initial_state: optional `(batch, heads, key_dim, value_dim)`.

    Returns:
        `(outputs (batch, length, heads, value_dim), final_state)`, float32.

    Example:

    >>> out, state = naive_linear_attention(q, k, v, log_decay)
    """
    q, k, v = (ops.cast(t, "float32") for t in (q, k, v))
    batch, length, heads, key_dim = ops.shape(q)[0], q.shape[1], q.shape[2], q.shape[3]
    state = (ops.zeros((batch, heads, key_dim, v.shape[-1]), "float32")
             if initial_state is None else ops.cast(initial_state, "float32"))
    outputs = []
    for t in range(length):
        if log_decay is not None:
            state = ops.exp(ops.cast(log_decay[:, t], "float32"))[..., None, None] * state
        state = state + ops.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outputs.append(ops.einsum("bhk,bhkv->bhv", q[:, t], state))
    return ops.stack(outputs, axis=1), state
