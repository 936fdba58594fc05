"""The only backend-specific code of `keras_lopt.layers`."""

import keras


def rematerialize(fn):
    """Recompute `fn`'s intermediates in the backward pass instead of storing them.

    Used on the body of a chunk loop so that training memory holds one
    chunk's `(batch, chunk, d_inner, d_state)` tensors, not one per chunk.
    JAX offers this as `jax.checkpoint`; elsewhere `fn` is returned as is
    (TensorFlow and torch keep every chunk's intermediates for backward).
    """
    if keras.backend.backend() == "jax":
        import jax

        return jax.checkpoint(fn)
    return fn


def scan(fn, init, xs):
    """`keras.ops.scan` over the leading axis of the tuple `xs`.

    Keras' TensorFlow `scan` requires each per-step output to have the
    carry's shape, which the chunk loops do not satisfy; on TensorFlow the
    (short, static) loop over chunks is therefore unrolled in Python.
    """
    from keras import ops

    if keras.backend.backend() != "tensorflow":
        return ops.scan(fn, init, xs)
    carry, outputs = init, []
    for i in range(xs[0].shape[0]):
        carry, y = fn(carry, tuple(x[i] for x in xs))
        outputs.append(y)
    return carry, ops.stack(outputs)
