"""Softmax causal self-attention with a KV cache: the baseline mixer."""

import keras
from keras import ops
from keras.saving import register_keras_serializable

from keras_lopt.layers import rotary
from keras_lopt.layers._checks import check_length
from keras_lopt.layers._checks import check_mask
from keras_lopt.layers._checks import check_positive
from keras_lopt.layers._checks import check_width


def _check_float(x, name):
    if not keras.backend.is_float_dtype(keras.backend.standardize_dtype(x.dtype)):
        raise TypeError(f"{name} expects floating-point inputs; received dtype {x.dtype}.")


def _concrete_int(x):
    """`int(x)` for a concrete tensor; `None` while tracing."""
    try:
        return int(ops.convert_to_numpy(x))
    except Exception:  # noqa: BLE001 - a tracer of any backend
        return None


@register_keras_serializable(package="keras_lopt")
class CausalSelfAttention(keras.layers.Layer):
    """Multi-head causal softmax self-attention with grouped K/V heads and a KV cache.

    Training uses `keras.ops.dot_product_attention` over the whole sequence;
    generation appends one token at a time to a preallocated key/value cache,
    so the cost of a new token grows with the context (unlike
    `LinearAttention` and `Mamba`, whose state has a fixed size).

    Args:
        num_heads: number of query heads.
        key_dim: size of each head.
        num_key_value_heads: number of key/value heads (grouped-query
            attention); defaults to `num_heads`. Must divide `num_heads`.
        rotary: apply rotary position embeddings to queries and keys.
        rotary_max_wavelength: RoPE base.
        use_bias: biases on the projections.
        kernel_initializer: initializer of the projection kernels.

    Weights follow the one attention convention of this package (that of
    `keras.layers.MultiHeadAttention` and keras-hub), shared with
    `LinearAttention`: `attention_weights` maps `query`, `key`, `value`,
    `output` (and with `use_bias` `query_bias`, `key_bias`, `value_bias`,
    `output_bias`) to the variables, shaped `(d_model, heads, key_dim)`,
    `(d_model, kv_heads, key_dim)` (key and value), `(heads, key_dim,
    d_model)` and `(heads, key_dim)`, `(kv_heads, key_dim)` (key and value),
    `(d_model,)`. `keras_lopt.distillation.weights.copy_attention_weights`
    copies them between layers.

    Generation follows the cache protocol of every mixer here:
    `init_cache(batch_size, max_length)`, `prefill(inputs, padding_mask,
    max_length)` -> `(outputs, cache)`, `step(inputs, cache)` ->
    `(outputs, cache)`. `max_length` is the cache's capacity in tokens
    (prompt plus generated), which this layer's preallocated KV cache needs.

    Example:

    >>> layer = CausalSelfAttention(num_heads=4, key_dim=16)
    >>> y = layer(keras.random.normal((2, 10, 64)))
    >>> y2, cache = layer.prefill(keras.random.normal((2, 10, 64)), max_length=32)
    >>> y3, cache = layer.step(keras.random.normal((2, 64)), cache)
    """

    def __init__(self, num_heads, key_dim, num_key_value_heads=None, rotary=False,
                 rotary_max_wavelength=10000.0, use_bias=False,
                 kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        check_positive("CausalSelfAttention", num_heads=num_heads, key_dim=key_dim,
                       num_key_value_heads=num_key_value_heads or num_heads)
        self.num_heads = int(num_heads)
        self.key_dim = int(key_dim)
        self.num_key_value_heads = int(num_key_value_heads or num_heads)
        if self.num_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        self.rotary = bool(rotary)
        self.rotary_max_wavelength = float(rotary_max_wavelength)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(
                f"CausalSelfAttention expects (batch, length, features); received {input_shape}."
            )
        d = input_shape[-1]
        h, hkv, k = self.num_heads, self.num_key_value_heads, self.key_dim
        add = lambda name, shape: self.add_weight(  # noqa: E731
            shape=shape, name=name, initializer=self.kernel_initializer
        )
        self.query = add("query", (d, h, k))
        self.key = add("key", (d, hkv, k))
        self.value = add("value", (d, hkv, k))
        self.output_kernel = add("output", (h, k, d))
        if self.use_bias:
            zeros = lambda name, shape: self.add_weight(  # noqa: E731
                shape=shape, name=name, initializer="zeros"
            )
            self.query_bias = zeros("query_bias", (h, k))
            self.key_bias = zeros("key_bias", (hkv, k))
            self.value_bias = zeros("value_bias", (hkv, k))
            self.output_bias = zeros("output_bias", (d,))

    def routing_layouts(self):
        """The einsum each kernel is used in (`keras_lopt.rules.routing`)."""
        return {
            "query": "bld,dhk->blhk", "key": "bld,dhk->blhk",
            "value": "bld,dhk->blhk", "output_kernel": "blhk,hkd->bld",
        }

    def _project(self, x, positions):
        q = ops.einsum("bld,dhk->blhk", x, self.query)
        k = ops.einsum("bld,dhk->blhk", x, self.key)
        v = ops.einsum("bld,dhk->blhk", x, self.value)
        if self.use_bias:
            q, k, v = q + self.query_bias, k + self.key_bias, v + self.value_bias
        if self.rotary:
            q = rotary.apply_rotary(q, positions, self.rotary_max_wavelength)
            k = rotary.apply_rotary(k, positions, self.rotary_max_wavelength)
        return q, k, v

    def _attend(self, q, k, v, mask):
        groups = self.num_heads // self.num_key_value_heads
        if groups > 1:
            k, v = ops.repeat(k, groups, axis=2), ops.repeat(v, groups, axis=2)
        out = ops.dot_product_attention(q, k, v, mask=mask)
        out = ops.einsum("blhk,hkd->bld", out, self.output_kernel)
        if self.use_bias:
            out = out + self.output_bias
        return out

    def _width(self):
        return self.query.shape[0] if self.built else None

    def call(self, inputs, padding_mask=None):
        _check_float(inputs, "CausalSelfAttention")
        check_width("CausalSelfAttention", inputs, self._width())
        check_length("CausalSelfAttention", inputs)
        check_mask("CausalSelfAttention", padding_mask, inputs)
        length = inputs.shape[1]
        batch = ops.shape(inputs)[0]
        positions = rotary.positions_from_mask(padding_mask, length, batch)
        q, k, v = self._project(inputs, positions)
        mask = ops.tril(ops.ones((length, length), "bool"))[None, None]
        if padding_mask is not None:
            real = ops.cast(padding_mask, "bool")
            # Padded queries attend to themselves only: avoids an all-masked row.
            mask = ops.logical_or(
                ops.logical_and(mask, real[:, None, None, :]),
                ops.eye(length, dtype="bool")[None, None],
            )
        out = self._attend(q, k, v, mask)
        if padding_mask is not None:
            out = out * ops.cast(padding_mask, out.dtype)[..., None]
        return out

    def init_cache(self, batch_size, max_length=None):
        """An empty cache for `max_length` tokens.

        Args:
            batch_size: number of sequences.
            max_length: capacity of the KV cache in tokens; required (the
                recurrent mixers accept None, this cache is preallocated).

        Layout: `key`, `value` `(batch, max_length, kv_heads, key_dim)`;
        `valid` `(batch, max_length)` (1 where a real token was written);
        `index` the next write slot (int32 scalar); `position` `(batch,)`
        int32, the rotary position of the next token.
        """
        if max_length is None:
            raise ValueError(
                "CausalSelfAttention.init_cache needs max_length: the KV cache is "
                "preallocated for prompt + generated tokens.")
        shape = (batch_size, max_length, self.num_key_value_heads, self.key_dim)
        return {
            "key": ops.zeros(shape, self.compute_dtype),
            "value": ops.zeros(shape, self.compute_dtype),
            "valid": ops.zeros((batch_size, max_length), self.compute_dtype),
            "index": ops.zeros((), "int32"),
            "position": ops.zeros((batch_size,), "int32"),
        }

    def prefill(self, inputs, padding_mask=None, max_length=None):
        """Runs a prompt and returns `(outputs, cache)`.

        Args:
            inputs: `(batch, length, d_model)`.
            padding_mask: optional `(batch, length)`, 1 for real tokens.
            max_length: capacity of the returned cache in tokens; defaults
                to the prompt's length (no room for `step`).
        """
        length = inputs.shape[1]
        max_length = max_length or length
        if max_length < length:
            raise ValueError(f"max_length ({max_length}) is shorter than the prompt ({length}).")
        batch = ops.shape(inputs)[0]
        outputs = self(inputs, padding_mask=padding_mask)
        positions = rotary.positions_from_mask(padding_mask, length, batch)
        _, k, v = self._project(ops.cast(inputs, self.compute_dtype), positions)
        cache = self.init_cache(batch, max_length)
        valid = (
            ops.ones((batch, length), self.compute_dtype)
            if padding_mask is None
            else ops.cast(padding_mask, self.compute_dtype)
        )
        cache["key"] = ops.slice_update(cache["key"], (0, 0, 0, 0), k)
        cache["value"] = ops.slice_update(cache["value"], (0, 0, 0, 0), v)
        cache["valid"] = ops.slice_update(cache["valid"], (0, 0), valid)
        cache["index"] = ops.convert_to_tensor(length, "int32")
        cache["position"] = ops.cast(ops.sum(valid, axis=1), "int32")
        return outputs, cache

    def step(self, inputs, cache):
        """Attends one new token `(batch, d_model)` to the cache; returns `(output, cache)`."""
        if len(inputs.shape) != 2:
            raise ValueError(f"step expects (batch, features); received {inputs.shape}.")
        _check_float(inputs, "CausalSelfAttention")
        check_width("CausalSelfAttention", inputs, self._width())
        x = ops.cast(inputs, self.compute_dtype)[:, None]
        q, k, v = self._project(x, cache["position"][:, None])
        index = cache["index"]
        capacity = cache["key"].shape[1]
        full = _concrete_int(index)
        if full is not None and full >= capacity:
            raise ValueError(
                f"CausalSelfAttention.step: the KV cache is full ({capacity} tokens); "
                "prefill with a larger max_length.")
        zero = ops.zeros((), "int32")
        key = ops.slice_update(cache["key"], (zero, index, zero, zero), k)
        value = ops.slice_update(cache["value"], (zero, index, zero, zero), v)
        batch = ops.shape(x)[0]
        valid = ops.slice_update(
            cache["valid"], (zero, index), ops.ones((batch, 1), cache["valid"].dtype)
        )
        mask = ops.cast(valid, "bool")[:, None, None, :]
        out = self._attend(q, key, value, mask)[:, 0]
        if full is None:
            # Traced (a compiled step), the index is not known here: past
            # the capacity the update would silently land on the last slot,
            # so the output turns NaN instead.
            out = ops.where(index < capacity, out, ops.full_like(out, float("nan")))
        new_cache = {
            "key": key,
            "value": value,
            "valid": valid,
            "index": index + 1,
            "position": cache["position"] + 1,
        }
        return out, new_cache

    @property
    def attention_weights(self):
        """The projection variables by name, in the convention of the class docstring."""
        if not self.built:
            raise ValueError("CausalSelfAttention is not built: call it or build it first.")
        weights = {"query": self.query, "key": self.key, "value": self.value,
                   "output": self.output_kernel}
        if self.use_bias:
            weights.update(query_bias=self.query_bias, key_bias=self.key_bias,
                           value_bias=self.value_bias, output_bias=self.output_bias)
        return weights

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            key_dim=self.key_dim,
            num_key_value_heads=self.num_key_value_heads,
            rotary=self.rotary,
            rotary_max_wavelength=self.rotary_max_wavelength,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config
