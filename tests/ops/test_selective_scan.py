"""keras_lopt.ops.selective_scan: chunk (both modes) == naive == stepped == float64 NumPy."""

import numpy as np
import pytest

from keras_lopt.ops.selective_scan import chunk_selective_scan
from keras_lopt.ops.selective_scan import naive_selective_scan
from keras_lopt.ops.selective_scan import recurrent_selective_scan
from keras_lopt.ops.selective_scan import sequential_selective_scan
from tests.ops.reference import f32
from tests.ops.reference import np_
from tests.ops.reference import numpy_selective_scan

TOL = dict(atol=1e-5, rtol=1e-5)


def inputs(length):
    rng = np.random.default_rng(length)
    x, b, c = (rng.standard_normal((2, length, n)) for n in (6, 4, 4))
    delta = rng.uniform(0.01, 0.5, (2, length, 6))
    a = -rng.uniform(0.5, 4, (6, 4))
    h0 = rng.standard_normal((2, 6, 4))
    return x, delta, a, b, c, h0


@pytest.mark.parametrize("length,chunk", [(1, 4), (7, 4), (33, 8)])
def test_chunk_equals_naive_equals_steps(length, chunk):
    x, delta, a, b, c, h0 = inputs(length)
    want, want_state = numpy_selective_scan(x, delta, a, b, c, h0)
    args = [f32(t) for t in (x, delta, a, b, c, h0)]
    results = [chunk_selective_scan(*args, chunk_size=chunk, within_chunk=mode)
               for mode in ("associative", "sequential")]
    results += [naive_selective_scan(*args), sequential_selective_scan(*args)]
    for y, state in results:
        np.testing.assert_allclose(np_(y), want, **TOL)
        np.testing.assert_allclose(np_(state), want_state, **TOL)
    state = args[-1]
    for t in range(length):
        y, state = recurrent_selective_scan(
            args[0][:, t], args[1][:, t], args[2], args[3][:, t], args[4][:, t], state)
        np.testing.assert_allclose(np_(y), want[:, t], **TOL)
    np.testing.assert_allclose(np_(state), want_state, **TOL)


def test_no_initial_state_means_zeros():
    x, delta, a, b, c, h0 = inputs(5)
    want, want_state = numpy_selective_scan(x, delta, a, b, c, np.zeros_like(h0))
    args = [f32(t) for t in (x, delta, a, b, c)]
    for y, state in (chunk_selective_scan(*args, chunk_size=2), naive_selective_scan(*args),
                     sequential_selective_scan(*args)):
        np.testing.assert_allclose(np_(y), want, **TOL)
        np.testing.assert_allclose(np_(state), want_state, **TOL)
    y, _ = recurrent_selective_scan(args[0][:, 0], args[1][:, 0], args[2], args[3][:, 0],
                                    args[4][:, 0])
    np.testing.assert_allclose(np_(y), want[:, 0], **TOL)


def test_bad_within_chunk():
    with pytest.raises(ValueError, match="within_chunk"):
        chunk_selective_scan(*(np.zeros((1, 2, 1), "float32"),) * 2,
                             np.zeros((1, 1), "float32"),
                             *(np.zeros((1, 2, 1), "float32"),) * 2, within_chunk="fast")
