"""`Celo2` and `Celo2Base`: the Celo2 learned update rule as Keras optimizers."""

from keras.saving import register_keras_serializable

from keras_lopt.backend import jit_when_eager
from keras_lopt.optimizers.base import LearnedOptimizer
from keras_lopt.optimizers.base import fill_base_args_doc
from keras_lopt.optimizers.schedules import scheduled
from keras_lopt.rules import adam
from keras_lopt.rules import celo2
from keras_lopt.rules import routing as routing_lib

# Compiled whole where JAX would run them op by op (`optimizer.apply` eagerly).
_celo2_update = jit_when_eager(
    celo2.update, static_argnames=("weight_decay", "orthogonalize", "batch_axes"))
_adam_update = jit_when_eager(
    adam.update,
    static_argnames=("weight_decay", "beta_1", "beta_2", "epsilon", "bias_correction",
                     "batch_axes"),
)


@fill_base_args_doc
@register_keras_serializable(package="keras_lopt")
class Celo2Base(LearnedOptimizer):
    """Celo2-base: the learned Celo2 rule applied to every variable.

    A small MLP (347 meta-weights), shared by every element of every tensor,
    maps features of the gradient history (three momenta, a second moment,
    Adafactor-style row/column statistics) to an update direction, which is
    normalised to unit RMS over the last two axes of each tensor. Unlike
    `Celo2`, there is no Newton-Schulz orthogonalisation and no Adam branch.

    Update for every variable `p` (rank-0 variables are treated as shape
    `(1,)`): `p <- p - lr * u - lr * weight_decay * p`, with `u` the learned
    direction. The rule runs in float32 whatever the variable dtype; its state
    is float32 and about 4x the parameter bytes for matrices.

    A variable whose gradient has any non-finite entry (NaN or +-inf) is left
    untouched at that step, together with its optimizer state; the others
    update normally and `iterations` advances.

    Schedule: each step has unit RMS whatever the gradient's size, so at a
    constant rate the steps never shrink and training stalls at a noise
    floor set by the rate. Give `total_steps` (warm-up + cosine to 0) or a
    schedule of your own.

    Args:
        learning_rate: float, `LearningRateSchedule`, or callable; with
            `total_steps`, a float is the peak of a warm-up + cosine
            schedule. Defaults to `1e-3` (the default weights were
            meta-trained at a peak of `1e-3` with warm-up + cosine).
        weights: meta-weights: `None` for keras-lopt's default shipped
            version, a shipped version's name (`"celo2-v1"` ... `"celo2-v4"`;
            `keras_lopt.rules.theta.SHIPPED`, each file records its
            provenance), a path to a `.npz` (keras-lopt format) or `.state`
            (the authors' flax format) file, or a dict of arrays.
        weight_decay: decoupled weight decay, scaled by the learning rate.
        total_steps: the number of updates of the run. With a float
            `learning_rate`, the rate follows
            `keras_lopt.optimizers.warmup_cosine(learning_rate, total_steps)`:
            5% linear warm-up from 0, then cosine decay to 0.
        routing: `"deployment"` (default: conv and einsum kernels as
            matrices) or `"reference"` (every tensor as it is, normalised
            per trailing 2-D slice, as in the authors' reference code).
        {{base_optimizer_keyword_args}}

    Example:

    >>> model = keras.Sequential([keras.layers.Dense(10)])
    >>> model.compile(
    ...     optimizer=keras_lopt.optimizers.Celo2Base(total_steps=1000), loss="mse")
    """

    rule = "celo2_base"
    supports_groups = True

    def __init__(self, learning_rate=0.001, weights=None, weight_decay=None,
                 total_steps=None, routing="deployment", **kwargs):
        super().__init__(
            learning_rate=scheduled(learning_rate, total_steps), weights=weights,
            weight_decay=weight_decay, routing=routing, **kwargs,
        )
        self.total_steps = total_steps

    def _rule_update(self, state, gradient, param, learning_rate, weight_decay, index,
                     batch_axes=0):
        return _celo2_update(
            self._theta(), state, gradient, param, learning_rate,
            weight_decay=weight_decay, orthogonalize=False, batch_axes=batch_axes,
        )

    def _stack_axes(self, route):
        return celo2.STACK_AXIS

    def get_config(self):
        config = super().get_config()
        config["total_steps"] = self.total_steps
        return config


@fill_base_args_doc
@register_keras_serializable(package="keras_lopt")
class Celo2(LearnedOptimizer):
    """Celo2: the learned rule on hidden matrices, Adam on the rest.

    Deployed as its authors deploy it ("distinct update rules for
    input-output and hidden weights"): the hidden layers' matrices take the
    learned Celo2 rule, whose direction is orthogonalised (Newton-Schulz, as
    in Muon) and normalised to unit RMS; biases, norms, scalars,
    embeddings, the model's input and output layers, depthwise kernels and
    layers matched by `exclude_layers` take Adam (bias-corrected, betas
    (0.9, 0.95), rate `adam_lr_ratio * learning_rate`, unclipped
    gradients). Conv kernels `(*k, cin, cout)` are seen as the
    `(prod(k) * cin, cout)` matrix they stand for, `EinsumDense` and
    `MultiHeadAttention` kernels as inputs x outputs of their projection.
    Weight decay is decoupled and scaled by each branch's rate.

    The routing is decided in `build` by `keras_lopt.rules.routing.plan`
    (the function the meta-trainer uses), which reads the model's layers:
    `fit` and `train_on_batch` hand the model over by themselves; in a
    custom loop call `optimizer.attach(model)` first. See it with
    `optimizer.routing_summary(model)`; change it with `exclude_layers`
    (to Adam) and `include_layers` (to the learned rule).

    Schedule: the learned step has unit RMS whatever the gradient's size,
    so at a constant rate it never shrinks and training stalls at a noise
    floor set by the rate. Give `total_steps` (warm-up + cosine to 0, the
    authors' schedule) or a schedule of your own.

    See `Celo2Base` for the treatment of non-finite gradients and dtypes.

    Args:
        learning_rate: float, `LearningRateSchedule`, or callable; with
            `total_steps`, a float is the peak of a warm-up + cosine
            schedule. Defaults to `1e-3`, the rate the rule was meta-trained
            with.
        weights: meta-weights: `None` for keras-lopt's default shipped
            version, a shipped version's name (`"celo2_base-v1"`, ...), a
            path (`.npz` or the authors' `.state`), or a dict of arrays.
        weight_decay: decoupled weight decay (both branches).
        total_steps: the number of updates of the run. With a float
            `learning_rate`, the rate follows
            `keras_lopt.optimizers.warmup_cosine(learning_rate, total_steps)`:
            5% linear warm-up from 0, then cosine decay to 0.
        routing: `"deployment"` (default, above) or `"reference"`: what
            the authors' reference code does to a tensor (every tensor of
            rank >= 2 that is not an embedding or excluded takes the rule,
            per trailing 2-D slice; the fidelity tests replay it).
        adam_lr_ratio: learning-rate multiplier of the Adam branch.
            Defaults to `20`.
        adam_beta_1, adam_beta_2, adam_epsilon: Adam-branch constants.
        adam_bias_correction: `True` (default) gives optax/Keras-style
            bias-corrected Adam, `m_hat / (sqrt(v_hat) + eps)`, as the
            authors deploy it; `False` gives the variant the shipped
            meta-weights were trained with, `m / sqrt(v + eps)`.
        exclude_layers: a regular expression or a list of them; variables
            whose path matches any of them take the Adam branch.
        include_layers: the same, for variables of rank >= 2 that should
            take the learned rule where the policy says Adam (an input
            layer, say). `exclude_layers` wins over it.
        exclude_embeddings: send embeddings to the Adam branch. Defaults to
            `True`.
        {{base_optimizer_keyword_args}}

    Example:

    >>> model = keras.Sequential(
    ...     [keras.Input((32,)), keras.layers.Dense(64), keras.layers.Dense(64),
    ...      keras.layers.Dense(10)])
    >>> optimizer = keras_lopt.optimizers.Celo2(total_steps=1000)
    >>> model.compile(optimizer=optimizer, loss="mse")
    >>> _ = optimizer.routing_summary(model)  # doctest: +SKIP
    """

    rule = "celo2"
    supports_groups = True

    def __init__(
        self,
        learning_rate=0.001,
        weights=None,
        weight_decay=None,
        total_steps=None,
        routing="deployment",
        adam_lr_ratio=20.0,
        adam_beta_1=0.9,
        adam_beta_2=0.95,
        adam_epsilon=1e-8,
        adam_bias_correction=True,
        exclude_layers=None,
        include_layers=None,
        exclude_embeddings=True,
        **kwargs,
    ):
        super().__init__(
            learning_rate=scheduled(learning_rate, total_steps), weights=weights,
            weight_decay=weight_decay, routing=routing, **kwargs,
        )
        self.total_steps = total_steps
        self.adam_lr_ratio = adam_lr_ratio
        self.adam_beta_1 = adam_beta_1
        self.adam_beta_2 = adam_beta_2
        self.adam_epsilon = adam_epsilon
        self.adam_bias_correction = adam_bias_correction
        self.exclude_layers = list(routing_lib.exclusion_patterns(exclude_layers))
        self.include_layers = list(routing_lib.exclusion_patterns(include_layers))
        self.exclude_embeddings = exclude_embeddings

    def _routing_options(self):
        return {
            "exclude_layers": self.exclude_layers,
            "include_layers": self.include_layers,
            "exclude_embeddings": self.exclude_embeddings,
        }

    def _rule_update(self, state, gradient, param, learning_rate, weight_decay, index,
                     batch_axes=0):
        return _celo2_update(
            self._theta(), state, gradient, param, learning_rate,
            weight_decay=weight_decay, orthogonalize=True, batch_axes=batch_axes,
        )

    def _stack_axes(self, route):
        return celo2.STACK_AXIS if route.branch == routing_lib.RULE else {}

    def _adam_update(self, state, gradient, param, learning_rate, weight_decay, index,
                     batch_axes=0):
        return _adam_update(
            state,
            gradient,
            param,
            learning_rate * self.adam_lr_ratio,
            self.iterations + 1,
            weight_decay=weight_decay,
            beta_1=self.adam_beta_1,
            beta_2=self.adam_beta_2,
            epsilon=self.adam_epsilon,
            bias_correction=self.adam_bias_correction,
            batch_axes=batch_axes,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "adam_lr_ratio": self.adam_lr_ratio,
                "adam_beta_1": self.adam_beta_1,
                "adam_beta_2": self.adam_beta_2,
                "adam_epsilon": self.adam_epsilon,
                "adam_bias_correction": self.adam_bias_correction,
                "total_steps": self.total_steps,
                "exclude_layers": self.exclude_layers,
                "include_layers": self.include_layers,
                "exclude_embeddings": self.exclude_embeddings,
            }
        )
        return config
