"""`Celo2` and `Celo2Base`: the Celo2 learned update rule as Keras optimizers."""

import os
import re

from keras import backend
from keras import ops
from keras import optimizers
from keras.saving import register_keras_serializable

from keras_lopt.optimizers import celo2_rule
from keras_lopt.backend import densify
from keras_lopt.backend import jit_when_eager
from keras_lopt.optimizers.checkpoints import load_theta
from keras_lopt.optimizers.checkpoints import validate_theta

_WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")


# A variable whose gradient is not all finite keeps its value and state. The
# skip is a `cond`, not `where(finite, new, old)`: with `where`, XLA on CPU
# kept old and new state side by side and split the fused rule into separate
# passes, which made Celo2Base's jitted step 5x AdamW's instead of 3.3x.
def _rule_update(theta, state, gradient, param, learning_rate, weight_decay, orthogonalize):
    def update():
        step, new_state = celo2_rule.celo2_step(
            theta, state, gradient, param, orthogonalize=orthogonalize
        )
        return celo2_rule.apply_step(param, step, learning_rate, weight_decay), new_state

    return _if_finite(gradient, update, param, state)


def _adam_update(state, gradient, param, learning_rate, weight_decay, iteration, **adam):
    def update():
        step, new_state = celo2_rule.adam_step(state, gradient, iteration, **adam)
        return celo2_rule.apply_step(param, step, learning_rate, weight_decay), new_state

    return _if_finite(gradient, update, param, state)


def _if_finite(gradient, update, param, state, also=None):
    """`update()` if `gradient` is all finite (and `also`), else the float32
    parameter and the state as they are."""
    ok = ops.all(ops.isfinite(gradient))
    if also is not None:
        ok = ops.logical_and(ok, also)
    return ops.cond(
        ok,
        update,
        lambda: (ops.cast(param, "float32"), dict(state)),
    )


_rule_update = jit_when_eager(_rule_update, static_argnames=("weight_decay", "orthogonalize"))
_adam_update = jit_when_eager(
    _adam_update,
    static_argnames=("weight_decay", "beta_1", "beta_2", "epsilon", "bias_correction"),
)

try:
    from keras.src.optimizers.base_optimizer import (
        base_optimizer_keyword_args as _BASE_ARGS_DOC,
    )
except ImportError:  # a private name of Keras; only docstrings use it
    _BASE_ARGS_DOC = "Any other argument of `keras.optimizers.Optimizer`."


def _variable_path(variable):
    # Raw TensorFlow variables have no `path`; their name is the closest thing.
    return getattr(variable, "path", None) or getattr(variable, "name", "") or ""


def _check_float(variable):
    dtype = str(getattr(variable.dtype, "name", variable.dtype))
    if "float" not in dtype:
        raise TypeError(
            f"Learned optimizers update floating-point variables only; "
            f"{_variable_path(variable)!r} has dtype {dtype}."
        )


@register_keras_serializable(package="keras_lopt")
class Celo2Base(optimizers.Optimizer):
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

    _orthogonalize = False
    _default_weights_file = "celo2_base.npz"

    def __init__(
        self,
        learning_rate=0.001,
        weights=None,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name=None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            name=name or self.__class__.__name__.lower(),
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **kwargs,
        )
        self.theta = self._load_weights(weights)

    def _load_weights(self, weights):
        if weights is None:
            path = os.path.join(_WEIGHTS_DIR, self._default_weights_file)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"keras-lopt's shipped weights {path!r} are missing from "
                    "this installation; pass `weights=` explicitly."
                )
            weights = path
        theta = load_theta(weights)
        return validate_theta(
            theta, celo2_rule.THETA_SHAPES, what=f"{self.__class__.__name__} weights"
        )

    def _uses_rule(self, variable):
        return True

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._routes = [None] * len(var_list)
        self._rule_states = [None] * len(var_list)
        self._adam_states = [None] * len(var_list)
        for var in var_list:
            if self._overwrite_variable_with_gradient(var):
                continue
            _check_float(var)
            index = self._get_variable_index(var)
            prefix = _variable_path(var).replace("/", "_").replace(":", "_")
            if self._uses_rule(var):
                self._routes[index] = "rule"
                self._rule_states[index] = {
                    key: self.add_variable(
                        shape, dtype="float32", name=f"{prefix}_{key}"
                    )
                    for key, shape in celo2_rule.state_shapes(var.shape).items()
                }
            else:
                self._routes[index] = "adam"
                self._adam_states[index] = {
                    key: self.add_variable(
                        tuple(var.shape), dtype="float32", name=f"{prefix}_adam_{key}"
                    )
                    for key in ("m", "v")
                }
        self._theta_tensors = None

    def _theta(self):
        # Graph backends (jax tracing, tf.function) must create the constants
        # inside each trace; only eager torch can reuse one set of tensors.
        if backend.backend() != "torch":
            return self.theta
        if self._theta_tensors is None:
            self._theta_tensors = {
                k: ops.convert_to_tensor(v) for k, v in self.theta.items()
            }
        return self._theta_tensors

    def _apply_weight_decay(self, variables):
        # Decay is applied inside `update_step`, with the branch's learning
        # rate and after the rule has seen the un-decayed parameter.
        return

    def _decay(self, variable):
        if not self.weight_decay or not self._use_weight_decay(variable):
            return 0.0
        return self.weight_decay

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        lr = ops.cast(learning_rate, "float32")
        gradient = densify(gradient)
        if self._routes[index] == "rule":
            slots = self._rule_states[index]
            state = {k: v.value if hasattr(v, "value") else v for k, v in slots.items()}
            new_value, new_state = _rule_update(
                self._theta(),
                state,
                gradient,
                variable,
                lr,
                weight_decay=self._decay(variable),
                orthogonalize=self._orthogonalize,
            )
        else:
            slots = self._adam_states[index]
            state = {k: v.value if hasattr(v, "value") else v for k, v in slots.items()}
            new_value, new_state = _adam_update(
                state,
                gradient,
                variable,
                lr * self.adam_lr_ratio,
                weight_decay=self._decay(variable),
                iteration=self.iterations + 1,
                beta_1=self.adam_beta_1,
                beta_2=self.adam_beta_2,
                epsilon=self.adam_epsilon,
                bias_correction=self.adam_bias_correction,
            )
        for key, slot in slots.items():
            self.assign(slot, new_state[key])
        self.assign(variable, ops.cast(new_value, variable.dtype))

    def get_config(self):
        config = super().get_config()
        # The meta-weights themselves (347 numbers), never a path or "the
        # shipped ones": a saved model then loads anywhere, and keeps its
        # weights when a later release ships new defaults.
        config["weights"] = {k: v.tolist() for k, v in self.theta.items()}
        return config


@register_keras_serializable(package="keras_lopt")
class Celo2(Celo2Base):
    """Celo2: the learned rule with Newton-Schulz orthogonalisation.

    Variables of rank >= 2 that are not embeddings (and not excluded through
    `exclude_layers`) take the learned Celo2 rule, whose direction is
    orthogonalised per trailing 2-D slice (as in Muon) and normalised to unit
    RMS. All other variables (biases, norms, scalars, embeddings, excluded
    layers) take an Adam rule with learning rate `adam_lr_ratio *
    learning_rate` and unclipped gradients. Weight decay is decoupled and
    scaled by each branch's learning rate. The routing is decided in
    `build`, from each variable's rank and path.

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
        exclude_layers: list of regular expressions; variables whose path
            matches any of them take the Adam branch.
        exclude_embeddings: send variables whose path contains "embedding"
            to the Adam branch. Defaults to `True`.
        {{base_optimizer_keyword_args}}

    Example:

    >>> model = keras.Sequential([keras.layers.Dense(64), keras.layers.Dense(10)])
    >>> model.compile(optimizer=keras_lopt.optimizers.Celo2(), loss="mse")
    """

    _orthogonalize = True
    _default_weights_file = "celo2.npz"

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
            learning_rate=learning_rate,
            weights=weights,
            weight_decay=weight_decay,
            **kwargs,
        )
        self.adam_lr_ratio = adam_lr_ratio
        self.adam_beta_1 = adam_beta_1
        self.adam_beta_2 = adam_beta_2
        self.adam_epsilon = adam_epsilon
        self.adam_bias_correction = adam_bias_correction
        self.exclude_layers = list(exclude_layers or [])
        self.exclude_embeddings = exclude_embeddings

    def _uses_rule(self, variable):
        if len(variable.shape) < 2:
            return False
        path = _variable_path(variable)
        if self.exclude_embeddings and "embedding" in path.lower():
            return False
        return not any(re.search(pattern, path) for pattern in self.exclude_layers)

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


# Fill in the base optimizer arguments, as Keras does for its own optimizers.
Celo2Base.__doc__ = Celo2Base.__doc__.replace(
    "{{base_optimizer_keyword_args}}", _BASE_ARGS_DOC
)
Celo2.__doc__ = Celo2.__doc__.replace(
    "{{base_optimizer_keyword_args}}", _BASE_ARGS_DOC
)
