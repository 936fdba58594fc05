"""keras_lopt.ops.causal_conv: chunk == naive == stepped == float64 NumPy, and continuation."""

import numpy as np
import pytest

from keras_lopt.ops.causal_conv import chunk_causal_conv
from keras_lopt.ops.causal_conv import naive_causal_conv
from keras_lopt.ops.causal_conv import recurrent_causal_conv
from tests.ops.reference import f32
from tests.ops.reference import np_
from tests.ops.reference import numpy_causal_conv

TOL = dict(atol=1e-5)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("width", [1, 4])
def test_chunk_equals_naive_equals_steps(width, bias):
    rng = np.random.default_rng(width)
    x = rng.standard_normal((2, 9, 3))
    kernel = rng.standard_normal((width, 3))
    b = rng.standard_normal((3,)) if bias else None
    s0 = rng.standard_normal((2, width - 1, 3))
    want, want_state = numpy_causal_conv(x, kernel, b, s0)
    args = [f32(t) for t in (x, kernel, b, s0)]
    for y, state in (chunk_causal_conv(*args), naive_causal_conv(*args)):
        np.testing.assert_allclose(np_(y), want, **TOL)
        np.testing.assert_allclose(np_(state), want_state, **TOL)
    state = args[-1]
    for t in range(x.shape[1]):
        y, state = recurrent_causal_conv(args[0][:, t], *args[1:3], state)
        np.testing.assert_allclose(np_(y), want[:, t], **TOL)
    np.testing.assert_allclose(np_(state), want_state, **TOL)


def test_continues_from_its_state():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 3)).astype("float32")
    kernel = rng.standard_normal((4, 3)).astype("float32")
    full, _ = chunk_causal_conv(x, kernel)
    want, _ = numpy_causal_conv(x.astype("float64"), kernel, None, np.zeros((2, 3, 3)))
    np.testing.assert_allclose(np_(full), want, **TOL)
    _, state = chunk_causal_conv(x[:, :5], kernel)
    tail, _ = chunk_causal_conv(x[:, 5:], kernel, initial_state=state)
    np.testing.assert_allclose(np_(tail), want[:, 5:], **TOL)
    y, _ = recurrent_causal_conv(x[:, 0], kernel)
    np.testing.assert_allclose(np_(y), want[:, 0], **TOL)
