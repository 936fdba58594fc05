"""Linear attention: softmax attention's drop-in replacement at linear cost."""

import keras
import numpy as np
from keras import ops

from keras_lopt.layers import rotary
from keras_lopt.layers._checks import check_length
from keras_lopt.layers._checks import check_mask
from keras_lopt.layers._checks import check_positive
from keras_lopt.layers._checks import check_width
from keras_lopt.layers.feature_maps import get_feature_map
from keras_lopt.ops.linear_attention import chunk_linear_attention
from keras_lopt.ops.linear_attention import recurrent_linear_attention

NORMALIZATIONS = ("denominator", "norm", None)


@keras.saving.register_keras_serializable(package="keras_lopt")
class LinearAttention(keras.layers.Layer):
    """Multi-head (decayed) linear self-attention.

    Softmax attention's `softmax(q . k) v` is replaced, per head, by a
    feature map `phi` and the recurrence

    `S_t = a_t S_{t-1} + phi(k_t) v_t^T`, `z_t = a_t z_{t-1} + phi(k_t)`,
    `o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + epsilon)`,

    with `a_t = 1` (plain linear attention) or a learned decay per head
    (RetNet / Mamba-2). Training runs the chunked form
    (`keras_lopt.ops.linear_attention.chunk_linear_attention`), O(length) in
    time and memory; generation runs the recurrent form (`step`), O(1) per
    token with a fixed-size cache.

    Weights follow the one attention convention of this package (that of
    `keras.layers.MultiHeadAttention` and keras-hub), shared with
    `CausalSelfAttention`: `attention_weights` maps `query`, `key`,
    `value`, `output` (and with `use_bias` `query_bias`, `key_bias`,
    `value_bias`, `output_bias`) to the variables, shaped
    `(d_model, heads, key_dim)`, `(d_model, kv_heads, key_dim)`,
    `(d_model, kv_heads, value_dim)`, `(heads, value_dim, output_dim)` and
    `(heads, key_dim)`, `(kv_heads, key_dim)`, `(kv_heads, value_dim)`,
    `(output_dim,)`. They live in `EinsumDense` layers `query_dense`,
    `key_dense`, `value_dense`, `output_dense`. A Transformer's weights are
    copied in with `keras_lopt.distillation.weights.copy_attention_weights`.

    The attention kernel, feature maps, rotary embedding and normalisation
    always compute in float32; only the projections use the layer's compute
    dtype (e.g. under `mixed_bfloat16`).

    Args:
        num_heads: number of query heads.
        key_dim: size of each query/key head (before the feature map).
        num_key_value_heads: number of key/value heads (grouped-query
            attention); must divide `num_heads`. Defaults to `num_heads`.
        value_dim: size of each value head. Defaults to `key_dim`.
        output_dim: width of the output. Defaults to the input's width.
        causal: whether position `t` only sees positions `<= t`. The
            non-causal form is `phi(Q) (phi(K)^T V)` over the whole sequence
            and has no `prefill`/`step`.
        feature_map: `"elu"` (`elu(x) + 1`), `"relu"`, `"hedgehog"`
            (learnable, see `HedgehogFeatureMap`; separate maps for queries
            and keys), `"identity"`, or a `keras.layers.Layer` mapping
            `(batch, length, heads, key_dim)` to `(batch, length, heads,
            feature_dim)`, which is then shared by queries and keys.
        normalization: `"denominator"` (divide by `phi(q)^T z + epsilon`),
            `"norm"` (no denominator; an RMS norm per head over `value_dim`
            with a learned scale, as in RetNet / Mamba-2), or `None` (the raw
            `phi(q)^T S`).
        epsilon: added to the denominator or inside the RMS norm.
        decay: whether to learn a decay `a = sigmoid(decay_logit)` per head,
            initialised from `1 - 2^-5` to `1 - 2^-9` across heads (RetNet).
            Requires `causal=True`.
        rotary: whether to apply rotary position embeddings (half-split
            convention, as GPT-NeoX / Llama) to queries and keys before the
            feature map. With a `padding_mask`, positions count real tokens
            only, so left padding does not shift them.
        rotary_max_wavelength: the largest wavelength of the rotary embedding.
        use_bias: whether the projections have biases.
        chunk_size: positions per chunk of the chunked form; trades the
            quadratic in-chunk work against the sequential chunk loop.
        max_sequence_length: if set, longer inputs raise a `ValueError`.
        kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer, kernel_constraint, bias_constraint: as in
            `keras.layers.MultiHeadAttention`, for the four projections.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `(batch, length, d_model)` floating-point tensor.
        padding_mask: optional `(batch, length)` bool or int tensor, 1 for
            real tokens. Padded positions neither contribute to nor read the
            state: with left padding the real tokens' outputs equal those of
            the unpadded sequence, with right padding the real tokens'
            outputs and the final state are unchanged. Their outputs are 0.
        training: unused; accepted for API compatibility.

    Returns:
        `(batch, length, output_dim)` in the layer's compute dtype.

    Example:

    >>> layer = LinearAttention(num_heads=4, key_dim=16, decay=True)
    >>> x = keras.random.normal((2, 100, 64))
    >>> layer(x).shape
    (2, 100, 64)

    Generation, one token at a time after a prompt:

    >>> y, cache = layer.prefill(x)
    >>> y_next, cache = layer.step(x[:, -1], cache)
    >>> y_next.shape
    (2, 64)
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        num_key_value_heads=None,
        value_dim=None,
        output_dim=None,
        causal=True,
        feature_map="elu",
        normalization="denominator",
        epsilon=1e-6,
        decay=False,
        rotary=False,
        rotary_max_wavelength=10000,
        use_bias=False,
        chunk_size=64,
        max_sequence_length=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        num_key_value_heads = num_key_value_heads or num_heads
        check_positive("LinearAttention", num_heads=num_heads, key_dim=key_dim,
                       num_key_value_heads=num_key_value_heads)
        if num_heads % num_key_value_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be divisible by "
                f"num_key_value_heads ({num_key_value_heads})."
            )
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"Unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}."
            )
        if decay and not causal:
            raise ValueError("decay=True needs causal=True: a decay has no direction otherwise.")
        if rotary and key_dim % 2:
            raise ValueError(f"rotary=True needs an even key_dim; received {key_dim}.")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1; received {chunk_size}.")
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.num_key_value_heads = num_key_value_heads
        self.value_dim = value_dim or key_dim
        self.output_dim = output_dim
        self.causal = causal
        self.normalization = normalization
        self.epsilon = epsilon
        self.decay = decay
        self.rotary = rotary
        self.rotary_max_wavelength = rotary_max_wavelength
        self.use_bias = use_bias
        self.chunk_size = chunk_size
        self.max_sequence_length = max_sequence_length
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)

        self.feature_map = feature_map
        if isinstance(feature_map, str):
            # Named maps run in float32 whatever the policy: softmax-like maps
            # and the denominator lose too much in bfloat16.
            self.query_feature_map = get_feature_map(
                feature_map, dtype="float32", name="query_feature_map"
            )
            self.key_feature_map = get_feature_map(
                feature_map, dtype="float32", name="key_feature_map"
            )
        else:
            self.query_feature_map = self.key_feature_map = get_feature_map(feature_map)
        self._feature_dim = None

    # ------------------------------------------------------------------ build

    def _projection(self, equation, output_shape, bias_axes, name):
        def clone(obj, module):
            return None if obj is None else module.get(module.serialize(obj))

        return keras.layers.EinsumDense(
            equation,
            output_shape=output_shape,
            bias_axes=bias_axes if self.use_bias else None,
            # Fresh initializer objects so that seeded ones differ per projection.
            kernel_initializer=clone(self.kernel_initializer, keras.initializers),
            bias_initializer=clone(self.bias_initializer, keras.initializers),
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            kernel_constraint=self.kernel_constraint,
            bias_constraint=self.bias_constraint,
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, input_shape):
        _check_rank(input_shape, 3, "call")
        d_model = input_shape[-1]
        if d_model is None:
            raise ValueError(
                f"The last axis of LinearAttention's input must be known; received {input_shape}."
            )
        self._d_model = int(d_model)
        heads, kv_heads = self.num_heads, self.num_key_value_heads

        def input_projection(heads, dim, name):
            return self._projection("abc,cde->abde", (None, heads, dim), "de", name)

        self.query_dense = input_projection(heads, self.key_dim, "query")
        self.key_dense = input_projection(kv_heads, self.key_dim, "key")
        self.value_dense = input_projection(kv_heads, self.value_dim, "value")
        self.output_dense = self._projection(
            "abcd,cde->abe", (None, self.output_dim or d_model), "e", "output"
        )
        for dense in (self.query_dense, self.key_dense, self.value_dense):
            dense.build((None, None, d_model))
        self.output_dense.build((None, None, heads, self.value_dim))
        self._build_feature_maps()
        if self.decay:
            # RetNet's spread of memory lengths, from ~32 to ~512 tokens.
            exponents = np.linspace(5.0, 9.0, heads) if heads > 1 else np.array([5.0])
            logits = np.log(2.0**exponents - 1.0).astype("float32")
            self.decay_logit = self.add_weight(
                shape=(heads,),
                initializer=lambda shape, dtype=None: ops.convert_to_tensor(logits, dtype),
                # In float32 even under mixed precision: bfloat16 cannot tell
                # a = 1 - 2^-9 from 1.
                autocast=False,
                name="decay_logit",
            )
        if self.normalization == "norm":
            self.norm_scale = self.add_weight(
                shape=(heads, self.value_dim), initializer="ones", autocast=False, name="norm_scale"
            )

    def _build_feature_maps(self):
        if self._feature_dim is not None:
            return self._feature_dim
        shape = (None, None, self.num_heads, self.key_dim)
        dims = []
        for feature_map in (self.query_feature_map, self.key_feature_map):
            if not feature_map.built:
                feature_map.build(shape)
            spec = feature_map.compute_output_spec(
                keras.KerasTensor((1, 1) + shape[2:], dtype="float32")
            )
            dims.append(spec.shape[-1])
        if dims[0] != dims[1]:
            raise ValueError(f"Query and key feature maps disagree on the feature size: {dims}.")
        self._feature_dim = dims[0]
        return self._feature_dim

    # ---------------------------------------------------------------- forward

    def _features(self, inputs, positions, mask):
        """Projected `phi(q), phi(k), v` and `log_decay`, float32, per query head."""
        q, k, v = (
            ops.cast(dense(inputs), "float32")
            for dense in (self.query_dense, self.key_dense, self.value_dense)
        )
        if self.rotary:
            q = rotary.apply_rotary(q, positions, self.rotary_max_wavelength)
            k = rotary.apply_rotary(k, positions, self.rotary_max_wavelength)
        groups = self.num_heads // self.num_key_value_heads
        if groups > 1:
            # Repeat before the feature map (as LoLCATs does) so a per-head
            # map sees one key per query head.
            k, v = ops.repeat(k, groups, axis=2), ops.repeat(v, groups, axis=2)
        phi_q = ops.cast(self.query_feature_map(q), "float32")
        phi_k = ops.cast(self.key_feature_map(k), "float32")
        if self.normalization == "denominator":
            # The extra value column accumulates z, so the kernel returns the
            # denominator phi(q).z as the last output column.
            v = ops.concatenate([v, ops.ones_like(v[..., :1])], axis=-1)
        log_decay = None
        if self.decay:
            log_a = ops.log_sigmoid(ops.cast(self.decay_logit, "float32"))
            log_decay = ops.broadcast_to(log_a, ops.shape(q)[:3])
        if mask is not None:
            # phi(0) != 0 for most maps, so it is phi(k) that must be zeroed;
            # decay 1 (log 0) keeps the state intact across padding.
            phi_k = phi_k * mask[:, :, None, None]
            v = v * mask[:, :, None, None]
            if log_decay is not None:
                log_decay = log_decay * mask[:, :, None]
        return phi_q, phi_k, v, log_decay

    def _normalize(self, out):
        if self.normalization == "denominator":
            return out[..., :-1] / (out[..., -1:] + self.epsilon)
        if self.normalization == "norm":
            rms = ops.rsqrt(ops.mean(ops.square(out), axis=-1, keepdims=True) + self.epsilon)
            return out * rms * ops.cast(self.norm_scale, "float32")
        return out

    def _output(self, heads_out, mask):
        outputs = self.output_dense(ops.cast(heads_out, self.compute_dtype))
        if mask is not None:
            # Zero, not the output bias, at padded positions.
            outputs = outputs * ops.cast(mask, outputs.dtype)[:, :, None]
        return outputs

    def _sequence(self, inputs, padding_mask):
        """The chunked (or non-causal) form: `(outputs, final_state, mask)`."""
        check_width("LinearAttention", inputs, self._width())
        check_length("LinearAttention", inputs)
        check_mask("LinearAttention", padding_mask, inputs)
        length = inputs.shape[1]
        limit = self.max_sequence_length
        if limit is not None and length is not None and length > limit:
            raise ValueError(
                f"Input length {length} exceeds this layer's max_sequence_length={limit}."
            )
        if padding_mask is None:
            mask = None
            positions = ops.arange(length, dtype="float32")[None, :]
        else:
            if len(padding_mask.shape) != 2:
                raise ValueError(
                    "padding_mask must be (batch, length); received shape "
                    f"{tuple(padding_mask.shape)}."
                )
            mask = ops.cast(padding_mask, "float32")
            # Count real tokens only, so left padding does not shift positions.
            positions = ops.cumsum(mask, axis=1) - 1.0
        phi_q, phi_k, v, log_decay = self._features(inputs, positions, mask)
        if self.causal:
            out, state = chunk_linear_attention(
                phi_q, phi_k, v, log_decay, chunk_size=self.chunk_size
            )
        else:
            state = ops.einsum("blhk,blhv->bhkv", phi_k, v)
            out = ops.einsum("blhk,bhkv->blhv", phi_q, state)
        return self._output(self._normalize(out), mask), state, mask

    def call(self, inputs, padding_mask=None, training=None):
        _check_float(inputs, "call")
        return self._sequence(inputs, padding_mask)[0]

    def compute_output_shape(self, input_shape):
        _check_rank(input_shape, 3, "call")
        return tuple(input_shape[:-1]) + (self.output_dim or input_shape[-1],)

    def compute_output_spec(self, inputs, padding_mask=None, training=None):
        _check_float(inputs, "call")
        return keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype=self.compute_dtype)

    # ------------------------------------------------------------- generation

    def _prepare(self, inputs, rank, method):
        if not self.causal:
            raise ValueError(f"{method}() needs a causal layer (causal=True).")
        _check_rank(inputs.shape, rank, method)
        _check_float(inputs, method)
        if not self.built:
            self.build((None, None, inputs.shape[-1]))
        check_width("LinearAttention", inputs, self._width())
        # These methods bypass __call__, which would otherwise do this cast.
        return ops.cast(inputs, self.compute_dtype)

    def _width(self):
        return getattr(self, "_d_model", None)

    def _state_shape(self):
        width = self.value_dim + (self.normalization == "denominator")
        return (self.num_heads, self._build_feature_maps(), width)

    def init_cache(self, batch_size, max_length=None):
        """An empty generation cache (the state before the first token).

        Args:
            batch_size: number of sequences.
            max_length: ignored: the state has a fixed size whatever the
                length; accepted so that every mixer has one cache protocol.

        Returns:
            A dict with
            - `"state"`: float32 `(batch, num_heads, feature_dim, width)`,
              the running `sum_t a.. phi(k_t) v_t^T`, where `width` is
              `value_dim + 1` with the denominator normalisation (the last
              column is `z = sum_t a.. phi(k_t)`) and `value_dim` otherwise;
            - `"position"`: int32 `(batch,)`, the number of tokens seen (the
              next token's rotary position).
        """
        return {
            "state": ops.zeros((batch_size,) + self._state_shape(), "float32"),
            "position": ops.zeros((batch_size,), "int32"),
        }

    def prefill(self, inputs, padding_mask=None, max_length=None):
        """Runs a prompt in the chunked form and returns the cache after it.

        Args:
            inputs: `(batch, length, d_model)`.
            padding_mask: optional `(batch, length)`, 1 for real tokens.
                Prompts of different lengths may be padded on either side:
                padding never enters the state, and the cache's position
                counts real tokens only, so `step` continues each prompt
                right after its last real token.
            max_length: ignored (see `init_cache`).

        Returns:
            `(outputs, cache)`: the outputs of `call(inputs, padding_mask)`
            and the cache (see `init_cache`) to continue with `step`.
        """
        inputs = self._prepare(inputs, 3, "prefill")
        outputs, state, mask = self._sequence(inputs, padding_mask)
        batch, length = ops.shape(inputs)[0], inputs.shape[1]
        if mask is None:
            position = ops.full((batch,), length, "int32")
        else:
            position = ops.cast(ops.sum(mask, axis=1), "int32")
        return outputs, {"state": state, "position": position}

    def step(self, inputs, cache):
        """Advances generation by one token, in O(1) time and memory.

        Args:
            inputs: `(batch, d_model)`, the new token's input.
            cache: from `init_cache` or `prefill` (or a previous `step`).

        Returns:
            `(outputs (batch, output_dim), new_cache)`.
        """
        inputs = self._prepare(inputs, 2, "step")
        if tuple(cache["state"].shape[1:]) != self._state_shape():
            raise ValueError(
                f"cache['state'] must be (batch,) + {self._state_shape()}; received "
                f"{tuple(cache['state'].shape)}. Make it with init_cache() or prefill()."
            )
        position = ops.cast(cache["position"], "int32")
        phi_q, phi_k, v, log_decay = self._features(inputs[:, None], position[:, None], None)
        out, state = recurrent_linear_attention(
            phi_q[:, 0],
            phi_k[:, 0],
            v[:, 0],
            None if log_decay is None else log_decay[:, 0],
            cache["state"],
        )
        outputs = self._output(self._normalize(out)[:, None], None)[:, 0]
        return outputs, {"state": state, "position": position + 1}

    # ---------------------------------------------------------- weights

    @property
    def attention_weights(self):
        """The projection variables by name, in the convention of the class docstring."""
        if not self.built:
            raise ValueError("LinearAttention is not built: call it or build it first.")
        dense = {"query": self.query_dense, "key": self.key_dense,
                 "value": self.value_dense, "output": self.output_dense}
        weights = {name: layer.kernel for name, layer in dense.items()}
        if self.use_bias:
            weights.update({f"{name}_bias": layer.bias for name, layer in dense.items()})
        return weights

    # ---------------------------------------------------------------- config

    def get_config(self):
        config = super().get_config()
        feature_map = self.feature_map
        if not isinstance(feature_map, str):
            feature_map = keras.saving.serialize_keras_object(self.query_feature_map)
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self.key_dim,
                "num_key_value_heads": self.num_key_value_heads,
                "value_dim": self.value_dim,
                "output_dim": self.output_dim,
                "causal": self.causal,
                "feature_map": feature_map,
                "normalization": self.normalization,
                "epsilon": self.epsilon,
                "decay": self.decay,
                "rotary": self.rotary,
                "rotary_max_wavelength": self.rotary_max_wavelength,
                "use_bias": self.use_bias,
                "chunk_size": self.chunk_size,
                "max_sequence_length": self.max_sequence_length,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
                "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if "max_length" in config:  # the length limit's name in older configs
            config.setdefault("max_sequence_length", config.pop("max_length"))
        if isinstance(config.get("feature_map"), dict):
            config["feature_map"] = keras.saving.deserialize_keras_object(config["feature_map"])
        return cls(**config)


def _check_rank(shape, rank, method):
    if len(shape) != rank:
        expected = "(batch, length, d_model)" if rank == 3 else "(batch, d_model)"
        raise ValueError(
            f"LinearAttention.{method}() expects a {rank}-D input {expected}; "
            f"received shape {tuple(shape)}."
        )


def _check_float(inputs, method):
    dtype = keras.backend.standardize_dtype(inputs.dtype)
    if not keras.backend.is_float_dtype(dtype):
        raise TypeError(
            f"LinearAttention.{method}() expects floating-point inputs (embed token "
            f"ids first); received dtype {dtype}."
        )
