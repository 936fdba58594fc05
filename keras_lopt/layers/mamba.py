"""Mamba-1: the gated selective state space block (Gu & Dao, 2023).

Paper: "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
https://arxiv.org/abs/2312.00752. The call and cache API, masking and
mixed-precision behaviour are those of `SelectiveSSM` (see
`keras_lopt.layers._selective_ssm`).
"""

import math

import keras
from keras import ops

from keras_lopt.layers._selective_ssm import SelectiveSSM
from keras_lopt.ops.selective_scan import chunk_selective_scan
from keras_lopt.ops.selective_scan import recurrent_selective_scan


@keras.saving.register_keras_serializable(package="keras_lopt")
class Mamba(SelectiveSSM):
    """Mamba-1 block: gated selective state space model (Gu & Dao, 2023).

    `x, z = in_proj(u)`; `x = silu(conv(x))` (causal depthwise conv);
    `delta, B, C = x_proj(x)`; `Delta = softplus(dt_proj(delta) + dt_bias)`;
    per channel `h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t x_t`,
    `y_t = C_t . h_t + D x_t` with `A = -exp(A_log)`; output
    `out_proj(y * silu(z))`. Training runs
    `keras_lopt.ops.selective_scan.chunk_selective_scan`; generation advances
    the state one token at a time.

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
        max_sequence_length: optional maximum sequence length accepted by
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
                 conv_init="default", gate=True, chunk_size=64, max_sequence_length=None,
                 seed=None,
                 within_chunk="associative", **kwargs):
        if within_chunk not in ("associative", "sequential"):
            raise ValueError(
                f'within_chunk must be "associative" or "sequential"; received {within_chunk!r}.'
            )
        self.within_chunk = within_chunk
        if not (dt_rank == "auto" or (isinstance(dt_rank, int) and dt_rank >= 1)):
            raise ValueError(f'dt_rank must be "auto" or a positive integer; received {dt_rank!r}.')
        super().__init__(d_model, d_state, d_conv, expand, dt_min, dt_max, dt_init_floor,
                         use_bias, conv_bias, conv_init, gate, chunk_size, max_sequence_length,
                         seed, **kwargs)
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
        y, state = chunk_selective_scan(
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
        y, state = recurrent_selective_scan(
            x, delta, -ops.exp(self.A_log), b, c, cache["ssm"])
        return self._finish(y + self.D * x, z, None), {"conv": conv_cache, "ssm": state}

    def get_config(self):
        config = super().get_config()
        config["dt_rank"] = self.dt_rank_arg
        config["within_chunk"] = self.within_chunk
        return config
