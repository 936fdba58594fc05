"""The Celo (v1) update rule and its learned scheduler, as pure `keras.ops`.

One implementation, two drivers: the Keras optimizer `Celo` keeps the state
below in optimizer variables; the meta-trainer runs the same functions
inside `jax.jit`/`vmap`/`scan`. Both call `scheduler_update` once per update
and `update` once per tensor. Nothing here branches on tensor values.

The rule (Moudgil et al., "Celo: Training Versatile Learned Optimizers on a
Compute Diet", TMLR 2025) has two parts:

* a per-element MLP (30 -> 4 -> 4 -> 3) on the Celo2 features, giving a
  direction `d` and a log-magnitude `a`; the step of a tensor `p` is
  `1e-3 * d * exp(1e-3 * a) * rms(p) * lr_mult`;
* a scheduler: one LSTM cell per tensor, fed with the training progress
  `t / T` and features of a buffer of loss EMAs, whose head gives `lr_mult`
  (and the softmax mixing a bank of MLPs).

Meta-weights are a flat dict whose keys are the paths of the authors'
checkpoint (`THETA_SHAPES`).
"""

import numpy as np
from keras import ops

from keras_lopt.rules import celo2
from keras_lopt.rules.guard import if_finite

MLP_PREFIX = "ff_mod_stack/~/"
HIDDEN_SIZE = 4
LSTM_SIZE = 64
RMS_DECAY = 0.999
STEP_MULT = 1e-3
EXP_MULT = 1e-3
N_LOSS_EMAS = 10
PROGRESS_CENTRES = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)
N_SCHEDULER_INPUTS = len(PROGRESS_CENTRES) + N_LOSS_EMAS - 1


def theta_shapes(bank_size=1):
    """Shapes of Celo's meta-weights; `bank_size` MLPs mixed by the scheduler."""
    k = bank_size
    shapes = {
        **{
            f"{MLP_PREFIX}w0__{i}": (k, w, HIDDEN_SIZE)
            for i, w in enumerate(celo2.FEATURE_WIDTHS)
        },
        f"{MLP_PREFIX}b0": (k, HIDDEN_SIZE),
        f"{MLP_PREFIX}w1": (k, HIDDEN_SIZE, HIDDEN_SIZE),
        f"{MLP_PREFIX}b1": (k, HIDDEN_SIZE),
        f"{MLP_PREFIX}w2": (k, HIDDEN_SIZE, 3),
        f"{MLP_PREFIX}b2": (k, 3),
        "lstm_init_state/hidden": (1, LSTM_SIZE),
        "lstm_init_state/cell": (1, LSTM_SIZE),
        "rnn_params/rnn/linear/w": (2 * LSTM_SIZE, 4 * LSTM_SIZE),
        "rnn_params/rnn/linear/b": (4 * LSTM_SIZE,),
        "rnn_params/rnn_to_controls/w": (LSTM_SIZE, k),
        "rnn_params/rnn_to_controls/b": (k,),
        "rnn_params/step_size/w": (LSTM_SIZE, 1),
        "rnn_params/step_size/b": (1,),
    }
    for name in ("linear", "linear_1", "linear_2"):
        shapes[f"rnn_params/{name}/w"] = (N_SCHEDULER_INPUTS, LSTM_SIZE)
        shapes[f"rnn_params/{name}/b"] = (LSTM_SIZE,)
    return shapes


THETA_SHAPES = theta_shapes(1)
MLP_KEYS = tuple(k for k in THETA_SHAPES if k.startswith(MLP_PREFIX))
SCHEDULER_KEYS = tuple(k for k in THETA_SHAPES if not k.startswith(MLP_PREFIX))


# ---------------------------------------------------------------------------
# The per-element MLP.


def mix_mlp(theta, control=None):
    """The MLP bank mixed by the scheduler's softmax `control` (bank,).

    The bank is combined with a MEAN over members of `control_k * W_k`, as in
    the reference; with one member and no scheduler this is the member.
    """
    mixed = {}
    for key in MLP_KEYS:
        w = ops.convert_to_tensor(theta[key])
        if control is not None:
            c = ops.reshape(control, (-1,) + (1,) * (len(w.shape) - 1))
            w = w * ops.cast(c, w.dtype)
        mixed[key[len(MLP_PREFIX):]] = ops.mean(w, axis=0)
    return mixed


def celo_step(mlp, state, grad, param):
    """One Celo step for one tensor, before the scheduler's `lr_mult`.

    Args:
        mlp: the mixed MLP weights (`mix_mlp`), names without the prefix.
        state: accumulators as made by `init_state(param.shape)`.
        grad: the gradient; computed in float32 and clipped to +-1000.
        param: the current parameter value.

    Returns:
        `(delta, new_state)`, `delta = 1e-3 * d * exp(1e-3 * a) * rms(p)`
        in float32 with the parameter's shape; the update is
        `param - lr_mult * delta`.
    """
    shape = tuple(grad.shape)
    ws = celo2.working_shape(shape)
    axes = tuple(range(len(ws)))
    g = ops.reshape(ops.cast(grad, "float32"), ws)
    p = ops.reshape(ops.cast(param, "float32"), ws)
    g = ops.clip(g, -celo2.GRAD_CLIP, celo2.GRAD_CLIP)
    (direction, magnitude), new_state = celo2.learned_mlp(
        state,
        g,
        p,
        mlp,
        columns=(0, 1),
        rms_decay=RMS_DECAY,
        rho_eps=1e-6,
        norm_axes=axes,
        norm_eps=1e-5,
        full_width_unfactored=True,
    )
    scale = ops.sqrt(ops.mean(ops.square(p)) + 1e-9)
    delta = (STEP_MULT * direction) * ops.exp(EXP_MULT * magnitude) * scale
    return ops.reshape(delta, shape), new_state


def update(mlp, state, gradient, param, scale, loss_ok=None, weight_decay=0.0):
    """One guarded Celo update of one tensor: `(new_param, new_state)`.

    `param - scale * (delta + 1e-3 * weight_decay * param)`, with `delta`
    from `celo_step` and `scale` the learning-rate multiplier times the
    scheduler's `lr_mult` for this tensor. A gradient with any non-finite
    entry, or `loss_ok` false, leaves parameter and state as they were.
    """

    def step(gradient):
        delta, new_state = celo_step(mlp, state, gradient, param)
        p = ops.cast(param, "float32")
        if weight_decay:
            delta = delta + (STEP_MULT * weight_decay) * p
        return p - scale * delta, new_state

    return if_finite(gradient, step, param, state, also=loss_ok)


# ---------------------------------------------------------------------------
# The loss buffer and progress features.


def loss_decays(total_steps):
    """The 10 EMA decays `exp(-1 / h)`, `h = logspace(1, log10(T), 10)`.

    A Python number gives float64 math rounded once to float32, exactly as
    the reference; a tensor (meta-training, where `T` varies per run) gives
    the same formula in float32.
    """
    if isinstance(total_steps, (int, float, np.integer, np.floating)):
        h = np.logspace(1.0, np.log10(float(total_steps)), N_LOSS_EMAS)
        return np.exp(-1.0 / h).astype("float32")
    log_t = ops.log(ops.cast(total_steps, "float32")) / np.log(10.0)
    frac = ops.convert_to_tensor(np.linspace(0.0, 1.0, N_LOSS_EMAS).astype("float32"))
    h = ops.power(10.0, 1.0 + frac * (log_t - 1.0))
    return ops.exp(-1.0 / h)


def init_loss_buffer():
    """`means` (10,), running minimum `minimum` (10,), loss `count` ()."""
    return {
        "means": ops.zeros((N_LOSS_EMAS,), "float32"),
        "minimum": ops.full((N_LOSS_EMAS,), np.inf, "float32"),
        "count": ops.zeros((), "float32"),
    }


def update_loss_buffer(buffer, loss, decays):
    """Adds one loss to the buffer; returns `(features (9,), new_buffer)`.

    Every loss after the first is first capped at twice the largest
    bias-corrected EMA, so one spike cannot dominate the buffer.
    """
    loss = ops.cast(loss, "float32")
    decays = ops.cast(decays, "float32")
    means, count = buffer["means"], buffer["count"]
    cap = 2.0 * ops.abs(ops.max(means / (1.0 - ops.power(decays, count + 1.0))))
    loss = ops.where(count > 0, ops.minimum(loss, cap), loss)
    count = count + 1.0
    means = decays * means + (1.0 - decays) * loss
    corrected = means / (1.0 - ops.power(decays, count))
    minimum = ops.minimum(buffer["minimum"], corrected)
    ratio = (corrected[:-1] - minimum[:-1]) / ops.maximum(
        1e-8, corrected[1:] - minimum[:-1]
    )
    features = ops.clip(ratio - 1.0, -1.0, 1.0)
    features = ops.where(count > 2.0, features, ops.zeros_like(features))
    return features, {"means": means, "minimum": minimum, "count": count}


def progress_features(t, total_steps):
    """`tanh(10 (t / T - s))` for the 9 centres `s`; `t` updates done so far."""
    tau = ops.cast(t, "float32") / ops.cast(total_steps, "float32")
    centres = ops.convert_to_tensor(np.asarray(PROGRESS_CENTRES, "float32"))
    return ops.tanh(10.0 * (tau - centres))


# ---------------------------------------------------------------------------
# The LSTM scheduler.


def init_lstm_state(theta, n_tensors):
    """The learned initial state, one row per tensor: `(hidden, cell)`."""
    ones = ops.ones((n_tensors, 1), "float32")
    hidden = ones * ops.convert_to_tensor(theta["lstm_init_state/hidden"])
    cell = ones * ops.convert_to_tensor(theta["lstm_init_state/cell"])
    return hidden, cell


def _linear(theta, name, x):
    return ops.matmul(x, ops.convert_to_tensor(theta[f"rnn_params/{name}/w"])) + (
        ops.convert_to_tensor(theta[f"rnn_params/{name}/b"])
    )


def scheduler_step(theta, hidden, cell, inputs):
    """One LSTM step for all tensors at once.

    Args:
        theta: the meta-weights (scheduler keys are used).
        hidden, cell: `(n_tensors, 64)`, the state after the previous step.
        inputs: `(n_tensors, 18)`: progress features then loss features.

    Returns:
        `(lr_mult (n,), control (n, bank), hidden, cell)`.
    """
    # The reference also computes `rnn_params/linear` and discards it.
    mix = ops.max(ops.relu(_linear(theta, "linear_1", inputs)), axis=0, keepdims=True)
    x = _linear(theta, "linear_2", inputs) + mix
    gates = _linear(theta, "rnn/linear", ops.concatenate([x, hidden], axis=-1))
    i, g, f, o = ops.split(gates, 4, axis=-1)
    cell = ops.sigmoid(f + 1.0) * cell + ops.sigmoid(i) * ops.tanh(g)
    hidden = ops.sigmoid(o) * ops.tanh(cell)
    logits = _linear(theta, "rnn_to_controls", hidden)
    # Written out: Keras warns on a softmax over a size-1 axis (one MLP).
    control = ops.exp(logits - ops.max(logits, axis=-1, keepdims=True))
    control = control / ops.sum(control, axis=-1, keepdims=True)
    lr_mult = 0.1 * ops.exp(_linear(theta, "step_size", hidden)[:, 0])
    return lr_mult, control, hidden, cell


def scheduler_inputs(t, total_steps, loss_features, n_tensors):
    """The 18 inputs, identical for every tensor, as `(n_tensors, 18)`."""
    row = ops.concatenate([progress_features(t, total_steps), loss_features])
    return ops.ones((n_tensors, 1), "float32") * ops.expand_dims(row, 0)


# ---------------------------------------------------------------------------
# One scheduler update, as both drivers run it.

SCHEDULER_STATE = ("means", "minimum", "count", "hidden", "cell")


def init_scheduler_state(theta, n_tensors):
    """The loss buffer empty and the LSTM at its learned initial state."""
    hidden, cell = init_lstm_state(theta, n_tensors)
    return dict(init_loss_buffer(), hidden=hidden, cell=cell)


def scheduler_update(theta, state, loss, t, total_steps, decays, use_scheduler=True):
    """Feeds one training loss to the scheduler of all `n` tensors.

    The loss enters the buffer, the buffer's features and the progress
    `t / T` feed the LSTM, whose head gives each tensor's `lr_mult` and its
    mix of the MLP bank. A non-finite loss changes nothing: every entry of
    the state is kept and `loss_ok` is false, so that the caller skips the
    whole update (`update(..., loss_ok=)`).

    Args:
        theta: the meta-weights (scheduler keys are used).
        state: dict with `SCHEDULER_STATE` entries: the loss buffer
            (`init_loss_buffer`) and the LSTM `hidden`, `cell` `(n, 64)`.
        loss: the scalar training loss of the batch being applied.
        t: updates done so far; `total_steps`: the run's `T`.
        decays: `loss_decays(T)`.
        use_scheduler: `False` gives `lr_mult = 1` and no mix (the rule of
            the first meta-training phase); the buffer still advances.

    Returns:
        `(lr_mult (n,), control (n, bank) or None, loss_ok, new_state)`.
    """
    loss = ops.cast(loss, "float32")
    loss_ok = ops.isfinite(loss)
    buffer = {k: state[k] for k in ("means", "minimum", "count")}
    features, new_state = update_loss_buffer(buffer, ops.where(loss_ok, loss, 0.0), decays)
    n = state["hidden"].shape[0]
    if use_scheduler:
        inputs = scheduler_inputs(t, total_steps, features, n)
        lr_mult, control, hidden, cell = scheduler_step(
            theta, state["hidden"], state["cell"], inputs
        )
    else:
        lr_mult, control = ops.ones((n,), "float32"), None
        hidden, cell = state["hidden"], state["cell"]
    new_state.update(hidden=hidden, cell=cell)
    new_state = {k: ops.where(loss_ok, new_state[k], state[k]) for k in SCHEDULER_STATE}
    return lr_mult, control, loss_ok, new_state
