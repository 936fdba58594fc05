"""The few places where a backend forces backend-specific code.

Everything else in keras-lopt is written with `keras.ops` only.
"""

from keras import backend
from keras import ops


def densify(gradient):
    """Turns TensorFlow's `IndexedSlices` (embedding gradients) dense.

    keras.ops keep them sparse, but the learned rules need every element.
    """
    if backend.backend() == "tensorflow" and hasattr(gradient, "dense_shape"):
        import tensorflow as tf

        return tf.convert_to_tensor(gradient)
    return gradient


def compiles_elementwise_fusions():
    """Whether long element-wise expressions compile into one fused loop.

    True on JAX (XLA always compiles): Celo2's MLP then runs as ~330
    multiply-adds per element without ever materialising its 30-channel
    input. Eager backends instead run it as three matmuls over a stacked
    channel tensor, which costs memory but far fewer kernel launches.
    """
    return backend.backend() == "jax"


def means(values, axes):
    """`[mean(x, axes, keepdims=True) for x in values]`, in one pass on JAX.

    XLA on CPU materialises the operand of every separate reduction, which
    made Celo2's 18 per-channel normalisers cost more than the rest of the
    rule together; one variadic `lax.reduce` computes them in a single loop.
    """
    if backend.backend() != "jax" or len(values) == 1:
        return [ops.mean(x, axis=axes, keepdims=True) for x in values]
    import jax

    rank = len(values[0].shape)
    dims = tuple(sorted(a % rank for a in axes))
    count = 1
    for d in dims:
        count *= values[0].shape[d]
    shape = tuple(1 if d in dims else s for d, s in enumerate(values[0].shape))
    values = tuple(jax.numpy.broadcast_to(x, values[0].shape) for x in values)
    zeros = tuple(jax.numpy.zeros((), x.dtype) for x in values)
    sums = jax.lax.reduce(
        values, zeros, lambda a, b: tuple(x + y for x, y in zip(a, b)), dims
    )
    return [jax.numpy.reshape(s, shape) / count for s in sums]
