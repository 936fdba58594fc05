"""Mamba-1 (selective SSM) and Mamba-2 (SSD) blocks with a chunked training
form and an O(1)-per-token recurrent form.

Both layers share one call API:

- `call(inputs, padding_mask=None)`: `(batch, length, d_model)` in and out,
  computed chunk by chunk (`keras_lopt.layers.scan`);
- `init_cache(batch_size)`, `prefill(inputs, padding_mask=None)` and
  `step(inputs, cache)` for generation. The cache is a dict
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

from keras_lopt.layers import rotary
from keras_lopt.layers import scan
from keras_lopt.layers.feature_maps import get_feature_map

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


class _SelectiveSSMBase(keras.layers.Layer):
    """Argument checks, masking, projections and the cache API shared by both blocks."""

    def __init__(self, d_model, d_state, d_conv, expand, dt_min, dt_max, dt_init_floor,
                 use_bias, conv_bias, conv_init, gate, chunk_size, max_length, seed,
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
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be positive or None; received {max_length!r}.")
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
        self.max_length = max_length
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
            if self.max_length is not None and length > self.max_length:
                raise ValueError(
                    f"Sequence length {length} exceeds max_length={self.max_length}.")
        return ops.cast(inputs, self.compute_dtype)

    def _check_mask(self, padding_mask, inputs):
        if padding_mask is None:
            return None
        padding_mask = ops.convert_to_tensor(padding_mask)
        if len(padding_mask.shape) != 2 or padding_mask.shape[1] != inputs.shape[1]:
            raise ValueError(
                f"padding_mask must have shape (batch, length) = (batch, {inputs.shape[1]}); "
                f"received {tuple(padding_mask.shape)}.")
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
        y, new_cache = scan.causal_depthwise_conv(
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
            max_length=self.max_length,
            seed=self.seed,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_lopt")
class Mamba(_SelectiveSSMBase):
    """Mamba-1 block: gated selective state space model (Gu & Dao, 2023).

    `x, z = in_proj(u)`; `x = silu(conv(x))` (causal depthwise conv);
    `delta, B, C = x_proj(x)`; `Delta = softplus(dt_proj(delta) + dt_bias)`;
    per channel `h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t x_t`,
    `y_t = C_t . h_t + D x_t` with `A = -exp(A_log)`; output
    `out_proj(y * silu(z))`. Training runs `chunked_selective_scan`;
    generation advances the state one token at a time.

    Reference initialisation: `A_log[d, n] = log(n + 1)`, `D = 1`,
    `softplus(dt_bias) ~ logU[dt_min, dt_max]` floored at `dt_init_floor`,
    `dt_proj_kernel ~ U(+-dt_rank**-0.5)`, projections and conv as PyTorch's
    `nn.Linear`/`nn.Conv1d` defaults.

    Options for initialising from another model (e.g. a linear-attention
    teacher): `conv_init="identity"` makes the conv pass its input through
    (newest tap 1, other taps and bias 0; the SiLU after it remains), and
    `gate=False` replaces `silu(z)` by 1 (the `z` half of `in_proj` is kept,
    so weights are interchangeable between `gate=True` and `gate=False`;
    re-enable by setting `layer.gate = True` before (re)compiling, or by
    rebuilding from the config with `gate=True` and copying the weights).

    Args:
        d_model: model width; inferred from the input when None.
        d_state: SSM state size `N` per channel.
        d_conv: causal conv width.
        expand: `d_inner = int(expand * d_model)`.
        dt_rank: rank of the step-size projection; `"auto"` is
            `ceil(d_model / 16)`.
        dt_min, dt_max, dt_init_floor: range of the initial step sizes.
        use_bias: bias on `in_proj` and `out_proj`.
        conv_bias: bias on the conv.
        conv_init: `"default"` or `"identity"`.
        gate: multiply by `silu(z)` before `out_proj`.
        chunk_size: positions per chunk of the training scan (memory holds
            `(batch, chunk_size, d_inner, d_state)` at a time).
        within_chunk: `"associative"` (a parallel scan inside each chunk, for
            GPUs/TPUs) or `"sequential"` (a step-by-step scan inside each
            chunk: 2-3x faster on a CPU, same numbers).
        max_length: optional maximum sequence length accepted by
            `call`/`prefill` (not tracked by `step`).
        seed: optional int for reproducible initialisation.
        **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Example:

    >>> layer = Mamba(d_state=16)
    >>> y = layer(keras.random.normal((2, 100, 64)))          # (2, 100, 64)
    >>> y, cache = layer.prefill(keras.random.normal((2, 10, 64)))
    >>> y_next, cache = layer.step(keras.random.normal((2, 64)), cache)
    """

    def __init__(self, d_model=None, d_state=16, d_conv=4, expand=2, dt_rank="auto",
                 dt_min=1e-3, dt_max=1e-1, dt_init_floor=1e-4, use_bias=False, conv_bias=True,
                 conv_init="default", gate=True, chunk_size=64, max_length=None, seed=None,
                 within_chunk="associative", **kwargs):
        if within_chunk not in ("associative", "sequential"):
            raise ValueError(
                f'within_chunk must be "associative" or "sequential"; received {within_chunk!r}.'
            )
        self.within_chunk = within_chunk
        if not (dt_rank == "auto" or (isinstance(dt_rank, int) and dt_rank >= 1)):
            raise ValueError(f'dt_rank must be "auto" or a positive integer; received {dt_rank!r}.')
        super().__init__(d_model, d_state, d_conv, expand, dt_min, dt_max, dt_init_floor,
                         use_bias, conv_bias, conv_init, gate, chunk_size, max_length, seed,
                         **kwargs)
        self.dt_rank_arg = dt_rank
        if d_model is not None:
            self._set_sizes(d_model)

    def _set_sizes(self, d_model):
        super()._set_sizes(d_model)
        self.dt_rank = (math.ceil(d_model / 16) if self.dt_rank_arg == "auto"
                        else self.dt_rank_arg)
        self._conv_channels = self.d_inner
        self._state_shape = (self.d_inner, self.d_state)

    @property
    def in_proj_layout(self):
        """Column ranges of `in_proj_kernel`: `{"x": (0, d_inner), "z": (d_inner, 2 d_inner)}`."""
        return {"x": (0, self.d_inner), "z": (self.d_inner, 2 * self.d_inner)}

    @property
    def x_proj_layout(self):
        """Column ranges of `x_proj_kernel`: `delta`, `B`, `C`."""
        r, n = self.dt_rank, self.d_state
        return {"delta": (0, r), "B": (r, r + n), "C": (r + n, r + 2 * n)}

    def build(self, input_shape):
        self._build_input_dim(input_shape)
        d, di, n, r = self.d_model, self.d_inner, self.d_state, self.dt_rank
        self.in_proj_kernel, self.in_proj_bias = self._add_projection(
            "in_proj", d, 2 * di, self.use_bias, 0)
        self._add_conv_weights(di)
        self.x_proj_kernel, _ = self._add_projection(
            "x_proj", di, r + 2 * n, False, 2, autocast=False)
        std = r ** -0.5
        self.dt_proj_kernel = self.add_weight(
            shape=(r, di), name="dt_proj_kernel", autocast=False,
            initializer=keras.initializers.RandomUniform(-std, std, seed=self._seed(3)))
        self._add_dt_bias(di)

        def a_log_init(shape, dtype=None):
            a = ops.broadcast_to(ops.arange(1, shape[1] + 1, dtype="float32"), shape)
            return ops.cast(ops.log(a), dtype or "float32")

        self.A_log = self.add_weight(shape=(di, n), initializer=a_log_init, name="A_log",
                                     autocast=False)
        self.D = self.add_weight(shape=(di,), initializer="ones", name="D", autocast=False)
        self.out_proj_kernel, self.out_proj_bias = self._add_projection(
            "out_proj", di, d, self.use_bias, 4)
        self.built = True

    def _ssm_inputs(self, x):
        r, n = self.dt_rank, self.d_state
        dbc = ops.matmul(x, self.x_proj_kernel)
        delta = ops.matmul(dbc[..., :r], self.dt_proj_kernel) + self.dt_bias
        return ops.softplus(delta), dbc[..., r:r + n], dbc[..., r + n:]

    def _gate_and_norm(self, y, z):
        return y * ops.silu(z) if self.gate else y

    def _sequence(self, inputs, mask, want_cache):
        xz = self._in_proj(inputs)
        x, z = xz[..., :self.d_inner], xz[..., self.d_inner:]
        if mask is not None:
            x = ops.where(mask[..., None], x, 0.0)
        conv_in = x
        x, conv_cache = self._conv(x)
        delta, b, c = self._ssm_inputs(x)
        if mask is not None:
            delta = ops.where(mask[..., None], delta, 0.0)
        y, state = scan.chunked_selective_scan(
            x, delta, -ops.exp(self.A_log), b, c, chunk_size=self.chunk_size,
            within_chunk=self.within_chunk)
        outputs = self._finish(y + self.D * x, z, mask)
        if not want_cache:
            return outputs, None
        if mask is not None:
            conv_cache = self._masked_conv_cache(conv_in, mask)
        return outputs, {"conv": conv_cache, "ssm": state}

    def _step(self, inputs, cache):
        xz = self._in_proj(inputs)
        x, z = xz[..., :self.d_inner], xz[..., self.d_inner:]
        x, conv_cache = self._conv(x[:, None, :], ops.cast(cache["conv"], "float32"))
        x = x[:, 0]
        delta, b, c = self._ssm_inputs(x)
        y, state = scan.selective_scan_step(x, delta, -ops.exp(self.A_log), b, c, cache["ssm"])
        return self._finish(y + self.D * x, z, None), {"conv": conv_cache, "ssm": state}

    def get_config(self):
        config = super().get_config()
        config["dt_rank"] = self.dt_rank_arg
        config["within_chunk"] = self.within_chunk
        return config


_CONV_ACTIVATIONS = ("silu", None)


@keras.saving.register_keras_serializable(package="keras_lopt")
class Mamba2(_SelectiveSSMBase):
    """Mamba-2 block: state space duality (SSD) with a gated RMSNorm (Dao & Gu, 2024).

    `z, x, B, C, dt = in_proj(u)`; `[x, B, C] = silu(conv([x, B, C]))`;
    `dt = softplus(dt + dt_bias)` per head; with `H = d_inner / head_dim`
    heads and `A = -exp(A_log)` one scalar per head, each head runs
    `S_t = exp(dt_t A) S_{t-1} + B_t (dt_t x_t)^T`, `y_t = C_t^T S_t + D x_t`
    (`B`, `C` shared by the heads of a group); output
    `out_proj(rmsnorm(y * silu(z)) * norm_scale)`, the norm over all of
    `d_inner` (or per head, `norm_per_head=True`) with eps `norm_epsilon`
    (1e-5). Training runs `chunked_decay_attention`: SSD is
    decayed linear attention with `q = C`, `k = B`, `v = dt * x`,
    `log_decay = dt * A`.

    Reference initialisation: `A ~ U[1, 16]` (`A_log = log A`), `D = 1`,
    `softplus(dt_bias) ~ logU[dt_min, dt_max]` floored at `dt_init_floor`,
    `norm_scale = 1`, projections and conv as PyTorch's defaults.

    Options for initialising from a linear-attention model: set the `C`, `B`,
    `x` column blocks of `in_proj_kernel` (see `in_proj_layout`) from `Q`,
    `K`, `V` and `out_proj_kernel` from `O`; make the decay ~1 with a very
    negative `A_log`; `dt_bias = log(e - 1)` with zero `dt` columns gives
    `dt = 1`. `conv_init="identity"` makes the conv pass its input through
    (newest tap 1, other taps and bias 0; the SiLU after it remains unless
    `conv_activation=None`), and `gate=False` replaces
    `silu(z)` by 1, leaving `rmsnorm(y) * norm_scale` (the `z` columns stay
    in `in_proj`, so weights are interchangeable between `gate=True` and
    `gate=False`).

    The remaining options make a Mamba-2 layer able to reproduce a
    `LinearAttention(normalization="norm")` layer *exactly* (see
    `keras_lopt.distillation.to_mamba2`); all default to the reference
    block:

    - `conv_activation=None` drops the SiLU after the conv (with an identity
      conv, `x`, `B`, `C` are then the raw projections);
    - `bc_feature_map` applies a linear-attention feature map `phi` (separate
      instances for `B` and `C` when given by name) to each group's `B` and
      `C` after the conv (and rotary): the `in_proj` columns per group are
      then `bc_dim` wide and `phi` must map them to `d_state` features;
    - `rotary=True` rotates each group's `B` and `C` (half-split RoPE, as
      `LinearAttention`) before the feature map, with positions counting real
      tokens only; the cache then carries `"position"` (int32 `(batch,)`);
    - `norm_per_head=True` takes the RMS norm per head over `head_dim`
      (`LinearAttention`'s output norm) instead of over all of `d_inner`;
      `norm_scale` keeps its `(d_inner,)` shape, head-major.

    Args:
        d_model: model width; inferred from the input when None.
        d_state: state size `N` per head (the key dimension after the
            feature map).
        d_conv: causal conv width.
        expand: `d_inner = int(expand * d_model)`.
        head_dim: channels per head (the value dimension); must divide
            `d_inner`.
        num_groups: groups of heads sharing `B` and `C`; must divide the
            number of heads.
        dt_min, dt_max, dt_init_floor: range of the initial step sizes.
        use_bias: bias on `in_proj` and `out_proj`.
        conv_bias: bias on the conv.
        conv_init: `"default"` or `"identity"`.
        gate: multiply by `silu(z)` before the norm.
        chunk_size: positions per chunk of the SSD algorithm.
        max_length: optional maximum sequence length accepted by
            `call`/`prefill` (not tracked by `step`).
        seed: optional int for reproducible initialisation.
        conv_activation: `"silu"` (reference) or `None` (no activation after
            the conv).
        bc_feature_map: `None` (reference: `B`, `C` used as they are), a
            feature-map name (`"identity"`, `"elu"`, `"relu"`, `"hedgehog"`:
            separate float32 layers `b_feature_map` and `c_feature_map`), or a
            `keras.layers.Layer` (or its serialized config) mapping
            `(batch, length, num_groups, bc_dim)` to `(..., d_state)`, then
            shared by `B` and `C`.
        bc_dim: width per group of the `B` and `C` projections (the feature
            map's input); defaults to `d_state`. Must equal `d_state` without
            a feature map.
        rotary: rotary position embedding on `B` and `C` (needs an even
            `bc_dim`).
        rotary_max_wavelength: the rotary base.
        norm_per_head: RMS norm per head instead of over all of `d_inner`.
        norm_epsilon: epsilon inside the RMS norm.
        **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Example:

    >>> layer = Mamba2(d_state=64, head_dim=32)
    >>> y = layer(keras.random.normal((2, 100, 64)))          # (2, 100, 64)
    >>> y, cache = layer.prefill(keras.random.normal((2, 10, 64)))
    >>> y_next, cache = layer.step(keras.random.normal((2, 64)), cache)

    A linear-attention-shaped block (Hedgehog map of 2 * 8 features on 8-wide
    B/C per head, rotary, per-head norm, no conv activation):

    >>> layer = Mamba2(d_state=16, bc_dim=8, head_dim=8, num_groups=8,
    ...                conv_activation=None, bc_feature_map="hedgehog",
    ...                rotary=True, norm_per_head=True)
    """

    norm_epsilon = 1e-5

    def __init__(self, d_model=None, d_state=64, d_conv=4, expand=2, head_dim=64, num_groups=1,
                 dt_min=1e-3, dt_max=1e-1, dt_init_floor=1e-4, use_bias=False, conv_bias=True,
                 conv_init="default", gate=True, chunk_size=64, max_length=None, seed=None,
                 conv_activation="silu", bc_feature_map=None, bc_dim=None, rotary=False,
                 rotary_max_wavelength=10000, norm_per_head=False, norm_epsilon=1e-5,
                 **kwargs):
        for name, value in (("head_dim", head_dim), ("num_groups", num_groups)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; received {value!r}.")
        if conv_activation not in _CONV_ACTIVATIONS:
            raise ValueError(
                f"conv_activation must be one of {_CONV_ACTIVATIONS}; received "
                f"{conv_activation!r}.")
        if bc_dim is not None and (not isinstance(bc_dim, int) or bc_dim < 1):
            raise ValueError(f"bc_dim must be a positive integer or None; received {bc_dim!r}.")
        if not norm_epsilon >= 0:
            raise ValueError(f"norm_epsilon must be >= 0; received {norm_epsilon!r}.")
        super().__init__(d_model, d_state, d_conv, expand, dt_min, dt_max, dt_init_floor,
                         use_bias, conv_bias, conv_init, gate, chunk_size, max_length, seed,
                         **kwargs)
        self.head_dim = head_dim
        self.num_groups = num_groups
        self.conv_activation = conv_activation
        self.bc_dim_arg = bc_dim
        self.bc_dim = d_state if bc_dim is None else bc_dim
        self.rotary = bool(rotary)
        self.rotary_max_wavelength = rotary_max_wavelength
        self.norm_per_head = bool(norm_per_head)
        self.norm_epsilon = float(norm_epsilon)
        if self.rotary and self.bc_dim % 2:
            raise ValueError(
                f"rotary=True needs an even bc_dim (B/C width per group); received {self.bc_dim}.")
        self.bc_feature_map = bc_feature_map
        self.b_feature_map = self.c_feature_map = None
        if bc_feature_map is None:
            if self.bc_dim != d_state:
                raise ValueError(
                    f"bc_dim={bc_dim} differs from d_state={d_state}: without a bc_feature_map "
                    "B and C enter the state as they are, so their width must be d_state.")
        elif isinstance(bc_feature_map, str):
            # Named maps run in float32 whatever the policy, as in LinearAttention.
            self.b_feature_map = get_feature_map(
                bc_feature_map, dtype="float32", name="b_feature_map")
            self.c_feature_map = get_feature_map(
                bc_feature_map, dtype="float32", name="c_feature_map")
            # Named maps know their width without building: fail at construction.
            self._check_feature_width(self.b_feature_map.compute_output_shape(
                (None, None, num_groups, self.bc_dim))[-1])
        else:
            self.b_feature_map = self.c_feature_map = get_feature_map(bc_feature_map)
        if d_model is not None:
            self._set_sizes(d_model)

    def _check_feature_width(self, width):
        if width != self.d_state:
            raise ValueError(
                f"bc_feature_map {self.bc_feature_map!r} maps bc_dim={self.bc_dim} to {width} "
                f"features but d_state={self.d_state}; the feature-map output is the state's "
                "key dimension, so they must be equal (e.g. Hedgehog gives 2 * bc_dim: set "
                "d_state=2*bc_dim).")

    def _set_sizes(self, d_model):
        super()._set_sizes(d_model)
        if self.d_inner % self.head_dim:
            raise ValueError(
                f"d_inner = expand * d_model = {self.d_inner} is not divisible by "
                f"head_dim={self.head_dim}.")
        self.num_heads = self.d_inner // self.head_dim
        if self.num_heads % self.num_groups:
            raise ValueError(
                f"The number of heads ({self.num_heads} = d_inner / head_dim) is not divisible "
                f"by num_groups={self.num_groups}.")
        self._conv_channels = self.d_inner + 2 * self.num_groups * self.bc_dim
        self._state_shape = (self.num_heads, self.d_state, self.head_dim)

    @property
    def in_proj_layout(self):
        """Column ranges of `in_proj_kernel`: `z`, `x`, `B`, `C`, `dt` in that order.

        `B` and `C` are `(num_groups, bc_dim)` flattened group-major (`bc_dim`
        is `d_state` without a feature map); the conv channels are the `x`,
        `B`, `C` columns in the same order.
        """
        di, gn = self.d_inner, self.num_groups * self.bc_dim
        edges = [0, di, 2 * di, 2 * di + gn, 2 * di + 2 * gn, 2 * di + 2 * gn + self.num_heads]
        return {k: (edges[i], edges[i + 1]) for i, k in enumerate(("z", "x", "B", "C", "dt"))}

    def build(self, input_shape):
        self._build_input_dim(input_shape)
        d, di, h = self.d_model, self.d_inner, self.num_heads
        width = 2 * di + 2 * self.num_groups * self.bc_dim + h
        self.in_proj_kernel, self.in_proj_bias = self._add_projection(
            "in_proj", d, width, self.use_bias, 0)
        self._add_conv_weights(self._conv_channels)
        self._add_dt_bias(h)
        seed = self._seed(6)

        def a_log_init(shape, dtype=None):
            a = keras.random.uniform(shape, 1.0, 16.0, seed=seed, dtype="float32")
            return ops.cast(ops.log(a), dtype or "float32")

        self.A_log = self.add_weight(shape=(h,), initializer=a_log_init, name="A_log",
                                     autocast=False)
        self.D = self.add_weight(shape=(h,), initializer="ones", name="D", autocast=False)
        self.norm_scale = self.add_weight(shape=(di,), initializer="ones", name="norm_scale",
                                          autocast=False)
        self.out_proj_kernel, self.out_proj_bias = self._add_projection(
            "out_proj", di, d, self.use_bias, 4)
        self._build_feature_maps()
        self.built = True

    def _build_feature_maps(self):
        if self.b_feature_map is None:
            return
        shape = (None, None, self.num_groups, self.bc_dim)
        for feature_map in (self.b_feature_map, self.c_feature_map):
            if not feature_map.built:
                feature_map.build(shape)
            spec = feature_map.compute_output_spec(
                keras.KerasTensor((1, 1) + shape[2:], dtype="float32"))
            self._check_feature_width(spec.shape[-1])

    def _conv(self, x, cache=None):
        bias = None if self.conv_bias is None else ops.cast(self.conv_bias, "float32")
        y, new_cache = scan.causal_depthwise_conv(
            x, ops.cast(self.conv_kernel, "float32"), bias, cache)
        return (ops.silu(y) if self.conv_activation == "silu" else y), new_cache

    def _split(self, proj):
        lay = self.in_proj_layout
        z = proj[..., lay["z"][0]:lay["z"][1]]
        xbc = proj[..., lay["x"][0]:lay["C"][1]]
        dt = proj[..., lay["dt"][0]:lay["dt"][1]]
        return z, xbc, dt

    def _heads(self, xbc, dt, positions=None):
        """Splits the conv output into per-head `x`, `B`, `C` and the step size.

        `xbc` is `(batch, length, channels)`; `positions` `(batch or 1,
        length)` are the rotary positions (only read with `rotary=True`).
        """
        di, gn, per_group = self.d_inner, self.num_groups * self.bc_dim, \
            self.num_heads // self.num_groups
        lead = (-1,) + tuple(xbc.shape[1:-1])
        x = ops.reshape(xbc[..., :di], lead + (self.num_heads, self.head_dim))
        b = ops.reshape(xbc[..., di:di + gn], lead + (self.num_groups, self.bc_dim))
        c = ops.reshape(xbc[..., di + gn:], lead + (self.num_groups, self.bc_dim))
        if self.rotary:
            b = rotary.apply_rotary(b, positions, self.rotary_max_wavelength)
            c = rotary.apply_rotary(c, positions, self.rotary_max_wavelength)
        if self.b_feature_map is not None:
            # Per group, before the repeat to heads: LinearAttention maps its
            # (already repeated) heads, which is the case num_groups = heads.
            b = ops.cast(self.b_feature_map(b), "float32")
            c = ops.cast(self.c_feature_map(c), "float32")
        if per_group > 1:
            b, c = ops.repeat(b, per_group, axis=-2), ops.repeat(c, per_group, axis=-2)
        dt = ops.softplus(dt + self.dt_bias)
        return x, b, c, dt

    def _gate_and_norm(self, y, z):
        if self.gate:
            y = y * ops.silu(z)
        if self.norm_per_head:
            lead = (-1,) + tuple(y.shape[1:-1])
            y = ops.reshape(y, lead + (self.num_heads, self.head_dim))
        y = y * ops.rsqrt(ops.mean(ops.square(y), axis=-1, keepdims=True) + self.norm_epsilon)
        if self.norm_per_head:
            y = ops.reshape(y, lead + (self.d_inner,))
        return y * self.norm_scale

    def init_cache(self, batch_size, max_length=None):
        """An empty (start-of-sequence) cache: all zeros.

        Args:
            batch_size: rows of the cache.
            max_length: ignored (the cache has a fixed size).

        Returns:
            `{"conv": (batch_size, d_conv - 1, conv_channels), "ssm": state}`
            (float32), plus `"position"` (int32 `(batch_size,)`, the rotary
            position of the next token) with `rotary=True`.
        """
        cache = super().init_cache(batch_size, max_length)
        if self.rotary:
            cache["position"] = ops.zeros((batch_size,), "int32")
        return cache

    def _sequence(self, inputs, mask, want_cache):
        length = inputs.shape[1]
        z, xbc, dt = self._split(self._in_proj(inputs))
        if mask is not None:
            xbc = ops.where(mask[..., None], xbc, 0.0)
        conv_in = xbc
        xbc, conv_cache = self._conv(xbc)
        positions = None
        if self.rotary:
            # Count real tokens only, so left padding does not shift positions
            # (the positions of padded tokens do not matter: their dt is 0).
            positions = (ops.arange(length, dtype="float32")[None, :] if mask is None
                         else ops.cumsum(ops.cast(mask, "float32"), axis=1) - 1.0)
        x, b, c, dt = self._heads(xbc, dt, positions)
        if mask is not None:
            dt = ops.where(mask[..., None], dt, 0.0)
        a = -ops.exp(self.A_log)
        y, state = scan.chunked_decay_attention(
            c, b, dt[..., None] * x, dt * a, chunk_size=self.chunk_size)
        y = y + self.D[:, None] * x
        y = ops.reshape(y, (-1, length, self.d_inner))
        outputs = self._finish(y, z, mask)
        if not want_cache:
            return outputs, None
        if mask is not None:
            conv_cache = self._masked_conv_cache(conv_in, mask)
        cache = {"conv": conv_cache, "ssm": state}
        if self.rotary:
            cache["position"] = (ops.full((ops.shape(inputs)[0],), length, "int32")
                                 if mask is None else ops.sum(ops.cast(mask, "int32"), axis=1))
        return outputs, cache

    def _step(self, inputs, cache):
        positions = None
        if self.rotary:
            if "position" not in cache:
                raise ValueError(
                    "Mamba2.step: rotary=True needs cache['position'] (the next token's "
                    "position); use init_cache or prefill.")
            position = ops.cast(cache["position"], "int32")
            positions = position[:, None]
        z, xbc, dt = self._split(self._in_proj(inputs))
        xbc, conv_cache = self._conv(xbc[:, None, :], ops.cast(cache["conv"], "float32"))
        # A length-1 time axis through _heads, so rotary and feature maps see
        # the same (batch, length, groups, dim) layout as in call.
        x, b, c, dt = self._heads(xbc, dt[:, None], positions)
        x, b, c, dt = x[:, 0], b[:, 0], c[:, 0], dt[:, 0]
        y, state = scan.decay_attention_step(
            c, b, dt[..., None] * x, cache["ssm"], dt * -ops.exp(self.A_log))
        y = ops.reshape(y + self.D[:, None] * x, (-1, self.d_inner))
        new_cache = {"conv": conv_cache, "ssm": state}
        if self.rotary:
            new_cache["position"] = position + 1
        return self._finish(y, z, None), new_cache

    def get_config(self):
        config = super().get_config()
        bc_feature_map = self.bc_feature_map
        if bc_feature_map is not None and not isinstance(bc_feature_map, str):
            bc_feature_map = keras.saving.serialize_keras_object(self.b_feature_map)
        config.update(
            head_dim=self.head_dim,
            num_groups=self.num_groups,
            conv_activation=self.conv_activation,
            bc_feature_map=bc_feature_map,
            bc_dim=self.bc_dim_arg,
            rotary=self.rotary,
            rotary_max_wavelength=self.rotary_max_wavelength,
            norm_per_head=self.norm_per_head,
            norm_epsilon=self.norm_epsilon,
        )
        return config
