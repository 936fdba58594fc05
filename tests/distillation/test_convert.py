"""Stage-1 and stage-2 model surgery: weights copied, and the Mamba-2 student
reproduces the linear-attention model exactly (call, prefill + step, padding)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_lopt.distillation import to_linear_attention
from keras_lopt.distillation import to_mamba2
from keras_lopt.layers.feature_maps import HedgehogFeatureMap
from keras_lopt.layers.linear_attention import LinearAttention
from keras_lopt.layers.mamba2 import Mamba2
from keras_lopt.models import LinearAttentionLM
from keras_lopt.models import Mamba2LM
from keras_lopt.models import TransformerLM

VOCAB, WIDTH, LAYERS = 40, 32, 2
TOL = 1e-4  # relative to the largest logit
MHA = dict(num_heads=4, key_dim=8)
GQA = dict(num_heads=4, key_dim=8, num_key_value_heads=2, rotary=True, use_bias=True)


def np_(x):
    return np.asarray(ops.convert_to_numpy(x), "float64")


def tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(1, VOCAB, shape).astype("int32")


def transformer(attention, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    model = TransformerLM(VOCAB, LAYERS, WIDTH, mixer_config=attention, **kwargs)
    model.build()
    rng = np.random.default_rng(seed)
    for v in model.weights:  # biases and norm scales away from 0 and 1
        if "bias" in v.path or "norm" in v.path:
            v.assign((np_(v) + 0.2 * rng.standard_normal(v.shape)).astype("float32"))
    return model


def perturb_linear_attention(model, seed=1):
    """Feature maps, norm scales and decays away from their initialisation (as after training)."""
    rng = np.random.default_rng(seed)
    for block in model.blocks:
        mixer = block.mixer
        maps = {id(m): m for m in (mixer.query_feature_map, mixer.key_feature_map)}
        variables = [v for m in maps.values() for v in m.weights] + [mixer.norm_scale]
        if mixer.decay:
            variables.append(mixer.decay_logit)
        for v in variables:
            v.assign((np_(v) + 0.3 * rng.standard_normal(v.shape)).astype("float32"))
    return model


def relative_error(got, want):
    got, want = np_(got), np_(want)
    return np.abs(got - want).max() / np.abs(want).max()


def assert_close(got, want):
    err = relative_error(got, want)
    assert err <= TOL, f"max relative error {err:.3g} > {TOL}"


# -- stage 1 ------------------------------------------------------------------


# The second case sets every block option away from its default, so that an
# option the conversion drops shows in the logits.
LLAMA_LIKE = dict(norm="layer", mlp_activation="gelu_tanh", gated_mlp=True, norm_epsilon=1e-3)


@pytest.mark.parametrize("attention,tie,options", [(MHA, True, {}), (GQA, False, LLAMA_LIKE)])
def test_to_linear_attention_copies_every_weight(attention, tie, options):
    teacher = transformer(attention, tie_embeddings=tie, **options)
    student = to_linear_attention(teacher, chunk_size=4)
    assert isinstance(student, LinearAttentionLM)
    assert student.intermediate_dim == teacher.intermediate_dim
    assert student.tie_embeddings == tie
    np.testing.assert_array_equal(np_(student.token_embedding.embeddings),
                                  np_(teacher.token_embedding.embeddings))
    shared = [(teacher.final_norm, student.final_norm)]
    if not tie:
        shared.append((teacher.lm_head, student.lm_head))
    for src, dst in zip(teacher.blocks, student.blocks):
        shared += [(getattr(src, n), getattr(dst, n))
                   for n in ("mixer_norm", "mlp_norm", "mlp_in", "mlp_out")]
        at, la = src.mixer, dst.mixer
        assert isinstance(la, LinearAttention)
        assert (la.num_heads, la.num_key_value_heads, la.key_dim, la.value_dim) == (
            at.num_heads, at.num_key_value_heads, at.key_dim, at.key_dim)
        assert (la.rotary, la.causal, la.normalization, la.use_bias) == (
            at.rotary, True, "norm", at.use_bias)
        assert la.rotary_max_wavelength == at.rotary_max_wavelength
        pairs = [(la.query_dense.kernel, at.query), (la.key_dense.kernel, at.key),
                 (la.value_dense.kernel, at.value), (la.output_dense.kernel, at.output_kernel)]
        if at.use_bias:
            pairs += [(la.query_dense.bias, at.query_bias), (la.key_dense.bias, at.key_bias),
                      (la.value_dense.bias, at.value_bias),
                      (la.output_dense.bias, at.output_bias)]
        for got, want in pairs:
            np.testing.assert_array_equal(np_(got), np_(want))
        # A fresh, identity-initialised Hedgehog map per projection.
        assert isinstance(la.query_feature_map, HedgehogFeatureMap)
        assert la.query_feature_map is not la.key_feature_map
        np.testing.assert_array_equal(np_(la.key_feature_map.kernel),
                                      np.tile(np.eye(8), (4, 1, 1)))
    for src, dst in shared:
        assert src.get_weights() and len(src.get_weights()) == len(dst.get_weights())
        for got, want in zip(dst.get_weights(), src.get_weights()):
            np.testing.assert_array_equal(got, want)
    # Everything but the mixers is the teacher's: the teacher's own layers,
    # with each attention swapped for the student's mixer, give its logits.
    ids = tokens((2, 7))
    x = teacher._embed(ops.convert_to_tensor(ids))
    for src, dst in zip(teacher.blocks, student.blocks):
        x = src._mlp(x + dst.mixer(src.mixer_norm(x)))
    np.testing.assert_allclose(np_(student(ids)), np_(teacher._logits(x)), rtol=1e-6, atol=1e-6)


def test_to_linear_attention_options():
    teacher = transformer(MHA)
    student = to_linear_attention(teacher, feature_map="elu", normalization="denominator")
    mixer = student.blocks[0].mixer
    assert mixer.feature_map == "elu" and mixer.normalization == "denominator"
    # A layer as feature map: each block gets its own copy (from the config).
    student = to_linear_attention(teacher, feature_map=HedgehogFeatureMap(feature_dim=4))
    maps = [block.mixer.query_feature_map for block in student.blocks]
    assert maps[0] is not maps[1] and maps[0].feature_dim == 4
    assert student.blocks[0].mixer._feature_dim == 8
    # ... which stage 2 keeps (one map shared by B and C, as by queries and keys).
    ssm = to_mamba2(perturb_linear_attention(student))
    mixer = ssm.blocks[0].mixer
    assert mixer.b_feature_map is mixer.c_feature_map and mixer.d_state == 8
    ids = tokens((2, 11))
    assert_close(ssm(ids), student(ids))


# -- stage 2 ------------------------------------------------------------------


def stage_two(attention, feature_map="hedgehog"):
    linear = perturb_linear_attention(
        to_linear_attention(transformer(attention), feature_map=feature_map, chunk_size=4))
    return linear, to_mamba2(linear)


@pytest.mark.parametrize("attention,feature_map", [
    (MHA, "hedgehog"), (GQA, "hedgehog"), (GQA, "elu"), (MHA, "relu"), (GQA, "identity")])
def test_to_mamba2_reproduces_linear_attention(attention, feature_map):
    linear, ssm = stage_two(attention, feature_map)
    assert isinstance(ssm, Mamba2LM)
    assert ssm.intermediate_dim == linear.intermediate_dim > 0
    mixer = ssm.blocks[0].mixer
    assert isinstance(mixer, Mamba2)
    assert (mixer.num_heads, mixer.num_groups, mixer.head_dim, mixer.bc_dim) == (4, 4, 8, 8)
    assert mixer.rotary == attention.get("rotary", False)
    ids = tokens((2, 11))
    want = np_(linear(ids))
    assert_close(ssm(ids), want)
    # Not trivially equal: the teacher's Transformer gives other logits.
    assert relative_error(transformer(attention)(ids), want) > 1e-2


@pytest.mark.parametrize("attention", [MHA, GQA])
def test_to_mamba2_prefill_step_and_left_padding(attention):
    linear, ssm = stage_two(attention)
    ids = tokens((2, 11))
    want = np_(linear(ids))
    logits, caches = ssm.prefill(ids[:, :6])
    assert_close(logits, want[:, :6])
    for t in range(6, 11):
        logits, caches = ssm.step(ids[:, t], caches)
        assert_close(logits, want[:, t])
    # Left-padded batch: row 0 has 3 pad tokens (junk ids), row 1 none.
    mask = np.ones((2, 8), "int32")
    mask[0, :3] = 0
    padded = tokens((2, 8), seed=3)
    want, want_caches = linear.prefill(padded, padding_mask=mask)
    got, caches = ssm.prefill(padded, padding_mask=mask)
    real = mask.astype(bool)
    assert_close(np_(got)[real], np_(want)[real])
    assert_close(ssm(padded, padding_mask=mask), linear(padded, padding_mask=mask))
    nxt = tokens((2,), seed=4)
    for _ in range(2):
        got, caches = ssm.step(nxt, caches)
        want, want_caches = linear.step(nxt, want_caches)
        assert_close(got, want)
    # The padded row continues as if it had been given unpadded.
    alone = np_(ssm(np.concatenate([padded[:1, 3:], nxt[:1, None], nxt[:1, None]], axis=1)))
    assert_close(got[:1], alone[:, -1])


@pytest.mark.parametrize("attention", [MHA, GQA])
def test_to_mamba2_with_a_neutral_gate(attention):
    linear = perturb_linear_attention(to_linear_attention(transformer(attention), chunk_size=4))
    ssm = to_mamba2(linear, chunk_size=8, gate=True)
    mixer = ssm.blocks[0].mixer
    assert mixer.gate and mixer.use_bias
    lo, hi = mixer.in_proj_layout["z"]
    z = np_(mixer.in_proj_bias)[lo:hi]
    np.testing.assert_allclose(z / (1 + np.exp(-z)), 1.0, rtol=1e-6)  # silu(bias) = 1
    ids = tokens((2, 11))
    assert_close(ssm(ids), linear(ids))
    logits, caches = ssm.prefill(ids[:, :6])
    logits, caches = ssm.step(ids[:, 6], caches)
    assert_close(logits, np_(linear(ids[:, :7]))[:, -1])
    # The gate is live: moving its weights changes the output.
    kernel = np_(mixer.in_proj_kernel)
    kernel[:, lo:hi] = 0.5
    mixer.in_proj_kernel.assign(kernel.astype("float32"))
    assert relative_error(ssm(ids), linear(ids)) > 1e-3


def test_to_mamba2_maps_a_learned_decay():
    keras.utils.set_random_seed(2)
    linear = LinearAttentionLM(VOCAB, LAYERS, WIDTH, mixer_config=dict(
        num_heads=4, key_dim=8, num_key_value_heads=2, feature_map="relu",
        normalization="norm", decay=True, chunk_size=4))
    linear.build()
    linear = perturb_linear_attention(linear)
    ssm = to_mamba2(linear, chunk_size=8)
    mixer, source = ssm.blocks[0].mixer, linear.blocks[0].mixer
    decay = 1.0 / (1.0 + np.exp(-np_(source.decay_logit)))
    np.testing.assert_allclose(np.exp(-np.exp(np_(mixer.A_log))), decay, rtol=1e-6)
    ids = tokens((2, 11))
    assert_close(ssm(ids), linear(ids))


def test_bad_inputs_raise_clear_errors():
    teacher = transformer(MHA)
    with pytest.raises(ValueError, match="normalization='denominator'"):
        to_mamba2(to_linear_attention(teacher, normalization="denominator"))
    with pytest.raises(ValueError, match="normalization=None"):
        to_mamba2(to_linear_attention(teacher, normalization=None))
    non_causal = LinearAttentionLM(VOCAB, 1, WIDTH, mixer_config=dict(
        num_heads=4, key_dim=8, causal=False, normalization="norm"))
    with pytest.raises(ValueError, match="causal=False"):
        to_mamba2(non_causal)
    with pytest.raises(ValueError, match="mixer is 'linear_attention'.*'attention'"):
        to_mamba2(teacher)
    with pytest.raises(ValueError, match="mixer is 'attention'.*'mamba2'"):
        to_linear_attention(Mamba2LM(VOCAB, 1, WIDTH, mixer_config=dict(
            d_state=8, head_dim=16)))
    with pytest.raises(TypeError, match="CausalLM.*Sequential"):
        to_linear_attention(keras.Sequential([keras.layers.Dense(2)]))
    with pytest.raises(TypeError, match="CausalLM"):
        to_mamba2(teacher.blocks[0])
    with pytest.raises(ValueError, match="Unknown feature map"):
        to_linear_attention(teacher, feature_map="softmax")
