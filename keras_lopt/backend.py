"""The one home of backend-specific code in keras-lopt.

Everything else is written with `keras.ops`. Each function here exists
because one backend needs something `keras.ops` does not express (a JAX
transformation, TensorFlow's sparse gradients, a loop TensorFlow cannot
scan); every other backend gets the plain `keras.ops` behaviour.

Public helpers:

* `compile_step(model)`: a `CausalLM.step` compiled with `jax.jit` on JAX,
  used by `generate`; reads the current variable values at every call.
* `jit_when_eager(fn)`: compile a pure function as a whole where JAX would
  run it op by op.

The others serve the optimizers (`densify`, `no_grad`,
`grouped_updates_allowed`, `derived_layout`, `compiles_elementwise_fusions`,
`means`, `jax_train_step_feeding_loss`) and the sequence kernels
(`rematerialize`, `scan`).
"""

import functools

import keras
from keras import backend
from keras import ops

# -- optimizers --------------------------------------------------------------

def densify(gradient):
    """Turns TensorFlow's `IndexedSlices` (embedding gradients) dense.

    keras.ops keep them sparse, but the learned rules need every element.
    """
    if backend.backend() == "tensorflow" and hasattr(gradient, "dense_shape"):
        import tensorflow as tf

        return tf.convert_to_tensor(gradient)
    return gradient


def no_grad():
    """A context without autograd recording (torch); nothing elsewhere.

    Keras' torch optimizer runs its per-variable updates under
    `torch.no_grad`; the grouped update must too, or eager torch records a
    graph through every stacked state.
    """
    if backend.backend() == "torch":
        import torch

        return torch.no_grad()
    import contextlib

    return contextlib.nullcontext()


def grouped_updates_allowed(prefer=None):
    """Whether an optimizer may update variables in groups (`prefer`:
    `True` / `False` to decide where the backend allows either).

    Not on JAX: XLA fuses each variable's rule well, while a stacked group
    (copies in and out of the stack) ran 1.3-1.6x slower per step (8
    (512, 512) matrices, Celo2 / Celo2Base) for 30-50% less compile time,
    and the per-variable first step already meets its target there. Not
    inside a `tf.distribute` strategy, whose per-variable `extended.update`
    the TensorFlow optimizer must go through.
    """
    if backend.backend() == "tensorflow":
        import tensorflow as tf

        if tf.distribute.has_strategy():
            return False
    if prefer is not None:
        return bool(prefer)
    return backend.backend() != "jax"


def derived_layout(layout, groups):
    """The layout of a tensor whose axes run along `groups` of the axes of
    a tensor laid out as `layout` (see `routing.state_axes`); `None` where
    `layout` is `None` (no distribution, or a backend without layouts).

    A state axis takes its tensor axis's sharding; one that merges
    contiguous axes takes the outermost one's when the others are whole on
    every device (an outer axis cut in blocks cuts the merged axis in
    blocks), else it is replicated, as is an axis of the state's own.
    Only a `keras.distribution.TensorLayout` (what Keras's distributions
    give variables) is followed; any other layout leaves the state as Keras
    would make it.
    """
    from keras import distribution

    if not isinstance(layout, distribution.TensorLayout):
        return None
    axes = tuple(layout.axes)

    def sharding(group):
        names = [axes[i] if i < len(axes) else None for i in group]
        if names and names[0] is not None and all(n is None for n in names[1:]):
            return names[0]
        return None

    return distribution.TensorLayout([sharding(group) for group in groups], layout.device_mesh)


def compiles_elementwise_fusions(x):
    """Whether long element-wise expressions on `x` compile into one fused loop.

    True when `x` is being traced by JAX (`jit`, `vmap`, `scan`: Keras'
    `fit` and the meta-trainer): Celo2's MLP then runs as ~330 multiply-adds
    per element without ever materialising its 30-channel input. Eager code
    (TensorFlow and torch eager, `optimizer.apply` on JAX outside `jit`)
    instead runs it as three matmuls over a stacked channel tensor, which
    costs memory but hundreds fewer dispatched operations.
    """
    if backend.backend() == "jax":
        return _is_jax_tracer(x)
    if backend.backend() == "tensorflow":
        return _in_xla_context()
    return False


def _in_xla_context():
    # TensorFlow under XLA (`model.compile(jit_compile=True)`, Keras's
    # default on GPU) fuses like JAX does; a private function is the only
    # way to ask, so any failure means "no".
    try:
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util

        if tf.executing_eagerly():
            return False
        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except Exception:  # noqa: BLE001
        return False


def _is_jax_tracer(x):
    import jax

    return isinstance(x, jax.core.Tracer)


def jit_when_eager(rule, static_argnames=()):
    """`rule`, compiled as a whole when JAX would run it op by op.

    Eager JAX (`optimizer.apply` outside `jit`) compiles every primitive
    separately for each new shape: the first Celo step on a handful of
    tensors took ~50 s and later steps ~0.2 s, against ~0.02 s compiled.
    Under tracing (Keras' `fit`, the meta-trainer) and on other backends
    `rule` runs as is. Mappings become dicts and variables their values,
    so that `jax.jit` sees plain pytrees of arrays.
    """
    if backend.backend() != "jax":
        return rule
    import jax

    compiled = jax.jit(rule, static_argnames=static_argnames)

    def plain(x):
        if hasattr(x, "items"):
            return {k: plain(v) for k, v in x.items()}
        return x.value if hasattr(x, "value") and hasattr(x, "assign") else x

    @functools.wraps(rule)
    def call(*args, **kwargs):
        args = [plain(a) for a in args]
        kwargs = {k: v if k in static_argnames else plain(v) for k, v in kwargs.items()}
        traced = [v for k, v in kwargs.items() if k not in static_argnames]
        if any(_is_jax_tracer(x) for x in jax.tree_util.tree_leaves([args, traced])):
            return rule(*args, **kwargs)
        return compiled(*args, **kwargs)

    return call


def means(values, axes):
    """`[mean(x, axes, keepdims=True) for x in values]`, in one pass on JAX.

    XLA on CPU materialises the operand of every separate reduction, which
    made Celo2's 18 per-channel normalisers cost more than the rest of the
    rule together; one variadic `lax.reduce` computes them in a single loop.
    Eager JAX would recompile that reduction at every call, so it is only
    used under tracing.
    """
    if len(values) == 1 or backend.backend() != "jax" or \
            not compiles_elementwise_fusions(values[0]):
        return [ops.mean(x, axis=axes, keepdims=True) for x in values]
    import jax

    rank = len(values[0].shape)
    dims = tuple(sorted(a % rank for a in axes))
    count = 1
    for d in dims:
        count *= values[0].shape[d]
    shape = tuple(1 if d in dims else s for d, s in enumerate(values[0].shape))
    values = tuple(jax.numpy.broadcast_to(x, values[0].shape) for x in values)
    zeros = tuple(jax.numpy.zeros((), x.dtype) for x in values)
    sums = jax.lax.reduce(
        values, zeros, lambda a, b: tuple(x + y for x, y in zip(a, b)), dims
    )
    return [jax.numpy.reshape(s, shape) / count for s in sums]


def jax_train_step_feeding_loss(model, optimizer):
    """A JAX `train_step` that hands the batch loss to `optimizer.feed_loss`.

    Keras's JAX `train_step` computes the loss inside `jax.value_and_grad`
    and calls the optimizer right after, with nothing in between: a loss
    captured inside the gradient transformation cannot be used outside it.
    This is that same `train_step` with one line added before the update.
    """
    import jax
    from keras.utils import unpack_x_y_sample_weight

    def train_step(state, data):
        trainable, non_trainable, optimizer_vars, metrics_vars = state
        x, y, sample_weight = unpack_x_y_sample_weight(data)
        grad_fn = jax.value_and_grad(model.compute_loss_and_updates, has_aux=True)
        (_, aux), grads = grad_fn(
            trainable,
            non_trainable,
            metrics_vars,
            x,
            y,
            sample_weight,
            training=True,
            optimizer_variables=optimizer_vars,
        )
        unscaled_loss, y_pred, non_trainable, metrics_vars = aux
        optimizer.feed_loss(unscaled_loss)
        trainable, optimizer_vars = model.optimizer.stateless_apply(
            optimizer_vars, grads, trainable
        )
        logs, metrics_vars = model._update_metrics_variables(
            metrics_vars, unscaled_loss, x, y, y_pred, sample_weight
        )
        return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)

    return train_step


# -- sequence kernels ----------------------------------------------------------


def rematerialize(fn):
    """Recompute `fn`'s intermediates in the backward pass instead of storing them.

    Used on the body of a chunk loop so that training memory holds one
    chunk's `(batch, chunk, d_inner, d_state)` tensors, not one per chunk.
    JAX offers this as `jax.checkpoint`; elsewhere `fn` is returned as is
    (TensorFlow and torch keep every chunk's intermediates for backward).
    """
    if keras.backend.backend() == "jax":
        import jax

        return jax.checkpoint(fn)
    return fn


def scan(fn, init, xs):
    """`keras.ops.scan` over the leading axis of the tuple `xs`.

    Keras' TensorFlow `scan` requires each per-step output to have the
    carry's shape, which the chunk loops do not satisfy; on TensorFlow the
    (short, static) loop over chunks is therefore unrolled in Python.
    """
    if keras.backend.backend() != "tensorflow":
        return ops.scan(fn, init, xs)
    carry, outputs = init, []
    for i in range(xs[0].shape[0]):
        carry, y = fn(carry, tuple(x[i] for x in xs))
        outputs.append(y)
    return carry, ops.stack(outputs)


# -- models ---------------------------------------------------------------------


def compile_step(model):
    """`model.step` compiled where that pays off: `jax.jit` on JAX.

    The jitted function reads the model's current variable values on every
    call (they are passed in, not captured), so training between
    `generate` calls is seen. TensorFlow and torch run `model.step` eagerly.
    """
    if keras.backend.backend() != "jax":
        return model.step
    import jax

    variables = model.trainable_variables + model.non_trainable_variables

    def stateless_step(values, token_ids, caches):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return model.step(token_ids, caches)

    jitted = jax.jit(stateless_step)
    return lambda token_ids, caches: jitted([v.value for v in variables], token_ids, caches)
