"""The two-stage Distiller: which weights train in each stage, exact hand-over to
Mamba-2, the one-call driver with checkpoints and resume, the losses and the
bad-input errors."""

import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_lopt.distillation import AttentionTransferLoss
from keras_lopt.distillation import Distiller
from keras_lopt.distillation import TokenKLDivergence
from keras_lopt.distillation import to_linear_attention
from keras_lopt.models import LinearAttentionLM
from keras_lopt.models import Mamba2LM
from keras_lopt.models import TransformerLM

VOCAB, WIDTH, LAYERS, LENGTH = 40, 32, 2, 12
ATTENTION = dict(num_heads=4, key_dim=8, num_key_value_heads=2, rotary=True)


def np_(x):
    return np.asarray(ops.convert_to_numpy(x), "float64")


def teacher(seed=0):
    keras.utils.set_random_seed(seed)
    model = TransformerLM(VOCAB, LAYERS, WIDTH, mixer_config=ATTENTION, intermediate_dim=64)
    model.build()
    return model


def sequences(count=16, seed=0):
    return np.random.default_rng(seed).integers(1, VOCAB, (count, LENGTH + 1)).astype("int32")


def snapshot(model):
    return {v.path: np_(v) for v in model.weights}


def changed(before, model):
    return {v.path for v in model.weights if not np.array_equal(before[v.path], np_(v))}


def relative_error(got, want):
    got, want = np_(got), np_(want)
    return np.abs(got - want).max() / np.abs(want).max()


def fit_stage(distiller, stage, data, steps=3, learning_rate=1e-2):
    distiller.set_stage(stage)
    distiller.compile(optimizer=keras.optimizers.Adam(learning_rate))
    return distiller.fit(data[:, :-1], data[:, 1:], batch_size=4, epochs=1, steps_per_epoch=steps,
                         verbose=0)


def test_stage_by_stage_trains_only_what_each_stage_should():
    data = sequences()
    distiller = Distiller(teacher(), student="mamba2", chunk_size=8)
    assert distiller.stages == ("attention_transfer", "linear_attention", "mamba2")
    la, ssm = distiller.linear_attention_student, distiller.mamba2_student
    teacher_weights = snapshot(distiller.teacher)

    la_before = snapshot(la)
    history = fit_stage(distiller, "attention_transfer", data)
    assert np.isfinite(history.history["loss"]).all()
    moved = changed(la_before, la)
    assert moved, "attention transfer changed nothing"
    # Only feature maps, the per-head output norms and decays learn; Q/K/V/O,
    # MLPs, norms and embeddings stay the teacher's.
    assert all("feature_map" in p or p.endswith(("norm_scale", "decay_logit"))
               for p in moved), moved
    assert any("feature_map" in p for p in moved) and any("decay_logit" in p for p in moved)

    la_before = snapshot(la)
    history = fit_stage(distiller, "linear_attention", data, learning_rate=1e-3)
    assert set(history.history) == {"loss", "kl"}
    moved = changed(la_before, la)
    assert any("mixer/query/" in p for p in moved) and any("mlp_in" in p for p in moved)

    # Entering stage 2 converts the trained linear-attention model exactly,
    # gate included.
    distiller.set_stage("mamba2")
    assert distiller.student is ssm and ssm.blocks[0].mixer.gate
    ids = data[:4, :-1]
    assert relative_error(ssm(ids), la(ids)) <= 1e-4
    ssm_before = snapshot(ssm)
    history = fit_stage(distiller, "mamba2", data, learning_rate=1e-3)
    assert set(history.history) == {"loss", "kl", "ce"}
    moved = changed(ssm_before, ssm)
    assert any("conv_kernel" in p for p in moved) and any("in_proj" in p for p in moved)
    assert not changed(teacher_weights, distiller.teacher)


def test_attention_transfer_of_the_teacher_onto_itself_is_zero():
    model = teacher()
    ids = sequences(4)[:, :-1]
    hidden, outputs = model.mixer_activations(ids)
    again = [block.mixer(h) for block, h in zip(model.blocks, hidden)]
    assert float(AttentionTransferLoss("mse").compute_loss(outputs, again)) < 1e-10
    assert float(AttentionTransferLoss("cosine").compute_loss(outputs, again)) < 1e-5
    # The traced outputs are the ones the model's own forward pass uses.
    x = model.token_embedding(ids)
    for block in model.blocks:
        x = block(x)
    np.testing.assert_allclose(np_(model._logits(x)), np_(model(ids)), rtol=1e-5, atol=1e-5)


def test_calibrate_matches_the_teacher_scale():
    distiller = Distiller(teacher(), student="linear_attention", chunk_size=8)
    x = sequences(8)[:, :-1]
    # The least-squares factor <t, s> / <s, s> per layer, recomputed in
    # float64 from the student mixers' outputs on the teacher's hidden states.
    hidden, targets = distiller.teacher.mixer_activations(x)
    mixers = [block.mixer for block in distiller.linear_attention_student.blocks]
    outputs = [np_(mixer(h)) for mixer, h in zip(mixers, hidden)]
    want = [np.sum(s * np_(t)) / np.sum(s * s) for s, t in zip(outputs, targets)]
    scales = [np_(mixer.norm_scale) for mixer in mixers]
    before = float(distiller.compute_loss(x))
    factors = distiller.calibrate(x)
    after = float(distiller.compute_loss(x))
    assert factors == pytest.approx(want, rel=1e-5)
    # ... and each norm scale is multiplied by its factor.
    for mixer, scale, factor in zip(mixers, scales, factors):
        np.testing.assert_allclose(np_(mixer.norm_scale), scale * factor, rtol=1e-6)
    # The least-squares scale can only lower the scale-free MSE, to at most 1.
    assert after < before and after <= 1.0 + 1e-6
    assert distiller.calibrate(x) == pytest.approx([1.0] * LAYERS, rel=1e-4)


def test_one_call_fit_checkpoints_and_resumes(tmp_path):
    data = sequences(32)
    checkpoints = str(tmp_path / "run")
    tokens_per_batch = 4 * LENGTH
    budget = (4 * tokens_per_batch, 2 * tokens_per_batch)

    first = Distiller(teacher(), student="mamba2", chunk_size=8)
    histories = first.fit(data, stage_tokens={"attention_transfer": budget[0] // 2,
                                              "linear_attention": budget[0] // 2},
                          batch_size=4, optimizer="adam", checkpoint_dir=checkpoints, verbose=0)
    assert list(histories) == ["attention_transfer", "linear_attention"]
    assert [len(h.history["loss"]) for h in histories.values()] == [1, 1]
    assert os.path.exists(os.path.join(checkpoints, "progress.json"))

    # A new process: same teacher, same directory -> stage 1 is loaded, only
    # stage 2 runs, and it starts from the trained linear-attention model.
    second = Distiller(teacher(), student="mamba2", chunk_size=8)
    histories = second.fit(data, stage_tokens=budget, batch_size=4, optimizer="adam",
                           checkpoint_dir=checkpoints, checkpoint_every=1, verbose=0)
    assert list(histories) == ["mamba2"]
    assert len(histories["mamba2"].history["loss"]) == 1  # one epoch per stage
    ids = data[:2, :-1]
    np.testing.assert_allclose(np_(second.linear_attention_student(ids)),
                               np_(first.linear_attention_student(ids)), rtol=1e-5, atol=1e-5)
    assert isinstance(second.student, Mamba2LM) and second.stage == "mamba2"

    # Everything is done: a third run trains nothing and has the same student.
    third = Distiller(teacher(), student="mamba2", chunk_size=8)
    assert third.fit(data, stage_tokens=budget, batch_size=4, checkpoint_dir=checkpoints,
                     verbose=0) == {}
    np.testing.assert_allclose(np_(third.student(ids)), np_(second.student(ids)),
                               rtol=1e-5, atol=1e-5)


class _Interrupt(keras.callbacks.Callback):
    """Stands in for a kill: raises at the start of the given step."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.step:
            raise KeyboardInterrupt


def _weights(model):
    return [keras.ops.convert_to_numpy(v.value) for v in model.weights]


@pytest.mark.parametrize("stage_tokens", [
    {"attention_transfer": 6 * 4 * LENGTH},
    {"attention_transfer": 2 * 4 * LENGTH, "linear_attention": 6 * 4 * LENGTH},
], ids=["attention_transfer", "linear_attention"])
def test_an_interrupted_stage_resumes_exactly_where_it_stopped(tmp_path, stage_tokens):
    # Varied data (each step draws other rows), a schedule that changes the
    # rate every step, and a checkpoint every 4 of 6 steps: the run killed
    # at step 5 and resumed from step 4 must end where an uninterrupted run
    # ends, after exactly 6 steps (not ceil(6 / 4) * 4 = 8).
    data = sequences(32)
    last = list(stage_tokens)[-1]

    def optimizer(stage, steps):
        return keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-3, steps))

    def run(directory, callbacks=None):
        distiller = Distiller(teacher(), student="linear_attention", chunk_size=8)
        distiller.fit(data, stage_tokens=stage_tokens, batch_size=4, optimizer=optimizer,
                      checkpoint_dir=str(directory), checkpoint_every=4,
                      callbacks=callbacks, verbose=0)
        return distiller

    whole = run(tmp_path / "whole")
    assert int(whole.optimizer.iterations.value) == 6
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", callbacks=[_Interrupt(5)])
    assert os.path.exists(tmp_path / "cut" / f"stage_{last}.4.weights.h5")
    resumed = run(tmp_path / "cut")
    assert int(resumed.optimizer.iterations.value) == 6
    for a, b in zip(_weights(whole), _weights(resumed)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert not [p for p in os.listdir(tmp_path / "cut") if p.startswith("stage_")]


def test_naive_baseline_and_linear_attention_only_students():
    data = sequences()
    keras.utils.set_random_seed(3)
    fresh = Mamba2LM(VOCAB, LAYERS, WIDTH, mixer_config=dict(d_state=8, head_dim=8,
                                                             chunk_size=8))
    naive = Distiller(teacher(), student=fresh, ce_weight=0.0)
    assert naive.stages == ("mamba2",) and naive.student is fresh
    seen = []
    counter = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(b))
    histories = naive.fit(data, stage_tokens=(0, 2 * 4 * LENGTH), batch_size=4, verbose=0,
                          callbacks=[counter])
    assert set(histories["mamba2"].history) == {"loss", "kl"}
    assert len(seen) == 2  # the user's callbacks see every step
    with pytest.raises(ValueError, match="stage 1 tokens must be 0"):
        naive.fit(data, stage_tokens=(10, 10), verbose=0)

    la_only = Distiller(teacher(), student="linear_attention", chunk_size=8)
    assert la_only.stages == ("attention_transfer", "linear_attention")
    with pytest.raises(ValueError, match="stage 2 tokens must be 0"):
        la_only.fit(data, stage_tokens=(10, 10), verbose=0)
    with pytest.raises(ValueError, match="Unknown stage"):
        la_only.set_stage("mamba2")


def test_token_kl_divergence_matches_numpy_and_ignores_padding():
    rng = np.random.default_rng(0)
    t = rng.standard_normal((2, 5, 7)).astype("float32")
    s = rng.standard_normal((2, 5, 7)).astype("float32")
    mask = np.ones((2, 5), "int32")
    mask[1, :2] = 0

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    temperature = 2.0
    lp, lq = log_softmax(t / temperature), log_softmax(s / temperature)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    want = (kl * mask).sum() / mask.sum() * temperature ** 2
    loss = TokenKLDivergence(temperature)
    assert isinstance(loss, keras.distillation.DistillationLoss)
    np.testing.assert_allclose(float(loss.compute_loss(t, s, padding_mask=mask)), want,
                               rtol=1e-5)
    s_padded = s.copy()
    s_padded[1, :2] = 100.0  # garbage where the mask is 0 changes nothing
    np.testing.assert_allclose(float(loss.compute_loss(t, s_padded, padding_mask=mask)), want,
                               rtol=1e-5)
    assert abs(float(loss.compute_loss(t, t))) < 1e-6
    assert TokenKLDivergence.from_config(loss.get_config()).temperature == temperature


def test_attention_transfer_loss_values():
    t = [np.ones((1, 3, 4), "float32") * 2.0]
    s = [np.zeros((1, 3, 4), "float32")]
    # Predicting zeros costs exactly 1 in the scale-free MSE.
    np.testing.assert_allclose(float(AttentionTransferLoss("mse").compute_loss(t, s)), 1.0,
                               rtol=1e-6)
    np.testing.assert_allclose(
        float(AttentionTransferLoss("cosine").compute_loss(t, [-t[0]])), 2.0, rtol=1e-6)
    with pytest.raises(ValueError, match="one student output per teacher layer"):
        AttentionTransferLoss().compute_loss(t + t, s)
    with pytest.raises(ValueError, match="loss must be one of"):
        AttentionTransferLoss("kl")


def test_config_round_trip():
    distiller = Distiller(teacher(), student="mamba2", ce_weight=0.3, gate=False, chunk_size=8)
    clone = Distiller.from_config(distiller.get_config())
    assert clone.stages == distiller.stages and clone.ce_weight == 0.3
    assert not clone.mamba2_student.blocks[0].mixer.gate
    clone.set_weights(distiller.get_weights())
    ids = sequences(2)[:, :-1]
    np.testing.assert_allclose(np_(clone(ids)), np_(distiller(ids)), rtol=1e-5, atol=1e-5)


def test_bad_teachers_and_students_fail_before_training():
    with pytest.raises(TypeError, match="Unsupported teacher"):
        Distiller(keras.Sequential([keras.layers.Dense(3)]))
    la = LinearAttentionLM(VOCAB, LAYERS, WIDTH, mixer_config=dict(num_heads=4, key_dim=8))
    with pytest.raises(ValueError, match="no attention layers"):
        Distiller(la)
    with pytest.raises(ValueError, match="Mamba-1"):
        Distiller(teacher(), student="mamba")
    with pytest.raises(ValueError, match="student must be one of"):
        Distiller(teacher(), student="rwkv")
    with pytest.raises(ValueError, match="vocab_size: teacher 40, student 50"):
        Distiller(teacher(), student=Mamba2LM(50, LAYERS, WIDTH,
                                              mixer_config=dict(d_state=8, head_dim=8)))
    with pytest.raises(ValueError, match="hidden_dim: teacher 32, student 48"):
        Distiller(teacher(), student=Mamba2LM(VOCAB, LAYERS, 48,
                                              mixer_config=dict(d_state=8, head_dim=8)))
    deeper = to_linear_attention(TransformerLM(VOCAB, 3, WIDTH, mixer_config=ATTENTION))
    with pytest.raises(ValueError, match="num_layers: teacher 2, student 3"):
        Distiller(teacher(), student=deeper)
    with pytest.raises(TypeError, match="Unsupported student"):
        Distiller(teacher(), student=keras.Sequential([keras.layers.Dense(3)]))
    with pytest.raises(ValueError, match="ce_weight"):
        Distiller(teacher(), ce_weight=2.0)
    distiller = Distiller(teacher(), chunk_size=8)
    with pytest.raises(ValueError, match="int array"):
        distiller.fit(np.zeros((4, 5), "float32"), stage_tokens=(10, 10), verbose=0)
    with pytest.raises(ValueError, match="stage_tokens must be"):
        distiller.fit(sequences(), stage_tokens=(10, 10, 10), verbose=0)
    with pytest.raises(ValueError, match="does not have"):
        distiller.fit(sequences(), stage_tokens={"mamba": 10}, verbose=0)
