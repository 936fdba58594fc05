"""Copying weights between layers: the one copy path of the distillation code.

`convert` (model surgery) and `hub` (keras-hub teachers) both copy through
here, so there is a single convention for attention weights and a single
place that checks shapes. Nothing here imports the rest of the package
beyond `keras`, so both may import it without a cycle.
"""

import keras
import numpy as np
from keras import ops

ATTENTION_WEIGHTS = ("query", "key", "value", "output")


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def assign(variable, value, what):
    """`variable.assign(value)` after checking that the shapes agree exactly.

    Args:
        variable: a `keras.Variable`.
        value: a tensor or array of the same shape.
        what: the name used in the error message.
    """
    value = to_numpy(value)
    if tuple(value.shape) != tuple(variable.shape):
        raise ValueError(
            f"Cannot copy {what}: shape {tuple(value.shape)} does not fit the target's "
            f"{tuple(variable.shape)}.")
    variable.assign(value.astype(keras.backend.standardize_dtype(variable.dtype)))


def copy_layer(source, target):
    """All weights of `source` into the same-structured layer `target`."""
    target.set_weights(source.get_weights())


def copy_attention_weights(source, target):
    """Copies attention projections into `target`, in the package's one convention.

    The convention (`keras.layers.MultiHeadAttention`'s and keras-hub's):
    `query` `(d_model, heads, key_dim)`, `key` `(d_model, kv_heads,
    key_dim)`, `value` `(d_model, kv_heads, value_dim)`, `output` `(heads,
    value_dim, output_dim)`, and with biases `query_bias` `(heads, key_dim)`,
    `key_bias`, `value_bias` per key/value head and `output_bias`
    `(output_dim,)`.

    Args:
        source: a mapping from those names to tensors, or a layer with an
            `attention_weights` property (`CausalSelfAttention`,
            `LinearAttention`). Biases are read when `target` has them.
        target: a built `CausalSelfAttention` or `LinearAttention`.

    Raises:
        ValueError: a shape differs, or `target` has biases the source lacks
            (or the reverse).

    Example:

    >>> copy_attention_weights(transformer_block.mixer, linear_block.mixer)
    """
    if hasattr(source, "attention_weights"):
        source = source.attention_weights
    destination = target.attention_weights
    source_biases = {name for name in source if name.endswith("_bias")}
    target_biases = {name for name in destination if name.endswith("_bias")}
    if source_biases != target_biases:
        raise ValueError(
            f"Attention biases differ: the source has {sorted(source_biases)}, the target "
            f"{sorted(target_biases)}.")
    for name, variable in destination.items():
        assign(variable, source[name], f"attention {name}")
