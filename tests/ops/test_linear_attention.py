"""keras_lopt.ops.linear_attention: chunk == naive == stepped recurrence == float64 NumPy."""

import numpy as np
import pytest

from keras_lopt.ops.linear_attention import chunk_linear_attention
from keras_lopt.ops.linear_attention import naive_linear_attention
from keras_lopt.ops.linear_attention import recurrent_linear_attention
from tests.ops.reference import f32
from tests.ops.reference import np_
from tests.ops.reference import numpy_linear_attention

TOL = dict(atol=1e-5, rtol=1e-5)


def inputs(length, decay=True, seed=None):
    rng = np.random.default_rng(length if seed is None else seed)
    q, k = rng.standard_normal((2, 2, length, 3, 5))
    v = rng.standard_normal((2, length, 3, 6))
    log_decay = -rng.uniform(0, 1, (2, length, 3)) if decay else None
    s0 = rng.standard_normal((2, 3, 5, 6))
    return q, k, v, log_decay, s0


@pytest.mark.parametrize("decay", [True, False], ids=["decay", "no_decay"])
@pytest.mark.parametrize("length,chunk", [(1, 4), (7, 4), (16, 4), (33, 8), (5, 64)])
def test_chunk_equals_naive_equals_steps(length, chunk, decay):
    q, k, v, log_decay, s0 = inputs(length, decay)
    zeros = np.zeros(q.shape[:3])
    want, want_state = numpy_linear_attention(
        q, k, v, zeros if log_decay is None else log_decay, s0)
    args = [f32(t) for t in (q, k, v, log_decay, s0)]
    out, state = chunk_linear_attention(*args, chunk_size=chunk)
    naive, naive_state = naive_linear_attention(*args)
    for got, got_state in ((out, state), (naive, naive_state)):
        np.testing.assert_allclose(np_(got), want, **TOL)
        np.testing.assert_allclose(np_(got_state), want_state, **TOL)
    state = f32(s0)
    for t in range(length):
        o, state = recurrent_linear_attention(
            *(None if a is None else a[:, t] for a in args[:4]), state)
        np.testing.assert_allclose(np_(o), want[:, t], **TOL)
    np.testing.assert_allclose(np_(state), want_state, **TOL)


def test_no_initial_state_means_zeros():
    q, k, v, log_decay, s0 = inputs(9)
    args = [f32(t) for t in (q, k, v, log_decay)]
    want, want_state = numpy_linear_attention(q, k, v, log_decay, np.zeros_like(s0))
    for got, got_state in (chunk_linear_attention(*args, chunk_size=4),
                           naive_linear_attention(*args)):
        np.testing.assert_allclose(np_(got), want, **TOL)
        np.testing.assert_allclose(np_(got_state), want_state, **TOL)
    o, _ = recurrent_linear_attention(*(a[:, 0] for a in args))
    np.testing.assert_allclose(np_(o), want[:, 0], **TOL)


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_linear_attention(np.zeros((1, 2, 1, 1)), np.zeros((1, 2, 1, 1)),
                               np.zeros((1, 2, 1, 1)), chunk_size=0)
