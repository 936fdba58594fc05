"""`Celo`: the Celo learned optimizer with its learned, loss-aware scheduler."""

import numpy as np
from keras import ops
from keras.saving import register_keras_serializable

from keras_lopt.backend import jit_when_eager
from keras_lopt.optimizers.base import LearnedOptimizer
from keras_lopt.optimizers.base import fill_base_args_doc
from keras_lopt.rules import celo

_celo_update = jit_when_eager(celo.update, static_argnames=("weight_decay",))

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


@fill_base_args_doc
@register_keras_serializable(package="keras_lopt")
class Celo(LearnedOptimizer):
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
        weights: meta-weights: `None` for keras-lopt's default shipped
            version, a shipped version's name (`"celo-v1"`, `"celo-v2"`;
            `keras_lopt.rules.theta.SHIPPED`), a path to a `.npz` (keras-lopt format) or `.state` (the authors'
            format, e.g. their released `theta.state`), or a dict of arrays
            keyed by checkpoint path (`keras_lopt.rules.celo.THETA_SHAPES`).
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

    rule = "celo"

    def __init__(
        self,
        learning_rate=1.0,
        weights=None,
        total_steps=None,
        use_scheduler=True,
        weight_decay=None,
        name="celo",
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            weights=weights,
            weight_decay=weight_decay,
            name=name,
            **kwargs,
        )
        self.bank_size = int(self.theta["rnn_params/rnn_to_controls/b"].shape[0])
        self.total_steps = _check_total_steps(total_steps)
        self.use_scheduler = use_scheduler
        self._horizon_known = self.total_steps is not None
        self._horizon_fixed = self.total_steps is not None
        self._pending_horizon = self.total_steps
        self._pending_loss = None
        self._step_loss = None

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
            self._loss_decays.assign(celo.loss_decays(total_steps))

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
        # One scheduler row per variable, as in training. NumPy, not ops:
        # `build` may run inside a TensorFlow graph.
        n = max(len(var_list), 1)
        initial = {
            "hidden": np.tile(self.theta["lstm_init_state/hidden"], (n, 1)),
            "cell": np.tile(self.theta["lstm_init_state/cell"], (n, 1)),
            "means": np.zeros((celo.N_LOSS_EMAS,), "float32"),
            "minimum": np.full((celo.N_LOSS_EMAS,), np.inf, "float32"),
            "count": np.zeros((), "float32"),
        }
        names = {"hidden": "lstm_hidden", "cell": "lstm_cell", "means": "loss_means",
                 "minimum": "loss_minimum", "count": "loss_count"}
        # Created in this order so that saved optimizer states keep loading.
        self._scheduler_state = {
            key: self._add_array(names[key], initial[key])
            for key in ("hidden", "cell", "means", "minimum", "count")
        }
        horizon = float(self._pending_horizon or 0)
        decays = celo.loss_decays(self._pending_horizon or 2)
        self._horizon = self._add_array("horizon", np.asarray(horizon, "float32"))
        self._loss_decays = self._add_array("loss_decays", decays)
        self._loss_sum = self._add_array("loss_sum", np.zeros((), "float32"))
        self._last_lr_mult = self._add_array("last_lr_mult", np.zeros((), "float32"))

    def _add_array(self, name, value):
        value = np.asarray(value, "float32")
        return self.add_variable(
            value.shape, initializer=lambda shape, dtype: value, name=name
        )

    def load_own_variables(self, store):
        super().load_own_variables(store)
        if self.built and float(ops.convert_to_numpy(self._horizon.value)) > 0:
            self._horizon_known = True
            self._pending_horizon = self.horizon

    # -- the update ---------------------------------------------------------

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
        theta = self._theta()
        steps = self.gradient_accumulation_steps or 1
        t = ops.floor_divide(ops.cast(self._iterations, "float32"), float(steps))
        state = {k: v.value for k, v in self._scheduler_state.items()}
        lr_mult, control, loss_ok, new_state = celo.scheduler_update(
            theta, state, self._step_loss, t, self._horizon.value,
            self._loss_decays.value, use_scheduler=self.use_scheduler,
        )
        for key, var in self._scheduler_state.items():
            var.assign(new_state[key])
        self._last_lr_mult.assign(ops.where(loss_ok, lr_mult[0], self._last_lr_mult.value))
        self._lr_mult = lr_mult
        self._loss_ok = loss_ok
        # One bank member: the softmax weight is exactly 1, so the mixed MLP
        # is the member itself and needs no per-variable work.
        self._control = control if self.bank_size > 1 else None
        self._shared_mlp = None if self._control is not None else celo.mix_mlp(theta)
        try:
            super()._backend_update_step(grads, trainable_variables, learning_rate)
        finally:
            self._lr_mult = self._control = self._shared_mlp = self._loss_ok = None

    def _rule_update(self, state, gradient, param, learning_rate, weight_decay, index):
        if self._control is None:
            mlp = self._shared_mlp
        else:
            mlp = celo.mix_mlp(self._theta(), self._control[index])
        return _celo_update(
            mlp, state, gradient, param, learning_rate * self._lr_mult[index],
            self._loss_ok, weight_decay=weight_decay,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {"total_steps": self.total_steps, "use_scheduler": self.use_scheduler}
        )
        return config
