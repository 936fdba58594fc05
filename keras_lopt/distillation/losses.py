"""Distillation losses for language models, as `keras.distillation.DistillationLoss`es.

Both take an optional `padding_mask` (1 for real tokens) so that padded
positions never contribute, and average over the real tokens.
"""

import keras
from keras import ops


def _masked_mean(values, padding_mask):
    """Mean of `(batch, length)` values over the positions where the mask is 1."""
    if padding_mask is None:
        return ops.mean(values)
    mask = ops.cast(padding_mask, values.dtype)
    return ops.sum(values * mask) / ops.maximum(ops.sum(mask), 1.0)


def token_cross_entropy(token_ids, logits, padding_mask=None):
    """Next-token cross-entropy in nats, averaged over real tokens.

    Args:
        token_ids: int `(batch, length)` targets.
        logits: `(batch, length, vocab)`.
        padding_mask: optional `(batch, length)`, 1 where the target counts.
    """
    losses = keras.losses.sparse_categorical_crossentropy(
        token_ids, ops.cast(logits, "float32"), from_logits=True)
    return _masked_mean(losses, padding_mask)


@keras.saving.register_keras_serializable(package="keras_lopt")
class TokenKLDivergence(keras.distillation.DistillationLoss):
    """KL(teacher || student) of the next-token distributions, per token.

    The standard logits-distillation loss for language models: both logits
    are divided by `temperature`, the per-token KL divergence is averaged
    over real tokens and multiplied by `temperature**2` (so that gradients
    keep their scale as the temperature changes). Computed from
    log-softmaxes in float32, so it is exact even where probabilities
    underflow.

    Args:
        temperature: softening temperature, > 0.

    Example:

    >>> kl = TokenKLDivergence(temperature=2.0)
    >>> kl.compute_loss(teacher(ids), student(ids), padding_mask=mask)
    """

    def __init__(self, temperature=1.0):
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"temperature must be a positive number; received {temperature!r}.")
        self.temperature = float(temperature)

    def compute_loss(self, teacher_outputs, student_outputs, padding_mask=None, **kwargs):
        t = ops.cast(teacher_outputs, "float32") / self.temperature
        s = ops.cast(student_outputs, "float32") / self.temperature
        log_p = ops.log_softmax(ops.stop_gradient(t), axis=-1)
        log_q = ops.log_softmax(s, axis=-1)
        kl = ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
        return _masked_mean(kl, padding_mask) * self.temperature ** 2

    def get_config(self):
        return {"temperature": self.temperature}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_lopt")
class AttentionTransferLoss(keras.distillation.DistillationLoss):
    """Layer-wise match of the student mixers' outputs to the teacher attentions'.

    Attention transfer (Hedgehog, LoLCATs): every student mixer is fed the
    teacher's hidden state at its layer and must reproduce that layer's
    attention output. Outputs are lists with one `(batch, length, width)`
    tensor per layer; the loss is the mean over layers of

    - `"mse"`: the mean squared error over real tokens and channels,
      divided by the mean square of the teacher's output at that layer (so
      every layer counts alike whatever its scale; 1.0 means "no better
      than predicting zeros"), or
    - `"cosine"`: one minus the cosine similarity per token.

    Args:
        loss: `"mse"` or `"cosine"`.

    Example:

    >>> at = AttentionTransferLoss("mse")
    >>> at.compute_loss([teacher_attention_0, ...], [student_mixer_0, ...])
    """

    LOSSES = ("mse", "cosine")

    def __init__(self, loss="mse"):
        if loss not in self.LOSSES:
            raise ValueError(f"loss must be one of {self.LOSSES}; received {loss!r}.")
        self.loss = loss

    def validate_outputs(self, teacher_outputs, student_outputs):
        if len(teacher_outputs) != len(student_outputs):
            raise ValueError(
                f"Attention transfer needs one student output per teacher layer; received "
                f"{len(student_outputs)} student and {len(teacher_outputs)} teacher outputs.")

    def _layer_loss(self, teacher, student, padding_mask):
        teacher = ops.stop_gradient(ops.cast(teacher, "float32"))
        student = ops.cast(student, "float32")
        if self.loss == "cosine":
            cosine = ops.sum(teacher * student, axis=-1) / ops.sqrt(
                ops.sum(ops.square(teacher), axis=-1) * ops.sum(ops.square(student), axis=-1)
                + 1e-12)
            return _masked_mean(1.0 - cosine, padding_mask)
        error = _masked_mean(ops.mean(ops.square(student - teacher), axis=-1), padding_mask)
        scale = _masked_mean(ops.mean(ops.square(teacher), axis=-1), padding_mask)
        return error / (scale + 1e-12)

    def compute_loss(self, teacher_outputs, student_outputs, padding_mask=None, **kwargs):
        self.validate_outputs(teacher_outputs, student_outputs)
        losses = [self._layer_loss(t, s, padding_mask)
                  for t, s in zip(teacher_outputs, student_outputs)]
        return ops.mean(ops.stack(losses))

    def get_config(self):
        return {"loss": self.loss}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
