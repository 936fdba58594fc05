"""`Celo2` and `Celo2Base`: the Celo2 learned update rule as Keras optimizers."""

from keras.saving import register_keras_serializable

from keras_lopt.backend import jit_when_eager
from keras_lopt.optimizers.base import LearnedOptimizer
from keras_lopt.optimizers.base import fill_base_args_doc
from keras_lopt.optimizers.base import variable_path
from keras_lopt.rules import adam
from keras_lopt.rules import celo2
from keras_lopt.rules import routing

# Compiled whole where JAX would run them op by op (`optimizer.apply` eagerly).
_celo2_update = jit_when_eager(celo2.update, static_argnames=("weight_decay", "orthogonalize"))
_adam_update = jit_when_eager(
    adam.update,
    static_argnames=("weight_decay", "beta_1", "beta_2", "epsilon", "bias_correction"),
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

    Args:
        learning_rate: float, `LearningRateSchedule`, or callable. The rule
            was meta-trained with a constant `1e-3`. Defaults to `1e-3`.
        weights: meta-weights: `None` for keras-lopt's shipped weights, a path
            to a `.npz` (keras-lopt format) or `.state` (the authors' flax
            format) file, or a dict of arrays.
        weight_decay: decoupled weight decay, scaled by the learning rate.
        {{base_optimizer_keyword_args}}

    Example:

    >>> model = keras.Sequential([keras.layers.Dense(10)])
    >>> model.compile(optimizer=keras_lopt.optimizers.Celo2Base(), loss="mse")
    """

    rule = "celo2_base"

    def __init__(self, learning_rate=0.001, weights=None, weight_decay=None, **kwargs):
        super().__init__(
            learning_rate=learning_rate, weights=weights, weight_decay=weight_decay, **kwargs
        )

    def _rule_update(self, state, gradient, param, learning_rate, weight_decay, index):
        return _celo2_update(
            self._theta(), state, gradient, param, learning_rate,
            weight_decay=weight_decay, orthogonalize=False,
        )


@fill_base_args_doc
@register_keras_serializable(package="keras_lopt")
class Celo2(LearnedOptimizer):
    """Celo2: the learned rule with Newton-Schulz orthogonalisation.

    Variables of rank >= 2 that are not embeddings (and not excluded through
    `exclude_layers`) take the learned Celo2 rule, whose direction is
    orthogonalised per trailing 2-D slice (as in Muon) and normalised to unit
    RMS. All other variables (biases, norms, scalars, embeddings, excluded
    layers) take an Adam rule with learning rate `adam_lr_ratio *
    learning_rate` and unclipped gradients. Weight decay is decoupled and
    scaled by each branch's learning rate. The routing is decided in
    `build`, from each variable's rank and path, by
    `keras_lopt.rules.routing.route` (the function the meta-trainer uses).

    See `Celo2Base` for the treatment of non-finite gradients and dtypes.

    Args:
        learning_rate: float, `LearningRateSchedule`, or callable. Defaults to
            `1e-3`, the value the rule was meta-trained with.
        weights: meta-weights: `None` for keras-lopt's shipped weights, a path
            (`.npz` or the authors' `.state`), or a dict of arrays.
        weight_decay: decoupled weight decay (both branches).
        adam_lr_ratio: learning-rate multiplier of the Adam branch.
            Defaults to `20`.
        adam_beta_1, adam_beta_2, adam_epsilon: Adam-branch constants.
        adam_bias_correction: `False` (default) gives the variant the
            meta-weights were trained with, `m / sqrt(v + eps)`; `True` gives
            optax/Keras-style bias-corrected Adam, `m_hat / (sqrt(v_hat) + eps)`.
        exclude_layers: a regular expression or a list of them; variables
            whose path matches any of them take the Adam branch.
        exclude_embeddings: send variables whose path contains "embedding"
            to the Adam branch. Defaults to `True`.
        {{base_optimizer_keyword_args}}

    Example:

    >>> model = keras.Sequential([keras.layers.Dense(64), keras.layers.Dense(10)])
    >>> model.compile(optimizer=keras_lopt.optimizers.Celo2(), loss="mse")
    """

    rule = "celo2"

    def __init__(
        self,
        learning_rate=0.001,
        weights=None,
        weight_decay=None,
        adam_lr_ratio=20.0,
        adam_beta_1=0.9,
        adam_beta_2=0.95,
        adam_epsilon=1e-8,
        adam_bias_correction=False,
        exclude_layers=None,
        exclude_embeddings=True,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate, weights=weights, weight_decay=weight_decay, **kwargs
        )
        self.adam_lr_ratio = adam_lr_ratio
        self.adam_beta_1 = adam_beta_1
        self.adam_beta_2 = adam_beta_2
        self.adam_epsilon = adam_epsilon
        self.adam_bias_correction = adam_bias_correction
        self.exclude_layers = list(routing.exclusion_patterns(exclude_layers))
        self.exclude_embeddings = exclude_embeddings

    def _route(self, variable):
        return routing.route(
            variable.shape,
            variable_path(variable),
            self.rule,
            exclude_layers=self.exclude_layers,
            exclude_embeddings=self.exclude_embeddings,
        )

    def _rule_update(self, state, gradient, param, learning_rate, weight_decay, index):
        return _celo2_update(
            self._theta(), state, gradient, param, learning_rate,
            weight_decay=weight_decay, orthogonalize=True,
        )

    def _adam_update(self, state, gradient, param, learning_rate, weight_decay, index):
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
                "exclude_layers": self.exclude_layers,
                "exclude_embeddings": self.exclude_embeddings,
            }
        )
        return config
