"""Chunked causal linear attention with a scalar decay per head and step."""

from keras import ops

from keras_lopt import backend as _backend
from keras_lopt.ops._utils import NEG
from keras_lopt.ops._utils import num_chunks
from keras_lopt.ops._utils import pad_time


def chunk_linear_attention(q, k, v, log_decay=None, initial_state=None, chunk_size=64):
    """Causal linear attention, computed chunk by chunk.

    Computes, per batch element and head, the recurrence
    `S_t = a_t S_{t-1} + k_t v_t^T`, `o_t = q_t^T S_t` with `a_t =
    exp(log_decay_t)` (1 when `log_decay` is None): within a chunk the
    masked quadratic form `((Q K^T) * D) V`, across chunks the state. This is
    also Mamba-2's SSD algorithm (Dao & Gu, 2024: `q = C`, `k = B`,
    `v = dt * x`, `log_decay = dt * A`).

    Args:
        q, k: `(batch, length, heads, key_dim)`.
        v: `(batch, length, heads, value_dim)`.
        log_decay: optional `(batch, length, heads)`, values <= 0.
        initial_state: optional `(batch, heads, key_dim, value_dim)`; zeros
            when None.
        chunk_size: positions per chunk; `length` need not be a multiple.

    Returns:
        `(outputs, final_state)`: `(batch, length, heads, value_dim)` and
        `(batch, heads, key_dim, value_dim)`, float32.

    Example:

    >>> q = k = keras.random.normal((2, 100, 4, 16))
    >>> v = keras.random.normal((2, 100, 4, 32))
    >>> out, state = chunk_linear_attention(q, k, v, chunk_size=32)
    """
    q, k, v = (ops.cast(t, "float32") for t in (q, k, v))
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    batch = ops.shape(q)[0]
    n = num_chunks(length, chunk_size)
    c = chunk_size
    if log_decay is None:
        log_decay = ops.zeros((batch, length, heads), "float32")
    log_decay = ops.cast(log_decay, "float32")
    # Padded steps have k = v = 0 and decay 1: they leave the state unchanged.
    q, k, v, log_decay = (pad_time(t, n * c) for t in (q, k, v, log_decay))

    def chunks(t):
        # (batch, n*c, heads, d) -> (batch, heads, n, c, d)
        t = ops.reshape(t, (batch, n, c, heads, -1))
        return ops.transpose(t, (0, 3, 1, 2, 4))

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    cum = ops.cumsum(chunks(log_decay)[..., 0], axis=-1)  # (batch, heads, n, c)
    causal = ops.tril(ops.ones((c, c), "bool"))
    gap = cum[..., :, None] - cum[..., None, :]
    decay = ops.exp(ops.where(causal, gap, NEG))  # (batch, heads, n, c, c)

    scores = ops.matmul(qc, ops.swapaxes(kc, -1, -2)) * decay
    intra = ops.matmul(scores, vc)

    # State each chunk adds, decayed to the chunk's end.
    to_end = ops.exp(cum[..., -1:] - cum)[..., None]
    chunk_states = ops.matmul(ops.swapaxes(kc * to_end, -1, -2), vc)  # (b, h, n, K, V)
    chunk_decay = ops.exp(cum[..., -1])  # (b, h, n)

    if initial_state is None:
        initial_state = ops.zeros((batch, heads, key_dim, value_dim), "float32")
    initial_state = ops.cast(initial_state, "float32")

    def carry_state(state, inputs):
        added, a = inputs
        return a[..., None, None] * state + added, state

    final_state, entering = _backend.scan(
        carry_state,
        initial_state,
        (ops.moveaxis(chunk_states, 2, 0), ops.moveaxis(chunk_decay, 2, 0)),
    )
    entering = ops.moveaxis(entering, 0, 2)  # state before each chunk
    inter = ops.matmul(qc * ops.exp(cum)[..., None], entering)

    out = ops.transpose(intra + inter, (0, 2, 3, 1, 4))
    out = ops.reshape(out, (batch, n * c, heads, value_dim))[:, :length]
    return out, final_state
