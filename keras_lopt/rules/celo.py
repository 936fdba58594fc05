"""The Celo (v1) update rule and its learned scheduler, as pure `keras.ops`.

One implementation, two drivers: the Keras optimizer `Celo` keeps the state
below in optimizer variables; the meta-trainer runs the same functions
inside `jax.jit`/`vmap`/`scan`. Nothing here branches on tensor values.

The rule (spec: `docs/celo.md`; Moudgil et al., "Celo: Training Versatile
Learned Optimizers on a Compute Diet", TMLR 2025) has two parts:

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

from keras_lopt.optimizers import celo2_rule

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
            for i, w in enumerate(celo2_rule.FEATURE_WIDTHS)
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


def init_theta(seed=0):
    """Fresh meta-weights: truncated-normal MLP as Celo2's, a small scheduler.

    The MLP follows `celo2_rule.init_theta` (fan-in 30 / 4). The scheduler's
    linear maps use Haiku's default (truncated normal, std 1/sqrt(fan_in));
    the `step_size` head starts with zero weights and bias `log(10)`, so
    `lr_mult = 0.1 * exp(log 10) = 1` and phase 2 starts from exactly the
    phase-1 rule (which runs with no `lr_mult`).
    """
    rng = np.random.default_rng(seed)

    def truncated(shape, fan_in):
        out = rng.standard_normal(shape)
        bad = np.abs(out) > 2.0
        while bad.any():
            out[bad] = rng.standard_normal(int(bad.sum()))
            bad = np.abs(out) > 2.0
        return (out / np.sqrt(fan_in)).astype("float32")

    theta = {}
    for name, shape in THETA_SHAPES.items():
        leaf = name.rsplit("/", 1)[-1]
        if name.startswith(MLP_PREFIX):
            if leaf.startswith("b"):
                theta[name] = np.zeros(shape, "float32")
            elif leaf.startswith("w0__"):
                theta[name] = truncated(shape, sum(celo2_rule.FEATURE_WIDTHS))
            else:
                theta[name] = truncated(shape, HIDDEN_SIZE)
        elif name.startswith("lstm_init_state"):
            theta[name] = np.zeros(shape, "float32")
        elif leaf == "b":
            theta[name] = np.zeros(shape, "float32")
        else:
            theta[name] = truncated(shape, shape[0])
    theta["rnn_params/step_size/w"] = np.zeros((LSTM_SIZE, 1), "float32")
    theta["rnn_params/step_size/b"] = np.full((1,), np.log(10.0), "float32")
    return theta


# ---------------------------------------------------------------------------
# The per-element MLP.


def state_shapes(shape):
    """Per-tensor accumulators: the same layout as Celo2's."""
    return celo2_rule.state_shapes(shape)


def init_state(shape):
    return celo2_rule.init_state(shape)


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
    ws = celo2_rule.working_shape(shape)
    axes = tuple(range(len(ws)))
    g = ops.reshape(ops.cast(grad, "float32"), ws)
    p = ops.reshape(ops.cast(param, "float32"), ws)
    g = ops.clip(g, -celo2_rule.GRAD_CLIP, celo2_rule.GRAD_CLIP)
    (direction, magnitude), new_state = celo2_rule.learned_mlp(
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
