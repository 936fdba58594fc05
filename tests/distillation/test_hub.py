"""keras-hub GPT-2 and Llama teachers: rebuilt as TransformerLMs with the same
logits, carried through both conversions, and distilled for a few steps."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_lopt.distillation import Distiller
from keras_lopt.distillation import from_keras_hub
from keras_lopt.distillation import to_linear_attention
from keras_lopt.distillation import to_mamba2

keras_hub = pytest.importorskip(
    "keras_hub", reason="keras-hub is not installed (pip install keras-lopt[hub])")

VOCAB = 40
TOL = 1e-4


def np_(x):
    return np.asarray(ops.convert_to_numpy(x), "float64")


def relative_error(got, want):
    got, want = np_(got), np_(want)
    return np.abs(got - want).max() / np.abs(want).max()


def perturbed(backbone, seed=1):
    # Norm scales, biases and embeddings away from their initial values, so
    # that a weight copied to the wrong place shows.
    rng = np.random.default_rng(seed)
    for v in backbone.weights:
        v.assign((np_(v) + 0.1 * rng.standard_normal(v.shape)).astype("float32"))
    return backbone


def gpt2():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=24)
    return keras_hub.models.GPT2CausalLM(backbone=perturbed(backbone), preprocessor=None)


def llama(tie=False, **kwargs):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=16, intermediate_dim=24, tie_word_embeddings=tie, **kwargs)
    return keras_hub.models.LlamaCausalLM(backbone=perturbed(backbone), preprocessor=None)


def token_ids(shape=(2, 11), seed=0):
    return np.random.default_rng(seed).integers(1, VOCAB, shape).astype("int32")


def hub_logits(model, ids):
    return model({"token_ids": ids, "padding_mask": np.ones_like(ids)})


@pytest.mark.parametrize("make", [gpt2, lambda: llama(tie=False), lambda: llama(tie=True)],
                         ids=["gpt2", "llama", "llama_tied"])
def test_from_keras_hub_reproduces_the_logits(make):
    model = make()
    lm = from_keras_hub(model)
    ids = token_ids()
    assert relative_error(lm(ids), hub_logits(model, ids)) <= TOL
    # The backbone alone converts the same way.
    assert relative_error(from_keras_hub(model.backbone)(ids), lm(ids)) <= 1e-6


def greedy(lm, prompt, new_tokens):
    """Greedy decoding with full forward passes, no cache."""
    tokens = prompt
    for _ in range(new_tokens):
        nxt = np.argmax(np_(lm(tokens))[:, -1], axis=-1).astype("int32")
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
    return tokens


def test_converted_gpt2_generates_with_its_learned_positions():
    lm = from_keras_hub(gpt2())
    prompt = token_ids((2, 5))
    out = lm.generate(prompt, max_new_tokens=4)
    np.testing.assert_array_equal(out, greedy(lm, prompt, 4))
    with pytest.raises(ValueError, match="max_positions=24"):
        lm.generate(prompt, max_new_tokens=20)


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_keras_hub_teacher_through_both_conversions(make):
    model = make()
    linear = to_linear_attention(model, chunk_size=4)
    ssm = to_mamba2(linear, chunk_size=4, gate=True)
    ids = token_ids()
    assert relative_error(ssm(ids), linear(ids)) <= TOL
    assert linear.max_positions == from_keras_hub(model).max_positions
    assert ssm.blocks[0].gated_mlp == (make is llama)


def test_distiller_takes_a_keras_hub_teacher():
    teacher = llama()
    distiller = Distiller(teacher, student="mamba2", chunk_size=4)
    data = token_ids((8, 9))
    # The teacher it distils from is the keras-hub model, logits and all.
    assert relative_error(distiller.teacher(data), hub_logits(teacher, data)) <= TOL
    histories = distiller.fit(data, stage_tokens=(2 * 4 * 8, 4 * 8), batch_size=4, verbose=0)
    assert list(histories) == list(distiller.stages)
    assert all(np.isfinite(h.history["loss"]).all() for h in histories.values())
    # ... and training leaves the teacher as it was.
    assert relative_error(distiller.teacher(data), hub_logits(teacher, data)) <= TOL
    student = distiller.student
    assert student is distiller.mamba2_student
    # The distilled student's caches give the logits of full passes...
    ids = token_ids((2, 9))
    logits, caches = student.prefill(ids[:, :5], max_length=9)
    cached = [np_(logits)]
    for t in range(5, 9):
        step_logits, caches = student.step(ids[:, t], caches)
        cached.append(np_(step_logits)[:, None])
    assert relative_error(np.concatenate(cached, axis=1), student(ids)) <= TOL
    # ... and so generation equals greedy decoding without a cache.
    np.testing.assert_array_equal(student.generate(ids[:1, :6], max_new_tokens=3),
                                  greedy(student, ids[:1, :6], 3))


def test_unsupported_keras_hub_models_are_named():
    keras.utils.set_random_seed(0)
    gemma = keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCAB, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=16, intermediate_dim=32, head_dim=8)
    with pytest.raises(TypeError, match="Unsupported keras-hub model GemmaBackbone"):
        from_keras_hub(gemma)
    with pytest.raises(TypeError, match="Unsupported keras-hub model GemmaBackbone"):
        Distiller(gemma)
    with pytest.raises(ValueError, match="rope_position_scaling_factor"):
        from_keras_hub(llama(rope_position_scaling_factor=2.0))
