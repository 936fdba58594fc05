"""Callbacks that connect loss-aware learned optimizers to `model.fit`."""

import warnings

import keras
from keras import backend
from keras import ops

from keras_lopt import backend as _backend


# Where a model keeps the loss-feeding train function of its last fit.
_CACHE = "_keras_lopt_feeding_train_function"


def _compile_key(model, optimizer):
    # What a compiled train step depends on; `compile()` replaces the loss
    # object, so a recompiled model never reuses a stale step.
    # Objects, not ids (kept alive by the cache, so never reused).
    return (optimizer, getattr(model, "_compile_loss", None),
            model.jit_compile, model.steps_per_execution)


def _same_key(a, b):
    return a[0] is b[0] and a[1] is b[1] and a[2:] == b[2:]


class FeedLossAndHorizon(keras.callbacks.Callback):
    """Gives a loss-aware optimizer (`Celo`) each batch's loss and the horizon.

    No Keras API hands an optimizer the loss or the length of the run. For
    the duration of `fit`, this callback

    * hands the loss of every training batch (the total loss the gradients
      are taken of, before any loss scaling) to the update of that same
      batch. On TensorFlow and torch it wraps the optimizer's `scale_loss`,
      which every Keras `train_step` calls on the loss; on JAX, where that
      loss lives inside `jax.value_and_grad`, it swaps in Keras's own JAX
      `train_step` with the hand-over added. Works for Sequential,
      Functional and subclassed models that keep Keras's `train_step`. A
      custom `train_step` should hand the loss over itself, with
      `optimizer.apply(grads, vars, loss=loss)` (on JAX,
      `optimizer.feed_loss(loss)` before `optimizer.stateless_apply`); on
      JAX this callback refuses such a model rather than replace its step;
    * sets the optimizer's `T`, once: the first `fit` sets it to the number
      of updates at its end (`epochs x steps per epoch`, divided by the
      gradient accumulation steps, counting updates already done, so
      `fit(initial_epoch=...)` resumes the same plan), unless the optimizer
      was given `total_steps` (or `set_total_steps` was called). Later fits
      keep that `T`, and warn when they would run past it: the learned
      schedule is never stretched silently. Past `T` the scheduler's
      progress stays at 1. A loaded model keeps the `T` it was saved with.
      When `fit` cannot know the steps
      per epoch (a generator without a length and no `steps_per_epoch`),
      it raises an error asking for `total_steps`.

    The train function compiled with the hand-over is kept on the model and
    reused by the next `fit` with the same optimizer: repeated fits compile
    once.

    `LossScaleOptimizer` (e.g. the `mixed_float16` policy) is looked through.
    `tf.distribute` strategies with several replicas are not supported (the
    loss fed would be one replica's).
    Outside `fit` (loops of `model.train_on_batch`), `attach(model)` installs
    the loss hand-over alone; give the optimizer `total_steps` then.

    Example:

    >>> model.compile(optimizer=keras_lopt.optimizers.Celo(), loss="mse")
    >>> model.fit(x, y, epochs=3, callbacks=[FeedLossAndHorizon()])
    """

    @classmethod
    def attach(cls, model):
        """Installs the loss hand-over on a compiled `model` outside `fit`.

        Returns the callback; its `detach()` restores the model.

        Example:

        >>> model.compile(optimizer=Celo(total_steps=100), loss="mse")
        >>> feed = FeedLossAndHorizon.attach(model)
        >>> for x, y in batches:
        ...     model.train_on_batch(x, y)
        >>> feed.detach()
        """
        callback = cls()
        callback.set_model(model)
        callback.on_train_begin()
        return callback

    def detach(self):
        """Undoes `attach`."""
        self.on_train_end()

    def on_train_begin(self, logs=None):
        model = self.model
        outer = model.optimizer
        if "train_step" in vars(model) or "scale_loss" in vars(outer):
            # Keras skips `on_train_end` when `fit` raises: drop what an
            # interrupted run left before installing anew.
            self._restore(model)
        optimizer = getattr(outer, "inner_optimizer", outer)
        if not hasattr(optimizer, "feed_loss"):
            raise TypeError(
                "FeedLossAndHorizon serves optimizers that take the loss "
                f"(keras_lopt.optimizers.Celo); this model's optimizer is "
                f"{type(optimizer).__name__}."
            )
        self._optimizer = optimizer
        self._first_epoch = True
        # T is derived once, by the first `fit`; later fits keep it (see
        # `on_epoch_begin`), so a second `fit` never stretches the schedule.
        self._derive_horizon = (
            not optimizer.horizon_fixed and optimizer.horizon is None and bool(self.params)
        )
        if self._derive_horizon and not self.params.get("steps"):
            raise ValueError(
                "`fit` does not know the number of steps per epoch (a dataset "
                "or generator without a length?), so Celo's horizon T cannot "
                "be derived. Pass `steps_per_epoch` to `fit`, or "
                "`Celo(total_steps=T)`."
            )
        if backend.backend() == "jax" and type(model).train_step is not keras.Model.train_step:
            raise TypeError(
                f"{type(model).__name__} defines its own `train_step`, which "
                "FeedLossAndHorizon cannot hand the loss through on JAX. In "
                "that `train_step`, call `optimizer.feed_loss(loss)` right "
                "before `optimizer.stateless_apply(...)` (or pass `loss=` to "
                "`optimizer.apply`), and drop this callback."
            )
        self._previous_function = model.train_function
        cached = vars(model).get(_CACHE)
        if cached is not None and _same_key(cached[0], _compile_key(model, optimizer)):
            # The compiled step of an earlier fit with this optimizer: reuse
            # it rather than compile the same step again.
            _, patch, model.train_function = cached
            self._install(model, outer, patch)
            return
        if backend.backend() == "jax":
            patch = _backend.jax_train_step_feeding_loss(model, optimizer)
        else:
            original = outer.scale_loss

            def patch(loss):
                optimizer.feed_loss(loss)
                return original(loss)

        self._install(model, outer, patch)
        model.make_train_function(force=True)

    @staticmethod
    def _install(model, outer, patch):
        if backend.backend() == "jax":
            model.train_step = patch
        else:
            outer.scale_loss = patch

    def on_epoch_begin(self, epoch, logs=None):
        if not self._first_epoch:
            return
        self._first_epoch = False
        optimizer = self._optimizer
        if optimizer.horizon_fixed or not self.params or not self.params.get("steps"):
            return
        accumulation = optimizer.gradient_accumulation_steps or 1
        # `iterations` counts updates (batches / accumulation steps).
        done = int(ops.convert_to_numpy(optimizer.iterations))
        remaining = (self.params["epochs"] - epoch) * self.params["steps"] // accumulation
        end = max(1, done + remaining)
        if self._derive_horizon:
            optimizer._set_horizon(end)
        elif end > optimizer.horizon:
            warnings.warn(
                f"This fit runs Celo to update {end}, past the horizon T = "
                f"{optimizer.horizon} an earlier fit set. T is kept (past it, "
                "the scheduler's progress stays at 1: the learned schedule is "
                "not stretched). To plan the longer run, call "
                f"`optimizer.set_total_steps({end})` before this fit.",
                stacklevel=2,
            )

    @staticmethod
    def _restore(model, keep=None):
        vars(model).pop("train_step", None)
        if getattr(model, "optimizer", None) is not None:
            vars(model.optimizer).pop("scale_loss", None)
        model.train_function = keep

    def on_train_end(self, logs=None):
        model = self.model
        patch = vars(model).get("train_step") or vars(model.optimizer).get("scale_loss")
        if patch is not None and model.train_function is not None:
            vars(model)[_CACHE] = (
                _compile_key(model, self._optimizer), patch, model.train_function
            )
        self._restore(model, keep=self._previous_function)
