"""Sequence-mixing kernels shared by `LinearAttention`, `Mamba` and `Mamba2`.

Each recurrence has two forms that compute the same numbers:

- a **chunked** form for training: the sequence is cut into chunks of
  `chunk_size`; inside a chunk the work is parallel (matrix products or an
  associative scan), and only a small state crosses chunk boundaries, so the
  cost is linear in the sequence length;
- a **step** form for generation: one token in, the state advanced, O(1) time
  and memory per token.

All functions are pure `keras.ops` code, compute in float32 and are
differentiable on every backend.
"""

from keras import ops

from keras_lopt import backend as _backend

# exp() of this is exactly 0 in float32: masks decays without inf - inf.
_NEG = -1e30


def _pad_time(x, length, axis=1):
    pad = length - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * len(x.shape)
    widths[axis] = (0, pad)
    return ops.pad(x, widths)


def _num_chunks(length, chunk_size):
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; received {chunk_size}.")
    return -(-length // chunk_size)


def chunked_decay_attention(q, k, v, log_decay=None, chunk_size=64, initial_state=None):
    """Causal linear attention with an optional scalar decay per head and step.

    Computes, per batch element and head, the recurrence
    `S_t = a_t S_{t-1} + k_t v_t^T`, `o_t = q_t^T S_t` with `a_t =
    exp(log_decay_t)` (1 when `log_decay` is None), in chunks: within a chunk
    the masked quadratic form `((Q K^T) * D) V`, across chunks the state.
    This is also Mamba-2's SSD algorithm (`q = C`, `k = B`, `v = dt * x`,
    `log_decay = dt * A`).

    Args:
        q, k: `(batch, length, heads, key_dim)`.
        v: `(batch, length, heads, value_dim)`.
        log_decay: optional `(batch, length, heads)`, values <= 0.
        chunk_size: positions per chunk; `length` need not be a multiple.
        initial_state: optional `(batch, heads, key_dim, value_dim)`.

    Returns:
        `(outputs, final_state)`: `(batch, length, heads, value_dim)` and
        `(batch, heads, key_dim, value_dim)`, float32.

    Example:

    >>> q = k = keras.random.normal((2, 100, 4, 16))
    >>> v = keras.random.normal((2, 100, 4, 32))
    >>> out, state = chunked_decay_attention(q, k, v, chunk_size=32)
    """
    q, k, v = (ops.cast(t, "float32") for t in (q, k, v))
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    batch = ops.shape(q)[0]
    n = _num_chunks(length, chunk_size)
    c = chunk_size
    if log_decay is None:
        log_decay = ops.zeros((batch, length, heads), "float32")
    log_decay = ops.cast(log_decay, "float32")
    # Padded steps have k = v = 0 and decay 1: they leave the state unchanged.
    q, k, v, log_decay = (_pad_time(t, n * c) for t in (q, k, v, log_decay))

    def chunks(t):
        # (batch, n*c, heads, d) -> (batch, heads, n, c, d)
        t = ops.reshape(t, (batch, n, c, heads, -1))
        return ops.transpose(t, (0, 3, 1, 2, 4))

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    cum = ops.cumsum(chunks(log_decay)[..., 0], axis=-1)  # (batch, heads, n, c)
    causal = ops.tril(ops.ones((c, c), "bool"))
    gap = cum[..., :, None] - cum[..., None, :]
    decay = ops.exp(ops.where(causal, gap, _NEG))  # (batch, heads, n, c, c)

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


def decay_attention_step(q, k, v, state, log_decay=None):
    """One step of `chunked_decay_attention`'s recurrence.

    Args:
        q, k: `(batch, heads, key_dim)`; v: `(batch, heads, value_dim)`.
        state: `(batch, heads, key_dim, value_dim)`.
        log_decay: optional `(batch, heads)`.

    Returns:
        `(output (batch, heads, value_dim), new_state)`.
    """
    q, k, v, state = (ops.cast(t, "float32") for t in (q, k, v, state))
    if log_decay is not None:
        state = ops.exp(ops.cast(log_decay, "float32"))[..., None, None] * state
    state = state + k[..., :, None] * v[..., None, :]
    return ops.einsum("bhk,bhkv->bhv", q, state), state


def _combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def chunked_selective_scan(x, delta, a, b, c, chunk_size=64, initial_state=None,
                           within_chunk="associative"):
    """Mamba-1's selective scan in chunks.

    Per channel `d` and state index `n`:
    `h_t = exp(delta_t A) * h_{t-1} + delta_t B_t x_t`, `y_t = C_t . h_t`.
    Chunks are processed one after another (`keras.ops.scan`); inside a chunk
    an associative scan runs over time (or, with `within_chunk="sequential"`,
    a step-by-step scan: on a CPU, where the state stays in cache, that is
    ~2-3x faster). Only one chunk's `(batch, chunk, d_inner, d_state)`
    tensors exist at a time, and on JAX the chunk is recomputed in the
    backward pass instead of stored.

    Args:
        x, delta: `(batch, length, d_inner)`.
        a: `(d_inner, d_state)`, negative.
        b, c: `(batch, length, d_state)`.
        chunk_size: positions per chunk.
        initial_state: optional `(batch, d_inner, d_state)`.
        within_chunk: `"associative"` (parallel over time, for accelerators)
            or `"sequential"`.

    Returns:
        `(y (batch, length, d_inner), final_state (batch, d_inner, d_state))`,
        float32 (without Mamba's `D x` skip term).
    """
    if within_chunk not in ("associative", "sequential"):
        raise ValueError(
            f'within_chunk must be "associative" or "sequential"; received {within_chunk!r}.'
        )
    x, delta, a, b, c = (ops.cast(t, "float32") for t in (x, delta, a, b, c))
    length, d_inner = x.shape[1], x.shape[2]
    d_state = a.shape[-1]
    batch = ops.shape(x)[0]
    n = _num_chunks(length, chunk_size)
    # Padded steps have delta = 0: decay 1 and no input, state unchanged.
    x, delta, b, c = (_pad_time(t, n * chunk_size) for t in (x, delta, b, c))

    def chunks(t):
        t = ops.reshape(t, (batch, n, chunk_size, t.shape[-1]))
        return ops.moveaxis(t, 1, 0)

    if initial_state is None:
        initial_state = ops.zeros((batch, d_inner, d_state), "float32")
    initial_state = ops.cast(initial_state, "float32")

    def one_chunk(h, inputs):
        xc, dc, bc, cc = inputs
        if within_chunk == "sequential":
            y, h = sequential_selective_scan(xc, dc, a, bc, cc, h)
            return h, y
        decay = ops.exp(dc[..., None] * a)  # (batch, chunk, d_inner, d_state)
        drive = (dc * xc)[..., None] * bc[:, :, None, :]
        decay, drive = ops.associative_scan(_combine, (decay, drive), axis=1)
        states = decay * h[:, None] + drive
        y = ops.einsum("btdn,btn->btd", states, cc)
        return states[:, -1], y

    final_state, y = _backend.scan(
        _backend.rematerialize(one_chunk),
        initial_state,
        tuple(chunks(t) for t in (x, delta, b, c)),
    )
    y = ops.reshape(ops.moveaxis(y, 0, 1), (batch, n * chunk_size, d_inner))
    return y[:, :length], final_state


def selective_scan_step(x, delta, a, b, c, state):
    """One step of `chunked_selective_scan`.

    Args:
        x, delta: `(batch, d_inner)`; a: `(d_inner, d_state)`;
        b, c: `(batch, d_state)`; state: `(batch, d_inner, d_state)`.

    Returns:
        `(y (batch, d_inner), new_state)`.
    """
    x, delta, a, b, c, state = (ops.cast(t, "float32") for t in (x, delta, a, b, c, state))
    state = ops.exp(delta[..., None] * a) * state + (delta * x)[..., None] * b[:, None, :]
    return ops.einsum("bdn,bn->bd", state, c), state


def sequential_selective_scan(x, delta, a, b, c, initial_state=None):
    """`chunked_selective_scan` as a plain time-step `keras.ops.scan` (baseline)."""
    batch, d_inner, d_state = ops.shape(x)[0], x.shape[2], a.shape[-1]
    if initial_state is None:
        initial_state = ops.zeros((batch, d_inner, d_state), "float32")

    def body(state, inputs):
        y, state = selective_scan_step(*inputs[:2], a, *inputs[2:], state)
        return state, y

    xs = tuple(ops.moveaxis(ops.cast(t, "float32"), 1, 0) for t in (x, delta, b, c))
    final_state, y = _backend.scan(body, ops.cast(initial_state, "float32"), xs)
    return ops.moveaxis(y, 0, 1), final_state


def causal_depthwise_conv(x, kernel, bias=None, cache=None):
    """Causal depthwise 1-D convolution, optionally continuing from a cache.

    Args:
        x: `(batch, length, channels)`.
        kernel: `(width, channels)`; output `t` sees inputs `t-width+1..t`.
        bias: optional `(channels,)`.
        cache: optional `(batch, width - 1, channels)`, the inputs preceding
            `x` (zeros at the start of a sequence).

    Returns:
        `(y, new_cache)`, `y` of `x`'s shape and the last `width - 1` inputs.
    """
    width = kernel.shape[0]
    batch = ops.shape(x)[0]
    if cache is None:
        cache = ops.zeros((batch, width - 1, x.shape[-1]), x.dtype)
    full = ops.concatenate([ops.cast(cache, x.dtype), x], axis=1)
    length = x.shape[1]
    y = 0.0
    for i in range(width):
        y = y + full[:, i : i + length] * ops.cast(kernel[i], x.dtype)
    if bias is not None:
        y = y + ops.cast(bias, x.dtype)
    return y, full[:, full.shape[1] - (width - 1) :]
