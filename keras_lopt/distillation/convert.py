"""Model surgery for two-stage Transformer -> Mamba distillation.

Stage 1 (`to_linear_attention`) swaps every softmax attention of a
`TransformerLM` for `LinearAttention` with the same Q/K/V/O projections
(copied with `keras_lopt.distillation.weights.copy_attention_weights`) and
a fresh (identity-initialised) feature map; everything else is copied. The
result is not equal to the Transformer (softmax is replaced), it is the
starting point of attention transfer.

Stage 2 (`to_mamba2`) turns a `LinearAttentionLM` with the output-norm
variant (`normalization="norm"`) into a `Mamba2LM` that reproduces it
*exactly* at initialisation (up to float32 round-off), in `call`, `prefill`
and `step`, with or without padding: per layer, with `H` heads,

- `num_groups = H`, `head_dim = value_dim`, `bc_dim = key_dim` and
  `d_state` = the feature-map width;
- `in_proj`: `x <- V`, `B <- K` (key/value heads repeated to `H`, as
  `LinearAttention` does for grouped-query attention), `C <- Q`; the `z`
  and `dt` columns are zero;
- `out_proj <- O`, `norm_scale <- norm_scale`, the norm per head
  (`norm_per_head=True`, same epsilon);
- `bc_feature_map` = the same feature map, with `B`'s copied from the key
  map and `C`'s from the query map; rotary on `B`/`C` when the source has it;
- `conv_init="identity"` and `conv_activation=None` (the conv passes the
  projections through), `D = 0`;
- no gate (`gate=False`), or with `gate=True` a trainable gate that starts
  neutral: zero `z` columns and a `z` bias `c` with `silu(c) = 1` (this
  needs `in_proj` biases, so the student gets `use_bias=True`; the biases
  the source lacks are zero);
- `dt_bias = log(e - 1)` so that `dt = softplus(0 + dt_bias) = 1`, and
  `A_log = -30` (decay `exp(-e^-30) = 1` to float32 precision) or, for a
  source with `decay=True`, `A_log = log(softplus(-decay_logit))` so that
  `exp(dt * A) = sigmoid(decay_logit)`, the source's decay.

Stage-2 training then releases what Mamba adds: the conv kernels (identity
at the start) and, with `gate=True`, the gate train with everything else.
"""

import math

import keras
import numpy as np

from keras_lopt.distillation import hub
from keras_lopt.distillation.weights import assign as _assign
from keras_lopt.distillation.weights import copy_attention_weights
from keras_lopt.distillation.weights import copy_layer as _copy_layer
from keras_lopt.distillation.weights import to_numpy as _numpy
from keras_lopt.layers.attention import CausalSelfAttention
from keras_lopt.layers.linear_attention import LinearAttention
from keras_lopt.models.causal_lm import CausalLM
from keras_lopt.models.causal_lm import LinearAttentionLM
from keras_lopt.models.causal_lm import Mamba2LM

# exp(-30) ~ 1e-13: the per-token decay exp(-exp(-30)) rounds to 1 in float32,
# while A_log stays finite (a trainable weight; -inf would give NaN gradients).
NO_DECAY_A_LOG = -30.0
# softplus(log(e - 1)) = 1: with zero dt columns every step size is 1.
UNIT_DT_BIAS = math.log(math.e - 1.0)
# silu(c) = c * sigmoid(c) = 1: with zero z columns and this z bias the gate
# multiplies by exactly 1 while staying trainable.
UNIT_GATE_BIAS = 1.278464542761074


# ----------------------------------------------------------------- helpers


def _check_lm(model, mixer, function):
    if not isinstance(model, CausalLM):
        raise TypeError(
            f"{function} expects a keras_lopt.models.CausalLM; received an object of type "
            f"{type(model).__name__}.")
    if model.mixer != mixer:
        raise ValueError(
            f"{function} needs a CausalLM whose mixer is {mixer!r}; this model's mixer is "
            f"{model.mixer!r}.")
    if not model.built:
        model.build()


def _lm_kwargs(model):
    return dict(
        vocab_size=model.vocab_size,
        num_layers=model.num_layers,
        hidden_dim=model.hidden_dim,
        # Passed explicitly: Mamba2LM would otherwise drop the MLPs.
        intermediate_dim=model.intermediate_dim,
        norm_epsilon=model.norm_epsilon,
        tie_embeddings=model.tie_embeddings,
        norm=model.norm,
        mlp_activation=model.mlp_activation,
        gated_mlp=model.gated_mlp,
        mlp_bias=model.mlp_bias,
        max_positions=model.max_positions,
    )


def _copy_everything_but_the_mixers(source, target):
    _copy_layer(source.token_embedding, target.token_embedding)
    if source.position_embedding is not None:
        _copy_layer(source.position_embedding, target.position_embedding)
    _copy_layer(source.final_norm, target.final_norm)
    if source.lm_head is not None:
        _copy_layer(source.lm_head, target.lm_head)
    for src, dst in zip(source.blocks, target.blocks):
        _copy_layer(src.mixer_norm, dst.mixer_norm)
        if src.intermediate_dim:
            for name in ("mlp_norm", "mlp_in", "mlp_out"):
                _copy_layer(getattr(src, name), getattr(dst, name))
            if src.mlp_gate is not None:
                _copy_layer(src.mlp_gate, dst.mlp_gate)


def _feature_map_config(feature_map):
    # A layer instance would be shared by every block; its config gives each
    # block (and each saved model) a fresh copy.
    if isinstance(feature_map, keras.layers.Layer):
        return keras.saving.serialize_keras_object(feature_map)
    return feature_map


# ------------------------------------------------------ stage 1: attention


def linear_attention_config(attention, feature_map="hedgehog", normalization="norm",
                            chunk_size=64, decay=False):
    """`LinearAttention` arguments matching a `CausalSelfAttention` layer.

    Args:
        attention: a `keras_lopt.layers.CausalSelfAttention`.
        feature_map, normalization, chunk_size, decay: as in `LinearAttention`.

    Returns:
        A dict of `LinearAttention` constructor arguments (causal, same
        heads, key/value heads, head size, rotary setting and biases).
    """
    if not isinstance(attention, CausalSelfAttention):
        raise TypeError(
            "Expected a CausalSelfAttention layer; received "
            f"{type(attention).__name__}.")
    return dict(
        num_heads=attention.num_heads,
        key_dim=attention.key_dim,
        num_key_value_heads=attention.num_key_value_heads,
        value_dim=attention.key_dim,
        causal=True,
        feature_map=_feature_map_config(feature_map),
        normalization=normalization,
        rotary=attention.rotary,
        rotary_max_wavelength=attention.rotary_max_wavelength,
        use_bias=attention.use_bias,
        chunk_size=chunk_size,
        decay=bool(decay),
    )


def _rebuild(model, lm_class, mixer_config, copy_mixer):
    """A new `lm_class` model with `model`'s non-mixer weights and converted mixers."""
    target = lm_class(mixer_config=mixer_config, **_lm_kwargs(model))
    target.build()
    _copy_everything_but_the_mixers(model, target)
    for src, dst in zip(model.blocks, target.blocks):
        copy_mixer(src.mixer, dst.mixer)
    return target


def to_linear_attention(model, feature_map="hedgehog", normalization="norm", chunk_size=64,
                        decay=False):
    """Stage 1 surgery: a Transformer LM with softmax attention -> linear attention.

    Every weight is copied: the embedding, norms, MLPs, final norm (and an
    untied head), and each attention's Q/K/V/O projections (and biases).
    Each `CausalSelfAttention` becomes a causal `LinearAttention` with the
    same heads, key/value heads, head size and rotary setting, a fresh
    feature map (identity-initialised for `"hedgehog"`) and the chosen
    normalisation. Softmax attention's `1/sqrt(key_dim)` logit scale has no
    counterpart and is not folded into the queries: the weights are copied
    unchanged, and attention transfer trains the feature maps to match.

    Args:
        model: a `CausalLM` with `mixer="attention"` (e.g. `TransformerLM`),
            built if it is not, or a keras-hub GPT-2 / Llama model (through
            `from_keras_hub`).
        feature_map: `LinearAttention` feature map: `"hedgehog"`, `"elu"`,
            `"relu"`, `"identity"` or a layer (each block gets a fresh copy
            from its config).
        normalization: `"norm"` (needed by `to_mamba2`), `"denominator"` or
            `None`.
        chunk_size: `LinearAttention`'s chunk size.
        decay: give every layer a learned per-head decay (a recency bias that
            attention transfer can tune; `to_mamba2` maps it to Mamba-2's
            `A`).

    Returns:
        A built `LinearAttentionLM`.

    Raises:
        TypeError: `model` is not a `CausalLM`.
        ValueError: its mixer is not softmax attention.

    Example:

    >>> teacher = TransformerLM(256, 2, 64, mixer_config={"num_heads": 4, "key_dim": 16})
    >>> student = to_linear_attention(teacher, feature_map="hedgehog")
    >>> student(token_ids).shape    # same as teacher(token_ids)
    """
    if hub.is_keras_hub_model(model):
        model = hub.from_keras_hub(model)
    _check_lm(model, "attention", "to_linear_attention")
    config = linear_attention_config(model.blocks[0].mixer, feature_map, normalization,
                                     chunk_size, decay)
    return _rebuild(model, LinearAttentionLM, config, copy_attention_weights)


# --------------------------------------------------- stage 2: linear -> SSM


def _check_convertible(layer):
    if not isinstance(layer, LinearAttention):
        raise TypeError(f"Expected a LinearAttention layer; received {type(layer).__name__}.")
    problems = []
    if layer.normalization != "norm":
        problems.append(
            f"normalization={layer.normalization!r} (Mamba2 always applies an RMS output "
            "norm and has no denominator; only normalization='norm' maps exactly)")
    if not layer.causal:
        problems.append("causal=False (Mamba2 is a causal recurrence)")
    if layer.output_dim is not None and layer.output_dim != layer.query_dense.kernel.shape[0]:
        problems.append(
            f"output_dim={layer.output_dim} != the input width "
            f"{layer.query_dense.kernel.shape[0]} (Mamba2 maps d_model to d_model)")
    if problems:
        raise ValueError(
            "Cannot convert this LinearAttention layer to Mamba2 exactly: "
            + "; ".join(problems) + ".")


def _expand(inner, d_model):
    # Mamba2 computes d_inner = int(expand * d_model): nudge the ratio by half
    # a unit so float round-off cannot truncate it to inner - 1.
    expand = inner / d_model
    return expand if int(expand * d_model) == inner else (inner + 0.5) / d_model


def mamba2_config(linear_attention, d_conv=4, chunk_size=None, gate=False):
    """`Mamba2` arguments that reproduce a `LinearAttention(normalization="norm")` layer.

    Args:
        linear_attention: a built, causal `LinearAttention` with
            `normalization="norm"`.
        d_conv: the (identity-initialised) conv width, for later training.
        chunk_size: Mamba2's chunk size; defaults to the source's.
        gate: add Mamba's output gate, initialised neutral (needs biases).

    Returns:
        A dict of `Mamba2` constructor arguments (without `d_model`).
    """
    la = linear_attention
    _check_convertible(la)
    d_model = la.query_dense.kernel.shape[0]
    heads = la.num_heads
    return dict(
        d_state=int(la._build_feature_maps()),
        d_conv=d_conv,
        expand=_expand(heads * la.value_dim, d_model),
        head_dim=la.value_dim,
        num_groups=heads,
        use_bias=la.use_bias or bool(gate),
        conv_bias=True,
        conv_init="identity",
        gate=bool(gate),
        chunk_size=chunk_size or la.chunk_size,
        max_sequence_length=la.max_sequence_length,
        conv_activation=None,
        bc_feature_map=la.get_config()["feature_map"],
        bc_dim=la.key_dim,
        rotary=la.rotary,
        rotary_max_wavelength=la.rotary_max_wavelength,
        norm_per_head=True,
        norm_epsilon=la.epsilon,
    )


def copy_linear_attention_to_mamba2(linear_attention, mamba2):
    """Sets a built `Mamba2` (from `mamba2_config`) to reproduce a `LinearAttention`.

    See the module docstring for the mapping.
    """
    la, m = linear_attention, mamba2
    _check_convertible(la)
    heads, kv_heads = la.num_heads, la.num_key_value_heads
    repeat = heads // kv_heads
    if (m.num_heads, m.num_groups, m.head_dim, m.bc_dim) != (
            heads, heads, la.value_dim, la.key_dim):
        raise ValueError(
            "Mamba2 sizes (num_heads, num_groups, head_dim, bc_dim) = "
            f"{(m.num_heads, m.num_groups, m.head_dim, m.bc_dim)} do not match the linear "
            f"attention's {(heads, heads, la.value_dim, la.key_dim)}; build it from "
            "mamba2_config().")

    def heads_first(kernel, kv):
        # (d, heads, dim) -> (d, heads * dim), key/value heads repeated to H.
        kernel = _numpy(kernel)
        if kv and repeat > 1:
            kernel = np.repeat(kernel, repeat, axis=-2)
        return kernel.reshape(kernel.shape[:-2] + (-1,))

    layout = m.in_proj_layout
    d_model = m.d_model
    kernel = np.zeros((d_model, layout["dt"][1]), "float32")
    bias = np.zeros((layout["dt"][1],), "float32")
    for name, dense, kv in (("x", la.value_dense, True), ("B", la.key_dense, True),
                            ("C", la.query_dense, False)):
        lo, hi = layout[name]
        kernel[:, lo:hi] = heads_first(dense.kernel, kv)
        if la.use_bias:
            bias[lo:hi] = heads_first(dense.bias, kv)
    if m.gate:
        if not m.use_bias:
            raise ValueError("A gated Mamba2 needs use_bias=True to start with a neutral gate; "
                             "build it from mamba2_config(..., gate=True).")
        bias[layout["z"][0]:layout["z"][1]] = UNIT_GATE_BIAS
    _assign(m.in_proj_kernel, kernel, "in_proj kernel")
    _assign(m.out_proj_kernel, _numpy(la.output_dense.kernel).reshape(-1, d_model),
            "out_proj kernel")
    if m.use_bias:
        _assign(m.in_proj_bias, bias, "in_proj bias")
        out_bias = la.output_dense.bias if la.use_bias else np.zeros((d_model,))
        _assign(m.out_proj_bias, out_bias, "out_proj bias")
    # The identity conv, even if `m` was trained or made with another conv_init.
    conv = np.zeros(tuple(m.conv_kernel.shape), "float32")
    conv[-1] = 1.0
    _assign(m.conv_kernel, conv, "conv kernel")
    if m.conv_bias is not None:
        _assign(m.conv_bias, np.zeros(tuple(m.conv_bias.shape)), "conv bias")
    _assign(m.dt_bias, np.full((heads,), UNIT_DT_BIAS), "dt_bias")
    if la.decay:
        # exp(dt * A) with dt = 1 and A = -softplus(-logit) = log sigmoid(logit).
        logit = _numpy(la.decay_logit).astype("float64")
        a_log = np.log(np.logaddexp(0.0, -logit))
    else:
        a_log = np.full((heads,), NO_DECAY_A_LOG)
    _assign(m.A_log, a_log, "A_log")
    _assign(m.D, np.zeros((heads,)), "D")
    _assign(m.norm_scale, _numpy(la.norm_scale).reshape(-1), "norm_scale")
    if m.b_feature_map is m.c_feature_map:
        _copy_layer(la.key_feature_map, m.b_feature_map)
    else:
        _copy_layer(la.key_feature_map, m.b_feature_map)
        _copy_layer(la.query_feature_map, m.c_feature_map)


def to_mamba2(model, d_conv=4, chunk_size=None, gate=False):
    """Stage 2 surgery: a linear-attention LM -> a Mamba-2 LM with the same outputs.

    The embedding, norms, MLPs (the source's `intermediate_dim` is kept) and
    head are copied; each `LinearAttention` becomes a `Mamba2` that computes
    the same function (see the module docstring): identity conv without
    activation, no gate, `dt = 1`, decay 1 (or the source's decay), `D = 0`,
    `x/B/C/out <- V/K/Q/O`, the same feature maps, rotary and per-head norm.

    Args:
        model: a `CausalLM` with `mixer="linear_attention"` whose layers are
            causal and use `normalization="norm"`; built if it is not.
        d_conv: width of the (identity-initialised) convs, which later
            training can use.
        chunk_size: Mamba2's chunk size; defaults to the source's.
        gate: give every block Mamba's output gate, initialised to multiply
            by exactly 1 (the result still equals the source).

    Returns:
        A built `Mamba2LM` whose logits equal the source's (float32
        round-off) in `call`, `prefill` and `step`, with or without a padding
        mask.

    Raises:
        TypeError: `model` is not a `CausalLM`.
        ValueError: its mixer is not linear attention, or a layer has
            `normalization` other than `"norm"`, or is not causal.

    Example:

    >>> student = to_linear_attention(teacher)       # stage 1, then train it
    >>> ssm = to_mamba2(student)                     # stage 2 starting point
    >>> np.allclose(ssm(token_ids), student(token_ids), atol=1e-4)
    True
    """
    _check_lm(model, "linear_attention", "to_mamba2")
    for block in model.blocks:
        _check_convertible(block.mixer)
    config = mamba2_config(model.blocks[0].mixer, d_conv, chunk_size, gate)
    return _rebuild(model, Mamba2LM, config, copy_linear_attention_to_mamba2)
