"""What `Mamba` and `Mamba2` share: argument checks, masking, projections, cache API.

Both are selective state space blocks with a chunked training form and an
O(1)-per-token recurrent form, and share one call API:

- `call(inputs, padding_mask=None)`: `(batch, length, d_model)` in and out,
  computed chunk by chunk (`keras_lopt.ops`);
- `init_cache(batch_size, max_length=None)`, `prefill(inputs,
  padding_mask=None, max_length=None)` and `step(inputs, cache)` for
  generation: the cache protocol of every mixer, where `max_length` (a
  capacity) is accepted and ignored. The cache is a dict
  `{"conv": (batch, d_conv - 1, conv_channels), "ssm": state}`, float32
  (`Mamba2(rotary=True)` adds `"position"`, int32 `(batch,)`).

Padded positions (`padding_mask == 0`) are invisible to the other positions:
their conv input is zeroed and their step size is set to 0, so the SSM state
passes through them unchanged. With left padding the real tokens' outputs equal
those of the unpadded sequence; with right padding they are unaffected, and
`prefill` returns the cache as it stood after the last real token. (A hole in
the middle of a row is skipped by the SSM but seen by the next `d_conv - 1`
positions' conv as a zero input.) Outputs at padded positions are zero.

Only `in_proj` and `out_proj` run in the layer's compute dtype; everything
between them (conv, step sizes, scan, norm) runs in float32, with the
small per-channel weights kept in float32 (`autocast=False`), so that
`mixed_bfloat16` trains without overflow in `exp(delta * A)`.

Weights are plain layer attributes with the names a distiller needs:
`in_proj_kernel`, `in_proj_bias`, `conv_kernel`, `conv_bias`, `x_proj_kernel`,
`dt_proj_kernel`, `dt_bias`, `A_log`, `D`, `norm_scale`, `out_proj_kernel`,
`out_proj_bias`; `in_proj_layout` (and `x_proj_layout` on `Mamba`) give the
column ranges of the fused projections.
"""


import math
import random

import keras
from keras import ops

from keras_lopt.layers._checks import check_length
from keras_lopt.layers._checks import check_mask
from keras_lopt.ops.causal_conv import chunk_causal_conv

_CONV_INITS = ("default", "identity")


def _inverse_softplus_dt_initializer(dt_min, dt_max, floor, seed):
    """The reference dt bias: softplus(bias) ~ logU[dt_min, dt_max], floored."""

    def init(shape, dtype=None):
        u = keras.random.uniform(shape, seed=seed, dtype="float32")
        dt = ops.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = ops.maximum(dt, floor)
        # Inverse of softplus: dt + log(1 - exp(-dt)), via expm1 for small dt.
        return ops.cast(dt + ops.log(-ops.expm1(-dt)), dtype or "float32")

    return init


def _torch_linear_initializer(seed):
    # PyTorch's nn.Linear default, U(+-1/sqrt(fan_in)), as in the reference.
    return keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform", seed=seed
    )


class SelectiveSSM(keras.layers.Layer):
    """Argument checks, masking, projections and the cache API shared by both blocks."""

    def __init__(self, d_model, d_state, d_conv, expand, dt_min, dt_max, dt_init_floor,
                 use_bias, conv_bias, conv_init, gate, chunk_size, max_sequence_length, seed,
                 **kwargs):
        super().__init__(**kwargs)
        for name, value in (("d_state", d_state), ("d_conv", d_conv),
                            ("chunk_size", chunk_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; received {value!r}.")
        if not expand > 0:
            raise ValueError(f"expand must be positive; received {expand!r}.")
        if not 0 < dt_min <= dt_max:
            raise ValueError(
                f"Need 0 < dt_min <= dt_max; received dt_min={dt_min}, dt_max={dt_max}."
            )
        if conv_init not in _CONV_INITS:
            raise ValueError(f"conv_init must be one of {_CONV_INITS}; received {conv_init!r}.")
        if max_sequence_length is not None and max_sequence_length < 1:
            raise ValueError(
                "max_sequence_length must be positive or None; received "
                f"{max_sequence_length!r}.")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.dt_min = dt_min
        self.dt_max = dt_max
        self.dt_init_floor = dt_init_floor
        self.use_bias = use_bias
        self._use_conv_bias = conv_bias
        self.conv_init = conv_init
        self.gate = gate
        self.chunk_size = chunk_size
        self.max_sequence_length = max_sequence_length
        self.seed = seed

    # -- construction ---------------------------------------------------------

    def _set_sizes(self, d_model):
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive integer; received {d_model!r}.")
        self.d_inner = int(self.expand * d_model)
        if self.d_inner < 1:
            raise ValueError(f"expand * d_model must be >= 1; received {self.expand} * {d_model}.")

    def _seed(self, offset):
        # Distinct but reproducible streams per weight when a seed is given.
        # Without one, draw a concrete seed from Python's `random` (seeded by
        # keras.utils.set_random_seed), as Keras' own initializers do: an
        # unseeded random op fails when the layer is built under jax.jit.
        if self.seed is None:
            return random.randint(0, 2**31 - 1)
        return self.seed + offset

    def _conv_initializers(self):
        if self.conv_init == "identity":
            # Only the newest tap is 1: the conv passes its input through.
            def kernel_init(shape, dtype=None):
                return ops.cast(ops.one_hot(ops.full((shape[1],), shape[0] - 1, "int32"),
                                            shape[0], axis=0), dtype or "float32")

            return kernel_init, "zeros"
        # PyTorch's Conv1d default (fan_in = width for a depthwise conv).
        bound = 1.0 / math.sqrt(self.d_conv)
        return (keras.initializers.RandomUniform(-bound, bound, seed=self._seed(1)),
                keras.initializers.RandomUniform(-bound, bound, seed=self._seed(7)))

    def routing_layouts(self):
        """Tensors that are no matrix (`keras_lopt.rules.routing`): the
        depthwise conv filters and the per-channel decay rates."""
        return {"conv_kernel": None, "A_log": None}

    def _add_conv_weights(self, channels):
        kernel_init, bias_init = self._conv_initializers()
        self.conv_kernel = self.add_weight(
            shape=(self.d_conv, channels), initializer=kernel_init, name="conv_kernel",
            autocast=False)
        self.conv_bias = None
        if self._use_conv_bias:
            self.conv_bias = self.add_weight(
                shape=(channels,), initializer=bias_init, name="conv_bias", autocast=False)

    def _add_projection(self, name, fan_in, fan_out, use_bias, offset, autocast=True):
        kernel = self.add_weight(
            shape=(fan_in, fan_out), initializer=_torch_linear_initializer(self._seed(offset)),
            name=f"{name}_kernel", autocast=autocast)
        bias = None
        if use_bias:
            bias = self.add_weight(shape=(fan_out,), initializer="zeros", name=f"{name}_bias",
                                   autocast=autocast)
        return kernel, bias

    def _add_dt_bias(self, size):
        self.dt_bias = self.add_weight(
            shape=(size,), name="dt_bias", autocast=False,
            initializer=_inverse_softplus_dt_initializer(
                self.dt_min, self.dt_max, self.dt_init_floor, self._seed(5)))

    def _build_input_dim(self, input_shape):
        dim = input_shape[-1] if input_shape else None
        if dim is None:
            raise ValueError(
                f"{self.__class__.__name__} needs a known last input dimension; "
                f"received input_shape={input_shape}.")
        if self.d_model is None:
            self.d_model = int(dim)
            self._set_sizes(self.d_model)
        elif dim != self.d_model:
            raise ValueError(
                f"{self.__class__.__name__} was created with d_model={self.d_model} but "
                f"received inputs with last dimension {dim}.")

    def get_build_config(self):
        # One shape only, even when `padding_mask` was passed at the first call.
        if self.built:
            return {"input_shape": (None, None, self.d_model)}
        return None

    def build_from_config(self, config):
        if config and "input_shape" in config:
            self.build(config["input_shape"])

    def _ensure_built(self):
        if self.built:
            return
        if self.d_model is None:
            raise ValueError(
                f"{self.__class__.__name__} is not built: call it on inputs or pass d_model "
                "before using init_cache/prefill/step.")
        self.build((None, None, self.d_model))

    # -- input checks ---------------------------------------------------------

    def _check_inputs(self, inputs, rank, what):
        inputs = ops.convert_to_tensor(inputs)
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if "float" not in dtype:
            raise TypeError(
                f"{self.__class__.__name__} expects floating-point inputs (embeddings); "
                f"received dtype {dtype}.")
        if len(inputs.shape) != rank:
            raise ValueError(
                f"{self.__class__.__name__}.{what} expects inputs of rank {rank} "
                f"{'(batch, length, d_model)' if rank == 3 else '(batch, d_model)'}; "
                f"received shape {tuple(inputs.shape)}.")
        if inputs.shape[-1] != self.d_model:
            raise ValueError(
                f"{self.__class__.__name__} has d_model={self.d_model} but received inputs "
                f"with last dimension {inputs.shape[-1]}.")
        if rank == 3:
            length = inputs.shape[1]
            if length is None:
                raise ValueError(
                    f"{self.__class__.__name__} needs a static sequence length (the chunk "
                    "loop is built at trace time).")
            check_length(self.__class__.__name__, inputs)
            if self.max_sequence_length is not None and length > self.max_sequence_length:
                raise ValueError(
                    f"Sequence length {length} exceeds "
                    f"max_sequence_length={self.max_sequence_length}.")
        return ops.cast(inputs, self.compute_dtype)

    def _check_mask(self, padding_mask, inputs):
        if padding_mask is None:
            return None
        padding_mask = ops.convert_to_tensor(padding_mask)
        check_mask(self.__class__.__name__, padding_mask, inputs)
        return ops.cast(padding_mask, "float32") > 0

    # -- shared pieces --------------------------------------------------------

    def _in_proj(self, u):
        y = ops.matmul(u, ops.cast(self.in_proj_kernel, u.dtype))
        if self.in_proj_bias is not None:
            y = y + ops.cast(self.in_proj_bias, u.dtype)
        return ops.cast(y, "float32")

    def _out_proj(self, y):
        y = ops.cast(y, self.compute_dtype)
        out = ops.matmul(y, ops.cast(self.out_proj_kernel, y.dtype))
        if self.out_proj_bias is not None:
            out = out + ops.cast(self.out_proj_bias, y.dtype)
        return out

    def _conv(self, x, cache=None):
        bias = None if self.conv_bias is None else ops.cast(self.conv_bias, "float32")
        y, new_cache = chunk_causal_conv(
            x, ops.cast(self.conv_kernel, "float32"), bias, cache)
        return ops.silu(y), new_cache

    def _masked_conv_cache(self, conv_in, mask):
        """The last `d_conv - 1` conv inputs up to each row's last real token.

        With right padding the conv's own cache would hold the padded zeros;
        the next generated token must instead see the prompt's last real
        inputs (zeros before the start, as in an unpadded prefill).
        """
        width = self.d_conv - 1
        batch, length, channels = ops.shape(conv_in)[0], conv_in.shape[1], conv_in.shape[2]
        if width == 0:
            return conv_in[:, :0]
        positions = ops.arange(length, dtype="int32")
        last = ops.max(ops.where(mask, positions[None, :], -1), axis=1)  # -1: no real token
        full = ops.concatenate([ops.zeros((batch, width, channels), conv_in.dtype), conv_in],
                               axis=1)
        index = last[:, None] + 1 + ops.arange(width, dtype="int32")[None, :]
        index = ops.broadcast_to(index[:, :, None], (batch, width, channels))
        return ops.take_along_axis(full, index, axis=1)

    def _finish(self, y, z, mask):
        out = self._out_proj(self._gate_and_norm(y, z))
        if mask is not None:
            out = ops.where(mask[..., None], out, ops.zeros_like(out))
        return out

    # -- public API -----------------------------------------------------------

    def call(self, inputs, padding_mask=None, training=None):
        inputs = self._check_inputs(inputs, 3, "call")
        mask = self._check_mask(padding_mask, inputs)
        outputs, _ = self._sequence(inputs, mask, want_cache=False)
        return outputs

    def init_cache(self, batch_size, max_length=None):
        """An empty (start-of-sequence) cache: all zeros, float32.

        Args:
            batch_size: rows of the cache.
            max_length: ignored (the cache has a fixed size); accepted so that
                models can treat every sequence mixer alike.

        Returns:
            `{"conv": (batch_size, d_conv - 1, conv_channels), "ssm": state}`.
        """
        self._ensure_built()
        return {
            "conv": ops.zeros((batch_size, self.d_conv - 1, self._conv_channels), "float32"),
            "ssm": ops.zeros((batch_size,) + self._state_shape, "float32"),
        }

    def prefill(self, inputs, padding_mask=None, max_length=None):
        """Runs a prompt in the chunked form and returns `(outputs, cache)`.

        Args:
            inputs: `(batch, length, d_model)` float.
            padding_mask: optional `(batch, length)`, 1 for real tokens; left
                or right padding (or holes) are all supported: the returned
                cache is the state after each row's last real token.
            max_length: ignored (see `init_cache`).

        Returns:
            `(outputs (batch, length, d_model), cache)`.
        """
        self._ensure_built()
        inputs = self._check_inputs(inputs, 3, "prefill")
        mask = self._check_mask(padding_mask, inputs)
        return self._sequence(inputs, mask, want_cache=True)

    def step(self, inputs, cache):
        """Advances the recurrence by one token in O(1) time and memory.

        Args:
            inputs: `(batch, d_model)` float, the new token.
            cache: from `init_cache`, `prefill` or a previous `step`.

        Returns:
            `(outputs (batch, d_model), new_cache)`.
        """
        self._ensure_built()
        inputs = self._check_inputs(inputs, 2, "step")
        want = {"conv": (self.d_conv - 1, self._conv_channels), "ssm": self._state_shape}
        for key, shape in want.items():
            if key not in cache or tuple(cache[key].shape[1:]) != shape:
                got = tuple(cache[key].shape) if key in cache else "missing"
                raise ValueError(
                    f"{self.__class__.__name__}.step: cache[{key!r}] must have shape "
                    f"(batch,) + {shape}; received {got}. Use init_cache or prefill.")
        return self._step(inputs, cache)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if "max_length" in config:  # the length limit's name in older configs
            config.setdefault("max_sequence_length", config.pop("max_length"))
        return super().from_config(config)

    def get_config(self):
        config = super().get_config()
        config.update(
            d_model=self.d_model,
            d_state=self.d_state,
            d_conv=self.d_conv,
            expand=self.expand,
            dt_min=self.dt_min,
            dt_max=self.dt_max,
            dt_init_floor=self.dt_init_floor,
            use_bias=self.use_bias,
            conv_bias=self._use_conv_bias,
            conv_init=self.conv_init,
            gate=self.gate,
            chunk_size=self.chunk_size,
            max_sequence_length=self.max_sequence_length,
            seed=self.seed,
        )
        return config
