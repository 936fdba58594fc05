"""Mamba-1's selective scan in chunks."""

from keras import ops

from keras_lopt import backend as _backend
from keras_lopt.ops._utils import num_chunks
from keras_lopt.ops._utils import pad_time
from keras_lopt.ops.selective_scan.recurrent import sequential_selective_scan

WITHIN_CHUNK = ("associative", "sequential")


def _combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def chunk_selective_scan(x, delta, a, b, c, initial_state=None, chunk_size=64,
                         within_chunk="associative"):
    """Mamba-1's selective scan (Gu & Dao, 2023), chunk by chunk.

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
        initial_state: optional `(batch, d_inner, d_state)`; zeros when None.
        chunk_size: positions per chunk.
        within_chunk: `"associative"` (parallel over time, for accelerators)
            or `"sequential"`.

    Returns:
        `(y (batch, length, d_inner), final_state (batch, d_inner, d_state))`,
        float32 (without Mamba's `D x` skip term).

    Example:

    >>> y, state = chunk_selective_scan(x, delta, a, b, c, chunk_size=64)
    """
    if within_chunk not in WITHIN_CHUNK:
        raise ValueError(
            f'within_chunk must be "associative" or "sequential"; received {within_chunk!r}.'
        )
    x, delta, a, b, c = (ops.cast(t, "float32") for t in (x, delta, a, b, c))
    length, d_inner = x.shape[1], x.shape[2]
    d_state = a.shape[-1]
    batch = ops.shape(x)[0]
    n = num_chunks(length, chunk_size)
    # Padded steps have delta = 0: decay 1 and no input, state unchanged.
    x, delta, b, c = (pad_time(t, n * chunk_size) for t in (x, delta, b, c))

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
