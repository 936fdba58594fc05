"""One step of causal linear attention, for generation."""

from keras import ops


def recurrent_linear_attention(q, k, v, log_decay=None, initial_state=None):
    """Advances `chunk_linear_attention`'s recurrence by one time step.

    Args:
        q, k: `(batch, heads, key_dim)`.
        v: `(batch, heads, value_dim)`.
        log_decay: optional `(batch, heads)`, values <= 0.
        initial_state: `(batch, heads, key_dim, value_dim)`, the state before
            this step; zeros when None.

    Returns:
        `(outputs, final_state)`: `(batch, heads, value_dim)` and the state
        after this step, float32.

    Example:

    >>> out, state = recurrent_linear_attention(q_t, k_t, v_t, initial_state=state)
    """
    q, k, v = (ops.cast(t, "float32") for t in (q, k, v))
    if initial_state is None:
        initial_state = ops.zeros(tuple(k.shape) + (v.shape[-1],), "float32")
    state = ops.cast(initial_state, "float32")
    if log_decay is not None:
        state = ops.exp(ops.cast(log_decay, "float32"))[..., None, None] * state
    state = state + k[..., :, None] * v[..., None, :]
    return ops.einsum("bhk,bhkv->bhv", q, state), state
