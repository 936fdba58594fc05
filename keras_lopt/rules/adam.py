"""Adam with decoupled weight decay, as pure `keras.ops` functions.

The branch Celo2 uses for the tensors its learned rule does not take, and
the meta-trainer's outer optimizer (bias-corrected AdamW on the meta-weights).
"""

from keras import ops

from keras_lopt.rules.guard import if_finite


def state_shapes(shape):
    """First and second moments, float32, of the parameter's shape."""
    shape = tuple(int(d) for d in shape)
    return {"m": shape, "v": shape}


def state_axes(shape):
    """The parameter axis each axis of each state entry runs along."""
    axes = tuple(range(len(tuple(shape))))
    return {"m": axes, "v": axes}


def adam_step(state, grad, iteration, beta_1=0.9, beta_2=0.95, epsilon=1e-8,
              bias_correction=False):
    """One Adam direction. Gradients are not clipped.

    With `bias_correction=False` (the variant Celo2's meta-weights were
    trained with) the step is `m / sqrt(v + eps)`; with `True` it is optax
    `adam`'s `m_hat / (sqrt(v_hat) + eps)`.

    Args:
        state: dict with float32 `m` and `v` of the parameter's shape.
        grad: the gradient.
        iteration: the 1-based count of this update (only used for bias
            correction).

    Returns:
        `(step, new_state)`.
    """
    g = ops.cast(grad, "float32")
    m = beta_1 * state["m"] + (1.0 - beta_1) * g
    v = beta_2 * state["v"] + (1.0 - beta_2) * ops.square(g)
    if bias_correction:
        t = ops.cast(iteration, "float32")
        m_hat = m / (1.0 - ops.power(beta_1, t))
        v_hat = v / (1.0 - ops.power(beta_2, t))
        step = m_hat / (ops.sqrt(v_hat) + epsilon)
    else:
        step = m / ops.sqrt(v + epsilon)
    return step, {"m": m, "v": v}


def apply_step(param, step, learning_rate, weight_decay=0.0):
    """`param - lr * step - lr * weight_decay * param`, in float32."""
    p = ops.cast(param, "float32")
    update = learning_rate * step
    if weight_decay:
        update = update + (learning_rate * weight_decay) * p
    return p - update


def update(state, gradient, param, learning_rate, iteration, weight_decay=0.0,
           beta_1=0.9, beta_2=0.95, epsilon=1e-8, bias_correction=False, batch_axes=0):
    """One guarded Adam update of one tensor: `(new_param, new_state)`.

    A gradient with any non-finite entry leaves parameter and state as they
    were (`guard.if_finite`). The new parameter is float32. With
    `batch_axes=1`, axis 0 stacks independent tensors, each guarded alone.
    """

    def step(gradient):
        direction, new_state = adam_step(
            state, gradient, iteration, beta_1, beta_2, epsilon, bias_correction
        )
        return apply_step(param, direction, learning_rate, weight_decay), new_state

    return if_finite(gradient, step, param, state, batch_axes=batch_axes)
