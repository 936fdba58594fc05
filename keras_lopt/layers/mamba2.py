"""Mamba-2: state space duality (SSD) with a gated RMSNorm (Dao & Gu, 2024).

Paper: "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality", https://arxiv.org/abs/2405.21060.
The call and cache API, masking and mixed-precision behaviour are those of
`SelectiveSSM` (see `keras_lopt.layers._selective_ssm`).
"""

import keras
from keras import ops

from keras_lopt.layers import rotary
from keras_lopt.layers._selective_ssm import SelectiveSSM
from keras_lopt.layers.feature_maps import get_feature_map
from keras_lopt.ops.causal_conv import chunk_causal_conv
from keras_lopt.ops.linear_attention import chunk_linear_attention
from keras_lopt.ops.linear_attention import recurrent_linear_attention

_CONV_ACTIVATIONS = ("silu", None)


@keras.saving.register_keras_serializable(package="keras_lopt")
class Mamba2(SelectiveSSM):
    """Mamba-2 block: state space duality (SSD) with a gated RMSNorm (Dao & Gu, 2024).

    `z, x, B, C, dt = in_proj(u)`; `[x, B, C] = silu(conv([x, B, C]))`;
    `dt = softplus(dt + dt_bias)` per head; with `H = d_inner / head_dim`
    heads and `A = -exp(A_log)` one scalar per head, each head runs
    `S_t = exp(dt_t A) S_{t-1} + B_t (dt_t x_t)^T`, `y_t = C_t^T S_t + D x_t`
    (`B`, `C` shared by the heads of a group); output
    `out_proj(rmsnorm(y * silu(z)) * norm_scale)`, the norm over all of
    `d_inner` (or per head, `norm_per_head=True`) with eps `norm_epsilon`
    (1e-5). Training runs `keras_lopt.ops.linear_attention.chunk_linear_attention`:
    SSD is decayed linear attention with `q = C`, `k = B`, `v = dt * x`,
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
        max_sequence_length: optional maximum sequence length accepted by
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

    def __init__(self, d_model=None, d_state=64, d_conv=4, expand=2, head_dim=64, num_groups=1,
                 dt_min=1e-3, dt_max=1e-1, dt_init_floor=1e-4, use_bias=False, conv_bias=True,
                 conv_init="default", gate=True, chunk_size=64, max_sequence_length=None,
                 seed=None,
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
                         use_bias, conv_bias, conv_init, gate, chunk_size, max_sequence_length,
                         seed, **kwargs)
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
        y, new_cache = chunk_causal_conv(
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
        y, state = chunk_linear_attention(
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
        y, state = recurrent_linear_attention(
            c, b, dt[..., None] * x, dt * -ops.exp(self.A_log), cache["ssm"])
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
