"""`Celo`: the Celo learned optimizer with its learned, loss-aware scheduler."""

import os

import numpy as np
from keras import ops
from keras import optimizers
from keras.saving import register_keras_serializable

from keras_lopt.optimizers import celo_rule
from keras_lopt.backend import densify
from keras_lopt.backend import jit_when_eager
from keras_lopt.optimizers.celo2 import _BASE_ARGS_DOC
from keras_lopt.optimizers.celo2 import Celo2Base
from keras_lopt.optimizers.celo2 import _check_float
from keras_lopt.optimizers.celo2 import _if_finite
from keras_lopt.optimizers.celo2 import _variable_path
from keras_lopt.optimizers.checkpoints import load_theta
from keras_lopt.optimizers.checkpoints import validate_theta

_WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")


def _celo_update(mlp, state, gradient, param, scale, loss_ok, weight_decay):
    # Skipped with a `cond` rather than `where`, as in `celo2._rule_update`.
    def update():
        delta, new_state = celo_rule.celo_step(mlp, state, gradient, param)
        p = ops.cast(param, "float32")
        if weight_decay:
            delta = delta + (celo_rule.STEP_MULT * weight_decay) * p
        return p - scale * delta, new_state

    return _if_finite(gradient, update, param, state, also=loss_ok)


_celo_update = jit_when_eager(_celo_update, static_argnames=("weight_decay",))

_NEEDS_LOSS = (
    "Celo needs the training loss of the batch it updates on. In `fit`, pass "
    "`callbacks=[keras_lopt.callbacks.FeedLossAndHorizon()]`; in a custom "
    "loop, call `optimizer.apply(grads, variables, loss=loss)`."
)
_NEEDS_HORIZON = (
    "Celo needs the total number of updates `T` of the run (its scheduler "
    "sees the progress t / T). Pass `Celo(total_steps=T)`, call "
    "`optimizer.set_total_steps(T)`, or train with `fit` and "
    "`callbacks=[keras_lopt.callbacks.FeedLossAndHorizon()]`, which sets "
    "T = epochs x steps per epoch."
)


def _check_total_steps(total_steps):
    if total_steps is None:
        return None
    if isinstance(total_steps, bool) or not float(total_steps).is_integer():
        raise ValueError(f"`total_steps` must be a positive integer; received {total_steps!r}.")
    if int(total_steps) <= 0:
        raise ValueError(
            f"`total_steps` must be a positive integer (the number of "
            f"updates of the run); received {total_steps!r}."
        )
    return int(total_steps)


@register_keras_serializable(package="keras_lopt")
class Celo(optimizers.Optimizer):
    """Celo: a learned per-element MLP driven by a learned LSTM scheduler.

    Every element of every variable goes through a tiny MLP (30 features ->
    4 -> 4 -> direction, log-magnitude) of its gradient history; the step of
    a variable `p` is `1e-3 * d * exp(1e-3 * a) * rms(p)`, times `lr_mult`.
    `lr_mult` comes from an LSTM that sees the progress `t / T` through the
    run and features of the recent training losses: a learned, loss-aware
    learning-rate schedule (warm-up, decay, reaction to loss spikes). There
    is no Adam branch and no orthogonalisation.

    The optimizer therefore needs, at every update, the current batch's loss
    and the run's total number of updates `T`:

    * in `model.fit`, add the `keras_lopt.callbacks.FeedLossAndHorizon()`
      callback: it hands each batch's loss to the update of that batch (any
      `keras.Model`, on every backend) and sets `T = epochs x steps per
      epoch / gradient_accumulation_steps` unless `total_steps` was given;
    * in a custom loop, give `total_steps` and call
      `optimizer.apply(grads, variables, loss=loss)`.

    A non-finite loss skips the whole update (variables, accumulators, loss
    buffer and LSTM state stay as they were; `iterations` advances); a
    variable with a non-finite gradient is left untouched together with its
    accumulators. Training past `T` is allowed: the progress features
    saturate. Each variable keeps its own LSTM row, as in training (all
    rows receive the same inputs, so they move together).

    Args:
        learning_rate: a multiplier on the learned step (float or schedule).
            Celo has no learning rate of its own; the default `1.0` is the
            rule exactly as meta-trained.
        weights: meta-weights: `None` for keras-lopt's shipped weights, a
            path to a `.npz` (keras-lopt format) or `.state` (the authors'
            format, e.g. their released `theta.state`), or a dict of arrays
            keyed by checkpoint path (`celo_rule.THETA_SHAPES`).
        total_steps: the number of updates `T` of the run; `None` to have
            the `fit` callback set it.
        use_scheduler: `False` runs the MLP alone with `lr_mult = 1` (the
            rule as in the first meta-training phase).
        weight_decay: decoupled weight decay, scaled like the step:
            `p <- p - lr * lr_mult * 1e-3 * weight_decay * p`.
        {{base_optimizer_keyword_args}}

    Example:

    >>> model.compile(optimizer=keras_lopt.optimizers.Celo(), loss="mse")
    >>> model.fit(x, y, epochs=3,
    ...           callbacks=[keras_lopt.callbacks.FeedLossAndHorizon()])
    """

    _default_weights_file = "celo.npz"

    def __init__(
        self,
        learning_rate=1.0,
        weights=None,
        total_steps=None,
        use_scheduler=True,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name="celo",
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            name=name,
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
        self.bank_size = int(self.theta["rnn_params/rnn_to_controls/b"].shape[0])
        self.total_steps = _check_total_steps(total_steps)
        self.use_scheduler = use_scheduler
        self._horizon_known = self.total_steps is not None
        self._horizon_fixed = self.total_steps is not None
        self._pending_horizon = self.total_steps
        self._pending_loss = None
        self._step_loss = None

    def _load_weights(self, weights):
        if weights is None:
            path = os.path.join(_WEIGHTS_DIR, self._default_weights_file)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"keras-lopt's shipped Celo weights {path!r} are missing "
                    "from this installation; pass `weights=` explicitly."
                )
            weights = path
        theta = load_theta(weights, module=None)
        bank = theta.get("rnn_params/rnn_to_controls/b")
        bank_size = int(np.shape(bank)[0]) if bank is not None and np.ndim(bank) else 1
        return validate_theta(
            theta, celo_rule.theta_shapes(bank_size), what="Celo weights"
        )

    # -- the horizon and the loss ------------------------------------------

    def set_total_steps(self, total_steps):
        """Sets the run's number of updates `T` (scheduler progress `t / T`).

        A `T` set here (or given as `total_steps`) is kept by the `fit`
        callback. Changing `T` mid-run changes the loss EMAs' decays from
        then on; the EMAs already accumulated are kept.
        """
        self._set_horizon(total_steps)
        self._horizon_fixed = True

    @property
    def horizon_fixed(self):
        """Whether `T` was given by the user (then `fit` does not set it)."""
        return self._horizon_fixed

    def _set_horizon(self, total_steps):
        total_steps = _check_total_steps(total_steps)
        self._horizon_known = True
        self._pending_horizon = total_steps
        if self.built:
            self._horizon.assign(float(total_steps))
            self._loss_decays.assign(celo_rule.loss_decays(total_steps))

    @property
    def horizon(self):
        """The `T` in use, or `None` while unknown."""
        if not self._horizon_known:
            return None
        if self.built:
            return int(round(float(ops.convert_to_numpy(self._horizon.value))))
        return self._pending_horizon

    @property
    def lr_mult(self):
        """The scheduler's multiplier at the latest update (a float).

        On JAX, `fit` keeps the optimizer state away from its variables
        between steps; a callback reading this mid-epoch calls
        `model.jax_state_sync()` first.
        """
        value = self._last_lr_mult.value
        if value is None:
            raise RuntimeError(
                "Celo's state is held by a running JAX `fit`; call "
                "`model.jax_state_sync()` before reading `lr_mult`."
            )
        return float(ops.convert_to_numpy(value))

    def feed_loss(self, loss):
        """Hands the loss of the batch about to be applied to the optimizer."""
        self._pending_loss = loss

    def apply(self, grads, trainable_variables=None, loss=None):
        """Applies `grads`; `loss` is the training loss of this batch.

        Without `loss`, the loss handed over by the `fit` callback is used.
        """
        if loss is not None:
            self._pending_loss = loss
        return super().apply(grads, trainable_variables)

    def _take_loss(self):
        loss, self._pending_loss = self._pending_loss, None
        if loss is None:
            raise ValueError(_NEEDS_LOSS)
        loss = ops.stop_gradient(ops.cast(loss, "float32"))
        if len(loss.shape) != 0:
            raise ValueError(
                f"Celo needs the batch loss as a scalar; received shape {tuple(loss.shape)}."
            )
        return loss

    # -- variables ----------------------------------------------------------

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        n = len(var_list)
        self._rule_states = [None] * n
        for var in var_list:
            if self._overwrite_variable_with_gradient(var):
                continue
            _check_float(var)
            index = self._get_variable_index(var)
            prefix = _variable_path(var).replace("/", "_").replace(":", "_")
            self._rule_states[index] = {
                key: self.add_variable(shape, dtype="float32", name=f"{prefix}_{key}")
                for key, shape in celo_rule.state_shapes(var.shape).items()
            }
        # NumPy, not ops: `build` may run inside a TensorFlow graph.
        hidden, cell = (
            np.tile(self.theta[f"lstm_init_state/{k}"], (max(n, 1), 1))
            for k in ("hidden", "cell")
        )
        self._lstm_hidden = self.add_variable(
            hidden.shape, initializer=lambda shape, dtype: hidden, name="lstm_hidden"
        )
        self._lstm_cell = self.add_variable(
            cell.shape, initializer=lambda shape, dtype: cell, name="lstm_cell"
        )
        buffer = celo_rule.init_loss_buffer()
        self._loss_means = self.add_variable(
            buffer["means"].shape, initializer="zeros", name="loss_means"
        )
        self._loss_minimum = self.add_variable(
            buffer["minimum"].shape,
            initializer=lambda shape, dtype: np.full(shape, np.inf, "float32"),
            name="loss_minimum",
        )
        self._loss_count = self.add_variable((), initializer="zeros", name="loss_count")
        horizon = float(self._pending_horizon or 0)
        decays = celo_rule.loss_decays(self._pending_horizon or 2)
        self._horizon = self._add_scalar("horizon", horizon)
        self._loss_decays = self.add_variable(
            decays.shape, initializer=lambda shape, dtype: decays, name="loss_decays"
        )
        self._loss_sum = self.add_variable((), initializer="zeros", name="loss_sum")
        self._last_lr_mult = self._add_scalar("last_lr_mult", 0.0)
        self._theta_tensors = None

    def _add_scalar(self, name, value):
        return self.add_variable(
            (), initializer=lambda shape, dtype: np.asarray(value, "float32"), name=name
        )

    def load_own_variables(self, store):
        super().load_own_variables(store)
        if self.built and float(ops.convert_to_numpy(self._horizon.value)) > 0:
            self._horizon_known = True
            self._pending_horizon = self.horizon

    # The same constant handling as Celo2's: cached only on eager torch.
    _theta = Celo2Base._theta

    # -- the update ---------------------------------------------------------

    def _apply_weight_decay(self, variables):
        # Applied inside `update_step`, scaled like the learned step.
        return

    def _backend_apply_gradients(self, grads, trainable_variables):
        loss = self._take_loss()
        steps = self.gradient_accumulation_steps
        if not steps:
            self._step_loss = loss
            super()._backend_apply_gradients(grads, trainable_variables)
        else:
            # The update sees the mean loss of the batches it accumulates.
            total = self._loss_sum.value + loss
            is_update = (self._iterations + 1) % steps == 0
            self._step_loss = total / steps
            super()._backend_apply_gradients(grads, trainable_variables)
            self._loss_sum.assign(ops.where(is_update, 0.0, total))
        self._step_loss = None

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if not self._horizon_known:
            raise ValueError(_NEEDS_HORIZON)
        loss = self._step_loss
        loss_ok = ops.isfinite(loss)
        theta = self._theta()
        n = self._lstm_hidden.shape[0]
        steps = self.gradient_accumulation_steps or 1
        t = ops.floor_divide(ops.cast(self._iterations, "float32"), float(steps))
        buffer = {
            "means": self._loss_means.value,
            "minimum": self._loss_minimum.value,
            "count": self._loss_count.value,
        }
        features, new_buffer = celo_rule.update_loss_buffer(
            buffer, ops.where(loss_ok, loss, 0.0), self._loss_decays.value
        )
        if self.use_scheduler:
            inputs = celo_rule.scheduler_inputs(t, self._horizon.value, features, n)
            lr_mult, control, hidden, cell = celo_rule.scheduler_step(
                theta, self._lstm_hidden.value, self._lstm_cell.value, inputs
            )
            self._lstm_hidden.assign(ops.where(loss_ok, hidden, self._lstm_hidden.value))
            self._lstm_cell.assign(ops.where(loss_ok, cell, self._lstm_cell.value))
        else:
            lr_mult = ops.ones((n,), "float32")
            control = None
        for key, var in (
            ("means", self._loss_means),
            ("minimum", self._loss_minimum),
            ("count", self._loss_count),
        ):
            var.assign(ops.where(loss_ok, new_buffer[key], var.value))
        self._last_lr_mult.assign(ops.where(loss_ok, lr_mult[0], self._last_lr_mult.value))
        self._lr_mult = lr_mult
        self._loss_ok = loss_ok
        # One bank member: the softmax weight is exactly 1, so the mixed MLP
        # is the member itself and needs no per-variable work.
        self._control = control if self.bank_size > 1 else None
        self._shared_mlp = None if self._control is not None else celo_rule.mix_mlp(theta)
        try:
            super()._backend_update_step(grads, trainable_variables, learning_rate)
        finally:
            self._lr_mult = self._control = self._shared_mlp = self._loss_ok = None

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        slots = self._rule_states[index]
        gradient = densify(gradient)
        if self._control is None:
            mlp = self._shared_mlp
        else:
            mlp = celo_rule.mix_mlp(self._theta(), self._control[index])
        state = {k: v.value if hasattr(v, "value") else v for k, v in slots.items()}
        scale = ops.cast(learning_rate, "float32") * self._lr_mult[index]
        use_decay = self.weight_decay and self._use_weight_decay(variable)
        new_value, new_state = _celo_update(
            mlp, state, gradient, variable, scale, self._loss_ok,
            weight_decay=self.weight_decay if use_decay else 0.0,
        )
        for key, slot in slots.items():
            self.assign(slot, new_state[key])
        self.assign(variable, ops.cast(new_value, variable.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                # The meta-weights themselves, so that a saved model loads
                # anywhere and keeps them when a release ships new defaults.
                "weights": {k: v.tolist() for k, v in self.theta.items()},
                "total_steps": self.total_steps,
                "use_scheduler": self.use_scheduler,
            }
        )
        return config


# Fill in the base optimizer arguments, as Keras does for its own optimizers.
Celo.__doc__ = Celo.__doc__.replace(
    "{{base_optimizer_keyword_args}}", _BASE_ARGS_DOC
)
