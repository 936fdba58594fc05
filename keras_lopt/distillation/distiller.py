"""Two-stage cross-architecture distillation: Transformer -> linear attention -> Mamba-2."""

import json
import os

import keras
import numpy as np
from keras import ops
from keras.saving import register_keras_serializable

from keras_lopt.distillation import convert
from keras_lopt.distillation import hub
from keras_lopt.distillation.losses import AttentionTransferLoss
from keras_lopt.distillation.losses import TokenKLDivergence
from keras_lopt.distillation.losses import token_cross_entropy
from keras_lopt.models.causal_lm import CausalLM

STAGES = ("attention_transfer", "linear_attention", "mamba2")
STUDENTS = ("linear_attention", "mamba2")


def _describe(model):
    kind = type(model)
    return f"{kind.__module__}.{kind.__qualname__}"


def _check_teacher(teacher):
    if isinstance(teacher, CausalLM):
        if teacher.mixer != "attention":
            raise ValueError(
                f"The teacher has no attention layers: its blocks mix tokens with "
                f"{teacher.mixer!r}. Distillation converts softmax attention; pass a "
                "TransformerLM (mixer='attention').")
        return
    raise TypeError(
        f"Unsupported teacher {_describe(teacher)}: the Distiller needs a "
        "keras_lopt.models.TransformerLM (a CausalLM with mixer='attention') or a keras-hub "
        f"model among {hub.SUPPORTED}.")


def _check_student_fits(teacher, student, mixer):
    if not isinstance(student, CausalLM) or student.mixer != mixer:
        raise TypeError(f"Expected a CausalLM with mixer={mixer!r}; received "
                        f"{_describe(student)}.")
    problems = []
    for what in ("vocab_size", "hidden_dim"):
        if getattr(student, what) != getattr(teacher, what):
            problems.append(f"{what}: teacher {getattr(teacher, what)}, student "
                            f"{getattr(student, what)}")
    if mixer == "linear_attention" and student.num_layers != teacher.num_layers:
        problems.append(f"num_layers: teacher {teacher.num_layers}, student "
                        f"{student.num_layers} (attention transfer matches layer by layer)")
    if problems:
        raise ValueError("The student does not fit the teacher: " + "; ".join(problems) + ".")


@register_keras_serializable(package="keras_lopt")
class Distiller(keras.Model):
    """Distils a Transformer LM into linear attention, then into Mamba-2.

    The stages (`STAGES`), in order:

    1. `"attention_transfer"`: the teacher is copied into a
       `LinearAttentionLM` (`to_linear_attention`: same Q/K/V/O, norms, MLPs
       and embeddings). Only the new parts train (feature maps, output
       norms, decays): every student mixer is fed the teacher's hidden state
       at its layer and matched to that layer's attention output
       (`AttentionTransferLoss`), so layers train independently.
    2. `"linear_attention"`: the whole linear-attention model trains end to
       end against the teacher's logits (`TokenKLDivergence`).
    3. `"mamba2"`: the linear-attention model is converted into a `Mamba2LM`
       that computes the same function (`to_mamba2`; with `gate=True` a
       neutral gate is added), and the whole model trains against the
       teacher's logits and the data:
       `(1 - ce_weight) * KL + ce_weight * cross-entropy`. The convs
       (identity at the start) and the gate are trained with the rest.

    Use it in one call, with a token budget per stage (progress bars, a
    fresh optimizer per stage, checkpoints between stages and resume):

    ```python
    distiller = Distiller(teacher, student="mamba2")
    distiller.fit(batches, stage_tokens=(s1, s2), checkpoint_dir="runs/distil")
    student = distiller.student      # a Mamba2LM: no attention, O(1) per token
    ```

    or stage by stage, like any Keras model (compile again after
    `set_stage`, since the trainable weights change):

    ```python
    distiller.set_stage("attention_transfer")
    distiller.calibrate(x[:32])       # output norms to the teacher's scale
    distiller.compile(optimizer=keras.optimizers.AdamW(1e-3))
    distiller.fit(x, y, epochs=1, callbacks=[...])
    distiller.set_stage("linear_attention"); distiller.compile(...); distiller.fit(x, y)
    ```

    Inputs are int token ids `(batch, length)` or a dict with `token_ids`
    and `padding_mask`; targets are the next tokens `(batch, length)`.
    `call` returns the current student's logits.

    Args:
        teacher: a trained `keras_lopt.models.TransformerLM`, or a keras-hub
            GPT-2 / Llama model (backbone or `CausalLM`), which is first
            rebuilt as a `TransformerLM` with the same logits
            (`from_keras_hub`). It is frozen.
        student: `"mamba2"` (all three stages), `"linear_attention"` (stage
            1 only), a `LinearAttentionLM` to start stage 1 from instead of
            the converted teacher, or a `Mamba2LM` to distil directly with
            stage 3 only (no conversion: the "naive" baseline).
        feature_map: the linear-attention feature map (`"hedgehog"`,
            `"elu"`, `"relu"`, `"identity"`).
        attention_loss: `"mse"` (relative to the teacher's scale) or
            `"cosine"`.
        temperature: of the logits KL.
        ce_weight: weight of the data cross-entropy in stage 3, in [0, 1].
        gate: give the Mamba-2 student Mamba's output gate (initialised
            neutral).
        d_conv: width of the Mamba-2 convs.
        chunk_size: chunk size of the student layers.
        decay: give the linear-attention layers a learned per-head decay
            (initialised to memories of ~32 to ~512 tokens), trained from
            attention transfer on and carried into Mamba-2's `A`.

    Raises:
        TypeError: the teacher is neither a Transformer `CausalLM` nor a
            supported keras-hub model, or the student is of an unsupported
            kind.
        ValueError: the teacher has no attention layers, or a given student
            has another vocabulary, width or depth.
    """

    def __init__(self, teacher, student="mamba2", feature_map="hedgehog",
                 attention_loss="mse", temperature=1.0, ce_weight=0.2, gate=True, d_conv=4,
                 chunk_size=64, decay=True, name="distiller", **kwargs):
        super().__init__(name=name, **kwargs)
        if hub.is_keras_hub_model(teacher):
            teacher = hub.from_keras_hub(teacher)
        _check_teacher(teacher)
        if not 0.0 <= ce_weight <= 1.0:
            raise ValueError(f"ce_weight must be in [0, 1]; received {ce_weight}.")
        if not teacher.built:
            teacher.build()
        self.teacher = teacher
        self.feature_map = feature_map
        self.attention_loss = AttentionTransferLoss(attention_loss)
        self.logits_loss = TokenKLDivergence(temperature)
        self.ce_weight = float(ce_weight)
        self.gate = bool(gate)
        self.d_conv = int(d_conv)
        self.chunk_size = int(chunk_size)
        self.decay = bool(decay)
        self._student_spec = student
        self.linear_attention_student, self.mamba2_student = self._make_students(student)
        self.stages = tuple(s for s in STAGES if self._has_stage(s))
        self.kl_tracker = keras.metrics.Mean(name="kl")
        self.ce_tracker = keras.metrics.Mean(name="ce")
        self.stage = None
        self.set_stage(self.stages[0])
        self.built = True  # every sub-model is built

    # ---------------------------------------------------------- students

    def _make_students(self, student):
        teacher = self.teacher
        if isinstance(student, str):
            if student == "mamba":
                raise ValueError(
                    "student='mamba' (Mamba-1) is not supported: Mamba-1 shares one B/C "
                    "across all channels, so a multi-head linear-attention model has no "
                    "exact Mamba-1 form. Use student='mamba2'.")
            if student not in STUDENTS:
                raise ValueError(f"student must be one of {STUDENTS} or a model; received "
                                 f"{student!r}.")
            la = convert.to_linear_attention(teacher, feature_map=self.feature_map,
                                             chunk_size=self.chunk_size, decay=self.decay)
            ssm = convert.to_mamba2(la, self.d_conv, gate=self.gate) \
                if student == "mamba2" else None
            return la, ssm
        if isinstance(student, CausalLM) and student.mixer == "linear_attention":
            _check_student_fits(teacher, student, "linear_attention")
            return student, None
        if isinstance(student, CausalLM) and student.mixer == "mamba2":
            _check_student_fits(teacher, student, "mamba2")
            if not student.built:
                student.build()
            return None, student
        raise TypeError(
            f"Unsupported student {_describe(student)}: pass 'mamba2', 'linear_attention', "
            "a LinearAttentionLM or a Mamba2LM.")

    def _has_stage(self, stage):
        if stage == "mamba2":
            return self.mamba2_student is not None
        return self.linear_attention_student is not None

    @property
    def student(self):
        """The model the current stage trains (after the last stage: the result)."""
        if self.stage == "mamba2":
            return self.mamba2_student
        return self.linear_attention_student

    # ------------------------------------------------------------ stages

    def set_stage(self, stage):
        """Switches to `stage`: sets which weights train; compile before fitting.

        Entering `"mamba2"` from linear attention converts the current
        linear-attention student into the Mamba-2 student (overwriting it).
        """
        if stage not in self.stages:
            raise ValueError(f"Unknown stage {stage!r}; this distiller's stages are "
                             f"{self.stages}.")
        if stage == "mamba2" and self.stage in ("attention_transfer", "linear_attention"):
            self._convert_to_mamba2()
        self.stage = stage
        for model in (self.teacher, self.linear_attention_student, self.mamba2_student):
            if model is not None:
                _set_trainable(model, False)
        if stage == "attention_transfer":
            for block in self.linear_attention_student.blocks:
                mixer = block.mixer
                _set_trainable(mixer, True)
                for dense in (mixer.query_dense, mixer.key_dense, mixer.value_dense,
                              mixer.output_dense):
                    _set_trainable(dense, False)
        else:
            _set_trainable(self.student, True)
        # The trainable weights changed: the next fit needs a new compile.
        self.compiled = False
        self.train_function = self.test_function = self.predict_function = None

    def calibrate(self, x, padding_mask=None):
        """Rescales each linear-attention layer's output norm to the teacher's scale.

        A fresh linear-attention layer with `normalization="norm"` outputs
        unit-RMS heads while softmax attention outputs averages of values,
        which are much smaller, so attention transfer would spend its first
        steps only learning that scale. On the batch `x`, every layer's
        `norm_scale` is multiplied by the least-squares factor
        `<t, s> / <s, s>` between its output `s` (fed the teacher's hidden
        state) and the teacher attention output `t` (output biases
        removed). The one-call `fit` does this before attention transfer;
        call it yourself when running the stages by hand.

        Args:
            x: token ids `(batch, length)` or a dict with `token_ids` and
                `padding_mask`.

        Returns:
            The factors, one per layer (1.0 for layers without an output
            norm).
        """
        token_ids, padding_mask = CausalLM._unpack(x, padding_mask)
        hidden, teacher_out = self.teacher.mixer_activations(token_ids, padding_mask)
        factors = []
        for block, h, t in zip(self.linear_attention_student.blocks, hidden, teacher_out):
            mixer = block.mixer
            if mixer.normalization != "norm":
                factors.append(1.0)
                continue
            s = ops.cast(mixer(h, padding_mask=padding_mask), "float32")
            t = ops.cast(t, "float32")
            if mixer.use_bias:
                bias = ops.cast(mixer.output_dense.bias, "float32")
                s, t = s - bias, t - bias
            if padding_mask is not None:
                real = ops.cast(padding_mask, "float32")[..., None]
                s, t = s * real, t * real
            factor = float(ops.convert_to_numpy(ops.stop_gradient(
                ops.sum(s * t) / ops.maximum(ops.sum(s * s), 1e-30))))
            mixer.norm_scale.assign(ops.cast(mixer.norm_scale, "float32") * factor)
            factors.append(factor)
        return factors

    def _convert_to_mamba2(self):
        la, ssm = self.linear_attention_student, self.mamba2_student
        convert._copy_everything_but_the_mixers(la, ssm)
        for src, dst in zip(la.blocks, ssm.blocks):
            convert.copy_linear_attention_to_mamba2(src.mixer, dst.mixer)

    # ---------------------------------------------------------- training

    def call(self, inputs, training=None):
        return self.student(inputs)

    @property
    def metrics(self):
        hidden = {"kl", "ce"} if self.stage == "attention_transfer" else (
            set() if self.stage == "mamba2" and self.ce_weight > 0 else {"ce"})
        return [m for m in super().metrics if m.name not in hidden]

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        token_ids, padding_mask = CausalLM._unpack(x, None)
        if self.stage == "attention_transfer":
            hidden, teacher_out = self.teacher.mixer_activations(token_ids, padding_mask)
            student_out = [
                block.mixer(ops.stop_gradient(h), padding_mask=padding_mask)
                for block, h in zip(self.linear_attention_student.blocks, hidden)]
            return self.attention_loss.compute_loss(teacher_out, student_out,
                                                    padding_mask=padding_mask)
        if y_pred is None:
            y_pred = self(x, training=training)
        teacher_logits = ops.stop_gradient(self.teacher(x))
        loss = self.logits_loss.compute_loss(teacher_logits, y_pred, padding_mask=padding_mask)
        self.kl_tracker.update_state(loss)
        if self.stage == "mamba2" and self.ce_weight > 0:
            if y is None:
                raise ValueError("Stage 'mamba2' with ce_weight > 0 needs next-token targets y.")
            ce = token_cross_entropy(y, y_pred, padding_mask)
            self.ce_tracker.update_state(ce)
            loss = (1.0 - self.ce_weight) * loss + self.ce_weight * ce
        return loss

    # --------------------------------------------------- one-call driver

    def fit(self, x=None, y=None, *args, stage_tokens=None, batch_size=None,
            optimizer="adamw", checkpoint_dir=None, checkpoint_every=None,
            attention_transfer_fraction=0.5, seed=0, callbacks=None, verbose="auto",
            **kwargs):
        """Keras `fit` of the current stage, or with `stage_tokens` every stage in turn.

        Without `stage_tokens` this is `keras.Model.fit` (compile first).
        With it, every remaining stage runs with its own token budget:

        Args:
            x: token sequences, an int array `(num_sequences, length + 1)`
                (inputs and next-token targets are its two shifted views;
                batches are drawn at random), or an iterator of
                `(token_ids, targets)` batches.
            stage_tokens: tokens per stage: `(stage_1, stage_2)` where stage
                1 is split between attention transfer and end-to-end
                training by `attention_transfer_fraction`, or a dict from
                stage name to tokens. A stage with no tokens is skipped.
            batch_size: sequences per batch (array input).
            optimizer: a name, config, instance (cloned per stage) or a
                function `(stage, steps) -> optimizer`.
            checkpoint_dir: where to save the weights after every stage and,
                inside a stage, every `checkpoint_every` steps (student,
                optimizer state and step); running again with the same
                directory resumes: a finished stage is loaded, an
                interrupted one continues at its last checkpoint with the
                same batches and schedule as an uninterrupted run (exactly
                for array input; an iterator is advanced past the batches
                already trained on, which is the same only if it yields the
                same batches again).
            checkpoint_every: steps between checkpoints inside a stage
                (default: none inside a stage). It never changes the
                number of steps.
            seed: seed of the batch sampler (array input): the batch of
                step `t` of a stage depends only on `(seed, stage, t)`.
            callbacks, verbose: as in `keras.Model.fit`, for every stage.

        Returns:
            A dict from stage name to its `History`.
        """
        if stage_tokens is None:
            return super().fit(x, y, *args, batch_size=batch_size, callbacks=callbacks,
                               verbose=verbose, **kwargs)
        if y is not None or args or kwargs:
            raise TypeError("With stage_tokens, fit takes the token data as x only (and the "
                            f"keyword arguments it documents); received extra {sorted(kwargs)}.")
        budget = self._stage_budget(stage_tokens, attention_transfer_fraction)
        source, tokens_per_batch = _batch_source(x, batch_size, seed)
        done = self._load_progress(checkpoint_dir)
        histories = {}
        plan = [s for s in self.stages if budget.get(s, 0) > 0]
        for i, stage in enumerate(plan):
            steps = max(1, budget[stage] // tokens_per_batch)
            if stage in done:
                continue
            self.set_stage(stage)
            self.compile(optimizer=_stage_optimizer(optimizer, stage, steps))
            checkpoint = checkpoint_dir and _StageCheckpoint(checkpoint_dir, stage, steps,
                                                             checkpoint_every)
            # A resumed stage restores the student, the optimizer (its state
            # and step count, so the schedule goes on where it stopped) and
            # continues the same batch stream at the same step.
            start = checkpoint.restore(self) if checkpoint else 0
            if verbose:
                print(f"Stage {i + 1}/{len(plan)}: {stage} ({steps} steps, "
                      f"{steps * tokens_per_batch:,} tokens)"
                      + (f", resumed at step {start}" if start else ""))
            batches = source(self.stages.index(stage), start)
            if stage == "attention_transfer" and not start:
                first = next(batches)
                factors = self.calibrate(first[0])
                batches = _prepend(first, batches)
                if verbose:
                    print("Output norms calibrated to the teacher's scale: factors "
                          + ", ".join(f"{f:.3g}" for f in factors))
            stage_callbacks = list(callbacks or []) + ([checkpoint] if checkpoint else [])
            # One epoch of exactly the stage's remaining steps: checkpoints
            # are taken inside it, so they never change the budget.
            histories[stage] = super().fit(
                batches, steps_per_epoch=steps - start, epochs=1,
                callbacks=stage_callbacks, verbose=verbose, shuffle=False)
            done.append(stage)
            self._save_progress(checkpoint_dir, done)
            if checkpoint:
                checkpoint.remove()
        if plan and plan[-1] != self.stage:
            self.set_stage(plan[-1])
        return histories

    def _stage_budget(self, stage_tokens, fraction):
        if isinstance(stage_tokens, dict):
            unknown = set(stage_tokens) - set(self.stages)
            if unknown:
                raise ValueError(f"stage_tokens names stages {sorted(unknown)} this distiller "
                                 f"does not have; its stages are {self.stages}.")
            return {k: int(v) for k, v in stage_tokens.items()}
        stage_tokens = tuple(int(t) for t in np.atleast_1d(stage_tokens))
        if len(stage_tokens) != 2 or min(stage_tokens) < 0:
            raise ValueError("stage_tokens must be (stage_1_tokens, stage_2_tokens) >= 0 or a "
                             f"dict; received {stage_tokens}.")
        first, second = stage_tokens
        if first and self.linear_attention_student is None:
            raise ValueError("This student starts at stage 2 (a given Mamba2LM): stage 1 "
                             "tokens must be 0.")
        if second and self.mamba2_student is None:
            raise ValueError("This student has no stage 2 (student='linear_attention'): "
                             "stage 2 tokens must be 0.")
        transfer = int(first * fraction)
        return {"attention_transfer": transfer, "linear_attention": first - transfer,
                "mamba2": second}

    def _load_progress(self, checkpoint_dir):
        path = checkpoint_dir and os.path.join(checkpoint_dir, "progress.json")
        if not path or not os.path.exists(path):
            return []
        with open(path) as f:
            done = json.load(f)["completed_stages"]
        if done:
            # The Mamba-2 student is made from the stage-1 one when stage 3 starts.
            self.load_weights(os.path.join(checkpoint_dir, "distiller.weights.h5"))
            # Without a previous stage set_stage does not convert (which would
            # overwrite a loaded Mamba-2 student).
            self.stage = None
            self.set_stage(done[-1])
        return list(done)

    def _save_progress(self, checkpoint_dir, done):
        if not checkpoint_dir:
            return
        os.makedirs(checkpoint_dir, exist_ok=True)
        self.save_weights(os.path.join(checkpoint_dir, "distiller.weights.h5"))
        with open(os.path.join(checkpoint_dir, "progress.json"), "w") as f:
            json.dump({"completed_stages": done}, f)

    def get_config(self):
        config = super().get_config()
        student = self._student_spec
        config.update(
            teacher=keras.saving.serialize_keras_object(self.teacher),
            student=student if isinstance(student, str)
            else keras.saving.serialize_keras_object(student),
            feature_map=self.feature_map,
            attention_loss=self.attention_loss.loss,
            temperature=self.logits_loss.temperature,
            ce_weight=self.ce_weight,
            gate=self.gate,
            d_conv=self.d_conv,
            chunk_size=self.chunk_size,
            decay=self.decay,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["teacher"] = keras.saving.deserialize_keras_object(config["teacher"])
        if isinstance(config["student"], dict):
            config["student"] = keras.saving.deserialize_keras_object(config["student"])
        return cls(**config)


def _set_trainable(layer, trainable):
    # The flags of the variables themselves decide what the trainers update;
    # setting them directly does not depend on how a backend tracks sublayers.
    layer.trainable = trainable
    for variable in layer.weights:
        variable.trainable = trainable


def _stage_optimizer(optimizer, stage, steps):
    if callable(optimizer) and not isinstance(optimizer, keras.optimizers.Optimizer):
        return optimizer(stage, steps)
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return type(optimizer).from_config(optimizer.get_config())
    return keras.optimizers.get(optimizer)


def _batch_source(data, batch_size, seed):
    """`(source, tokens_per_batch)`: `source(stage_index, start)` iterates
    over `(token_ids, targets)` batches from step `start` of a stage on."""
    if isinstance(data, np.ndarray) or hasattr(data, "__array__") and not hasattr(
            data, "__next__"):
        data = np.asarray(data)
        if data.ndim != 2 or data.shape[1] < 2 or not np.issubdtype(data.dtype, np.integer):
            raise ValueError("Token data must be an int array (num_sequences, length + 1); "
                             f"received {data.dtype} {data.shape}.")
        batch_size = batch_size or 32

        def source(stage_index, start):
            # Each step's rows come from their own generator: a resumed
            # stage draws exactly the batches an uninterrupted one would.
            step = start
            while True:
                rng = np.random.default_rng([seed, stage_index, step])
                rows = data[rng.integers(0, len(data), batch_size)]
                yield rows[:, :-1].astype("int32"), rows[:, 1:].astype("int32")
                step += 1

        return source, batch_size * (data.shape[1] - 1)
    iterator = iter(data)
    first = next(iterator)
    shared = _prepend(first, iterator)

    def source(stage_index, start):
        del stage_index  # one stream, continued from stage to stage
        for _ in range(start):
            next(shared)
        return shared

    return source, _tokens_in(first)


class _StageCheckpoint(keras.callbacks.Callback):
    """Student, optimizer and step of a stage, every `every` steps.

    Each checkpoint is `stage_<name>.<step>.weights.h5` (the distiller's
    weights with its optimizer's variables, which include the step count);
    `stage_<name>.json` then names it (replaced atomically) and the older
    file goes, so an interruption at any point leaves a whole checkpoint.
    """

    def __init__(self, directory, stage, steps, every):
        super().__init__()
        self.directory, self.stage, self.steps, self.every = directory, stage, steps, every
        self.index_path = os.path.join(directory, f"stage_{stage}.json")
        self.start = 0

    def _weights(self, step):
        return os.path.join(self.directory, f"stage_{self.stage}.{step}.weights.h5")

    def _last(self):
        if not os.path.exists(self.index_path):
            return 0
        with open(self.index_path) as f:
            return int(json.load(f)["step"])

    def restore(self, model):
        """Loads the last checkpoint into `model`; returns its step (0: none)."""
        self.start = self._last()
        if self.start:
            if not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            model.load_weights(self._weights(self.start))
        return self.start

    def on_train_batch_end(self, batch, logs=None):
        step = self.start + batch + 1
        if not self.every or step % self.every or step >= self.steps:
            return
        os.makedirs(self.directory, exist_ok=True)
        previous = self._last()
        self.model.save_weights(self._weights(step))
        with open(self.index_path + ".partial", "w") as f:
            json.dump({"step": step}, f)
        os.replace(self.index_path + ".partial", self.index_path)
        if previous and previous != step and os.path.exists(self._weights(previous)):
            os.remove(self._weights(previous))

    def remove(self):
        last = self._last()
        for path in (self.index_path, self._weights(last)):
            if os.path.exists(path):
                os.remove(path)


def _prepend(first, rest):
    # A generator (what Keras' fit accepts), not an itertools.chain. A plain
    # loop, not `yield from`: when this wrapper is dropped (the next stage
    # takes the stream on), closing it must not close the shared stream.
    yield first
    for item in rest:
        yield item


def _tokens_in(first):
    token_ids = first[0]["token_ids"] if isinstance(first[0], dict) else first[0]
    shape = np.shape(token_ids)
    if len(shape) != 2:
        raise ValueError(f"Batches must be (token_ids, targets) with token_ids (batch, "
                         f"length); received token_ids of shape {shape}.")
    return int(shape[0] * shape[1])
