"""Callbacks that connect loss-aware learned optimizers to `model.fit`."""

import keras
from keras import backend
from keras import ops

from keras_lopt import backend as _backend


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
    * sets the optimizer's `T` to the number of updates at the end of this
      `fit` (`epochs x steps per epoch`, divided by the gradient
      accumulation steps, counting updates already done), unless the
      optimizer was given `total_steps` (or `set_total_steps` was called).
      When `fit` cannot know the steps
      per epoch (a generator without a length and no `steps_per_epoch`),
      it raises an error asking for `total_steps`.

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
        # Keras skips `on_train_end` when `fit` raises: drop what an
        # interrupted run may have left before installing anew.
        self._restore(model)
        outer = model.optimizer
        optimizer = getattr(outer, "inner_optimizer", outer)
        if not hasattr(optimizer, "feed_loss"):
            raise TypeError(
                "FeedLossAndHorizon serves optimizers that take the loss "
                f"(keras_lopt.optimizers.Celo); this model's optimizer is "
                f"{type(optimizer).__name__}."
            )
        self._optimizer = optimizer
        self._first_epoch = True
        self._derive_horizon = not optimizer.horizon_fixed and bool(self.params)
        if self._derive_horizon and not self.params.get("steps"):
            raise ValueError(
                "`fit` does not know the number of steps per epoch (a dataset "
                "or generator without a length?), so Celo's horizon T cannot "
                "be derived. Pass `steps_per_epoch` to `fit`, or "
                "`Celo(total_steps=T)`."
            )
        if backend.backend() == "jax":
            if type(model).train_step is not keras.Model.train_step:
                raise TypeError(
                    f"{type(model).__name__} defines its own `train_step`, which "
                    "FeedLossAndHorizon cannot hand the loss through on JAX. In "
                    "that `train_step`, call `optimizer.feed_loss(loss)` right "
                    "before `optimizer.stateless_apply(...)` (or pass `loss=` to "
                    "`optimizer.apply`), and drop this callback."
                )
            model.train_step = _backend.jax_train_step_feeding_loss(model, optimizer)
        else:
            original = outer.scale_loss

            def scale_loss(loss):
                optimizer.feed_loss(loss)
                return original(loss)

            outer.scale_loss = scale_loss
        model.make_train_function(force=True)

    def on_epoch_begin(self, epoch, logs=None):
        if not self._first_epoch:
            return
        self._first_epoch = False
        if not self._derive_horizon:
            return
        optimizer = self._optimizer
        accumulation = optimizer.gradient_accumulation_steps or 1
        # `iterations` counts updates (batches / accumulation steps).
        done = int(ops.convert_to_numpy(optimizer.iterations))
        remaining = (self.params["epochs"] - epoch) * self.params["steps"] // accumulation
        optimizer._set_horizon(max(1, done + remaining))

    @staticmethod
    def _restore(model):
        vars(model).pop("train_step", None)
        if getattr(model, "optimizer", None) is not None:
            vars(model.optimizer).pop("scale_loss", None)
        model.train_function = None

    def on_train_end(self, logs=None):
        self._restore(self.model)
