"""Feature maps `phi` for linear attention.

A feature map is a `keras.layers.Layer` applied to queries or keys of shape
`(batch, length, heads, key_dim)` that returns `(batch, length, heads,
feature_dim)`. Linear attention replaces `softmax(q . k)` by
`phi(q) . phi(k)`, so a good map keeps its outputs non-negative (the
normaliser `phi(q) . sum(phi(k))` must stay positive) and, for distillation,
as "spiky" as softmax.

Any layer following that contract can be passed to `LinearAttention`; the
ones here are selected by name through `get_feature_map`.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_lopt")
class IdentityFeatureMap(keras.layers.Layer):
    """`phi(x) = x`: plain (unnormalised) linear attention.

    Its outputs can be negative, so pair it with `normalization="norm"` or
    `None` rather than the denominator.
    """

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)


@keras.saving.register_keras_serializable(package="keras_lopt")
class EluFeatureMap(IdentityFeatureMap):
    """`phi(x) = elu(x) + 1` (Katharopoulos et al., 2020): positive and smooth."""

    def call(self, inputs):
        return ops.elu(inputs) + 1.0


@keras.saving.register_keras_serializable(package="keras_lopt")
class ReluFeatureMap(IdentityFeatureMap):
    """`phi(x) = relu(x)`: non-negative and sparse."""

    def call(self, inputs):
        return ops.relu(inputs)


@keras.saving.register_keras_serializable(package="keras_lopt")
class HedgehogFeatureMap(keras.layers.Layer):
    """Hedgehog's learnable feature map (Zhang et al., 2024, arXiv 2402.04347).

    Per head, `phi(x) = softmax([x W, -x W])` over the last axis, with
    `W` of shape `(heads, key_dim, feature_dim)` initialised to the identity.
    The softmax makes the map positive and spiky like softmax attention; the
    mirrored half `-x W` keeps it monotone in both directions of `x W`, so
    the output width is `2 * feature_dim`.

    Args:
        feature_dim: columns of `W` per head; defaults to the input's
            `key_dim`.
        kernel_initializer: initializer for `W`; defaults to the identity
            (a rectangular identity when `feature_dim != key_dim`).

    Example:

    >>> phi = HedgehogFeatureMap()
    >>> phi(keras.random.normal((2, 10, 4, 16))).shape
    (2, 10, 4, 32)
    """

    def __init__(self, feature_dim=None, kernel_initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.feature_dim = feature_dim
        self.kernel_initializer = (
            None if kernel_initializer is None else keras.initializers.get(kernel_initializer)
        )

    def build(self, input_shape):
        heads, key_dim = input_shape[-2], input_shape[-1]
        if heads is None or key_dim is None:
            raise ValueError(
                "HedgehogFeatureMap needs known `heads` and `key_dim` (the last two "
                f"axes); received input shape {input_shape}."
            )
        feature_dim = self.feature_dim or key_dim

        def identity(shape, dtype=None):
            # tile, not broadcast_to: torch would make the variable a view.
            return ops.tile(ops.eye(shape[1], shape[2], dtype=dtype)[None], (shape[0], 1, 1))

        self.kernel = self.add_weight(
            shape=(heads, key_dim, feature_dim),
            initializer=self.kernel_initializer or identity,
            # Read in float32 even inside a mixed-precision parent: it sets how
            # spiky the softmax is.
            autocast=False,
            name="kernel",
        )

    def routing_layouts(self):
        """One `(key_dim, feature_dim)` matrix per head (`keras_lopt.rules.routing`)."""
        return {"kernel": "...hd,hdf->...hf"}

    def call(self, inputs):
        x = ops.einsum("...hd,hdf->...hf", inputs, ops.cast(self.kernel, inputs.dtype))
        return ops.softmax(ops.concatenate([x, -x], axis=-1), axis=-1)

    def compute_output_shape(self, input_shape):
        feature_dim = self.feature_dim or input_shape[-1]
        return tuple(input_shape[:-1]) + (2 * feature_dim,)

    def get_config(self):
        config = super().get_config()
        config["feature_dim"] = self.feature_dim
        config["kernel_initializer"] = (
            None
            if self.kernel_initializer is None
            else keras.initializers.serialize(self.kernel_initializer)
        )
        return config


FEATURE_MAPS = {
    "elu": EluFeatureMap,
    "relu": ReluFeatureMap,
    "hedgehog": HedgehogFeatureMap,
    "identity": IdentityFeatureMap,
}


def get_feature_map(name_or_layer, **kwargs):
    """Returns a feature-map layer.

    Args:
        name_or_layer: one of `"elu"`, `"relu"`, `"hedgehog"`, `"identity"`
            (a new layer is created, with `kwargs` passed to its
            constructor), a `keras.layers.Layer` (returned as is), or a
            config dict from `keras.saving.serialize_keras_object`.
        **kwargs: constructor arguments for a named map, e.g. `dtype` or
            Hedgehog's `feature_dim`.

    Returns:
        A `keras.layers.Layer` mapping `(..., heads, key_dim)` to
        `(..., heads, feature_dim)`.
    """
    if isinstance(name_or_layer, keras.layers.Layer):
        return name_or_layer
    if isinstance(name_or_layer, dict):
        return keras.saving.deserialize_keras_object(name_or_layer)
    if isinstance(name_or_layer, str):
        key = name_or_layer.lower()
        if key not in FEATURE_MAPS:
            raise ValueError(
                f"Unknown feature map {name_or_layer!r}; expected one of "
                f"{sorted(FEATURE_MAPS)} or a keras.layers.Layer."
            )
        return FEATURE_MAPS[key](**kwargs)
    raise TypeError(
        "feature_map must be a name or a keras.layers.Layer; received "
        f"{name_or_layer!r} of type {type(name_or_layer).__name__}."
    )
