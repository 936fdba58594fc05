"""The Celo2 update rule as pure `keras.ops` functions.

These functions are the single implementation of the Celo2 math. The Keras
optimizers (`Celo2`, `Celo2Base`) wrap them in optimizer variables, and the
meta-trainer (`keras_lopt.meta`) calls them inside `jax.jit`/`vmap`/`scan`.
Nothing here branches on tensor values; every branch is on static shapes.
Celo (`rules.celo`) reuses the accumulators, features and MLP
(`learned_mlp`) with its own constants.

Moudgil et al., "Celo2: Towards Learned Optimization Free Lunch" (ICLR 2026).
"""

import numpy as np
from keras import ops

from keras_lopt.backend import compiles_elementwise_fusions
from keras_lopt.backend import means
from keras_lopt.rules.adam import apply_step
from keras_lopt.rules.guard import if_finite

MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAY = 0.95
ADAFACTOR_DECAYS = (0.9, 0.99, 0.999)
HIDDEN_SIZE = 8
GRAD_CLIP = 1000.0
# Widths of the 14 input feature groups, in the order of the `w0__k` blocks.
FEATURE_WIDTHS = (1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3)
UNFACTORED_GROUPS = 9
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5

THETA_SHAPES = {
    **{f"w0__{k}": (w, HIDDEN_SIZE) for k, w in enumerate(FEATURE_WIDTHS)},
    "b0": (HIDDEN_SIZE,),
    "w1": (HIDDEN_SIZE, HIDDEN_SIZE),
    "b1": (HIDDEN_SIZE,),
    "w2": (HIDDEN_SIZE, 3),
    "b2": (3,),
}


def working_shape(shape):
    """Rank-0 tensors are handled as shape (1,), as in the reference."""
    shape = tuple(int(d) for d in shape)
    return shape if shape else (1,)


def factored_dims(shape, batch_axes=0):
    """`(d0, d1)`: the largest and second-largest axes (stable argsort).

    Returns `None` for tensors of rank < 2, which keep unfactored
    accumulators. The first `batch_axes` axes stack independent tensors
    (see `update`): the axes are chosen within one tensor's shape.
    """
    shape = working_shape(tuple(shape)[batch_axes:])
    if len(shape) < 2:
        return None
    # Plain Python on the static shape (a stable argsort): NumPy here would
    # be traced as tensor code by torch.compile.
    order = sorted(range(len(shape)), key=lambda axis: shape[axis])
    return order[-1] + batch_axes, order[-2] + batch_axes


# Where a group of tensors stacks each accumulator (`update(batch_axes=1)`):
# the decay channel stays first.
STACK_AXIS = {"mom": 1, "rms": 0, "v_diag": 1, "v_row": 1, "v_col": 1}


def state_shapes(shape):
    """Shapes of the per-tensor state for a parameter of `shape`.

    Decay channels come first: `mom` is `(3, *shape)`, `rms` is `shape`;
    factored tensors keep `v_row` (axis d0 removed) and `v_col` (axis d1
    removed), unfactored ones `v_diag`, each with a leading axis of 3.
    """
    shape = working_shape(shape)
    shapes = {"mom": (3,) + shape, "rms": shape}
    dims = factored_dims(shape)
    if dims is None:
        shapes["v_diag"] = (3,) + shape
    else:
        d0, d1 = dims
        shapes["v_row"] = (3,) + tuple(s for i, s in enumerate(shape) if i != d0)
        shapes["v_col"] = (3,) + tuple(s for i, s in enumerate(shape) if i != d1)
    return shapes


def state_axes(shape):
    """For each entry of `state_shapes(shape)`: the parameter axis each of
    its axes runs along (`None`: an axis of its own, the decay channels).

    Lets a driver lay out the state like its parameter (sharding).
    """
    rank = len(tuple(shape))
    own = tuple(range(rank)) if rank else (None,)
    axes = {"mom": (None,) + own, "rms": own}
    dims = factored_dims(shape)
    if dims is None:
        axes["v_diag"] = (None,) + own
    else:
        d0, d1 = dims
        axes["v_row"] = (None,) + tuple(a for a in own if a != d0)
        axes["v_col"] = (None,) + tuple(a for a in own if a != d1)
    return axes


def init_state(shape):
    """All-zero float32 state for a parameter of `shape`."""
    return {k: ops.zeros(s, "float32") for k, s in state_shapes(shape).items()}


def _decays(values, rank):
    return ops.reshape(ops.convert_to_tensor([float(v) for v in values], "float32"),
                       (len(values),) + (1,) * rank)


def _norm_axes(rank):
    return (-1,) if rank == 1 else (-2, -1)


def _inv_rms(x, axes, eps=1e-9):
    return ops.rsqrt(ops.mean(ops.square(x), axis=axes, keepdims=True) + eps)


def newton_schulz(x, steps=NS_STEPS):
    """Approximately orthogonalises every trailing 2-D slice of `x`."""
    a, b, c = NS_COEFFICIENTS
    rank = len(x.shape)
    transpose = x.shape[-2] > x.shape[-1]
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    if transpose:
        x = ops.transpose(x, perm)
    x = x / (ops.sqrt(ops.sum(ops.square(x), axis=(-2, -1), keepdims=True)) + 1e-8)
    for _ in range(steps):
        gram = ops.matmul(x, ops.transpose(x, perm))
        poly = b * gram + c * ops.matmul(gram, gram)
        x = a * x + ops.matmul(poly, x)
    if transpose:
        x = ops.transpose(x, perm)
    return x


def _first_layer_blocks(theta):
    """Row blocks of the first layer, one `(width, hidden)` tensor per group."""
    return [ops.convert_to_tensor(theta[f"w0__{k}"]) for k in range(len(FEATURE_WIDTHS))]


def _mlp_matmul(elem, norm_eps, w_elem, bias_terms, mlp, ws, lead, columns):
    """The MLP as three matmuls over channels stacked on a leading axis.

    Channels first, `(..., channels, elements)`: stacking then copies whole
    contiguous tensors, the normalisers are one pass over the stack, and
    every layer's output rows are contiguous (a trailing channel axis made
    eager torch spend more time in the stack than in the matmuls). The bias
    terms are added to the first layer's output one broadcast shape at a
    time.
    """
    n_elem = len(elem)
    k = len(lead)
    slice_size = int(np.prod(ws[k:]))
    hidden_size = int(w_elem.shape[-1])
    x = ops.reshape(ops.stack(elem, axis=k), lead + (n_elem, slice_size))
    mean_sq = ops.mean(ops.square(x), axis=-1)  # lead + (channels,)
    scale = ops.expand_dims(ops.rsqrt(mean_sq + norm_eps), -2)
    w0 = scale * ops.transpose(w_elem)  # lead + (hidden, channels)
    hidden = ops.reshape(ops.matmul(w0, x), lead + (hidden_size,) + ws[k:])
    for term in bias_terms:
        # (..., hidden) with broadcast axes -> the hidden axis after `lead`.
        term = ops.convert_to_tensor(term)
        if len(term.shape) > 1:
            term = ops.moveaxis(term, -1, k)
        else:
            term = ops.reshape(term, (hidden_size,) + (1,) * (len(ws) - k))
        hidden = hidden + term
    hidden = ops.reshape(ops.relu(hidden), lead + (hidden_size, slice_size))
    hidden = ops.relu(ops.matmul(ops.transpose(mlp["w1"]), hidden)
                      + ops.reshape(mlp["b1"], (hidden_size, 1)))
    w2 = ops.take(ops.transpose(mlp["w2"]), list(columns), axis=0)
    b2 = ops.reshape(ops.take(mlp["b2"], list(columns), axis=0), (len(columns), 1))
    out = ops.matmul(w2, hidden) + b2  # lead + (len(columns), elements)
    return [ops.reshape(out[..., i, :], ws) for i in range(len(columns))]


def _mlp_elementwise(elem, elem_scale, w_elem, bias_terms, mlp, columns):
    """The MLP unrolled into element-wise multiply-adds (one XLA fusion)."""
    w1, b1, w2, b2 = mlp["w1"], mlp["b1"], mlp["w2"], mlp["b2"]
    bias = bias_terms[0]
    for term in bias_terms[1:]:
        bias = bias + term
    hidden_size = int(w1.shape[0])
    h1 = []
    for j in range(hidden_size):
        acc = bias[..., j]
        for c, x in enumerate(elem):
            acc = acc + x * (elem_scale[c] * w_elem[c, j])
        h1.append(ops.relu(acc))
    outs = [b2[c] for c in columns]
    for k in range(hidden_size):
        acc = b1[k]
        for j in range(hidden_size):
            acc = acc + h1[j] * w1[j, k]
        h2 = ops.relu(acc)
        outs = [o + h2 * w2[k, c] for o, c in zip(outs, columns)]
    return outs


def learned_mlp(
    state,
    g,
    p,
    mlp,
    columns,
    rms_decay,
    rho_eps,
    norm_axes,
    norm_eps,
    full_width_unfactored,
    batch_axes=0,
):
    """Accumulators, features and the per-element MLP shared by Celo and Celo2.

    `g` and `p` are float32 in the working shape, `g` already clipped.

    Args:
        state: the per-tensor accumulators (`init_state`).
        mlp: dict with the 14 `w0__k` blocks, `b0`, `w1`, `b1`, `w2`, `b2`.
        columns: which MLP outputs to return.
        rms_decay, rho_eps: second-moment decay and the eps of
            `rho = rsqrt(v + eps)`.
        norm_axes: axes of the per-channel input normalisation.
        norm_eps: its eps: `x * rsqrt(mean(x^2) + eps)`.
        full_width_unfactored: give rank-0/1 tensors feature groups 9-13
            built from their full accumulators (Celo) instead of dropping
            them (Celo2).
        batch_axes: leading axes that stack independent tensors.

    Returns:
        `(outputs, new_state)`: one tensor per requested column.
    """
    ws = tuple(g.shape)
    rank = len(ws)
    mom_decay = _decays(MOMENTUM_DECAYS, rank)
    fac_decay = _decays(ADAFACTOR_DECAYS, rank)
    g3 = ops.expand_dims(g, 0)
    mom = mom_decay * state["mom"] + (1.0 - mom_decay) * g3
    rms = rms_decay * state["rms"] + (1.0 - rms_decay) * ops.square(g)
    q3 = ops.expand_dims(ops.square(g) + 1e-30, 0)
    rho = ops.rsqrt(rms + rho_eps)

    new_state = {"mom": mom, "rms": rms}
    blocks = _first_layer_blocks(mlp)
    # Where XLA fuses (JAX; TensorFlow under XLA), each element-wise
    # channel comes with its square written differently from the channel
    # itself, so that the normalisers are computed from the state directly
    # instead of materialising every channel for both the reduction and
    # the MLP. Eager code never computes these: `_mlp_matmul` squares the
    # stacked channels in one pass.
    fuse = compiles_elementwise_fusions(g)
    elem_sq = []

    def sq(square):
        if fuse:
            elem_sq.append(square())

    g2 = ops.square(g) if fuse else None
    mom2 = ops.square(mom) if fuse else None
    inv_v = 1.0 / (rms + rho_eps) if fuse else None
    elem = [g, ops.clip(g, -0.1, 0.1), p]
    sq(lambda: g2)
    sq(lambda: ops.minimum(g2, 0.01))
    sq(lambda: ops.square(p))
    elem += [mom[i] for i in range(3)]
    for i in range(3):
        sq(lambda: mom2[i])
    elem += [rms]
    sq(lambda: ops.square(rms))
    elem += [mom[i] * rho for i in range(3)]
    for i in range(3):
        sq(lambda: mom2[i] * inv_v)
    elem += [rho]
    sq(lambda: inv_v)
    dims = factored_dims(ws, batch_axes)
    bcast = []
    if dims is None:
        v_diag = fac_decay * state["v_diag"] + (1.0 - fac_decay) * q3
        new_state["v_diag"] = v_diag
        fac_scale = ops.rsqrt(ops.maximum(v_diag + 1e-9, 1e-9))
        elem += [g * fac_scale[i] for i in range(3)]
        for i in range(3):
            sq(lambda: g2 / ops.maximum(v_diag[i] + 1e-9, 1e-9))
        elem += [g * rho]
        sq(lambda: g2 * inv_v)
        if full_width_unfactored:
            inv_fac = ops.rsqrt(v_diag + 1e-8)
            elem += [v_diag[i] for i in range(3)] * 2
            for i in [0, 1, 2] * 2:
                sq(lambda: ops.square(v_diag[i]))
            elem += [inv_fac[i] for i in range(3)] * 2
            for i in [0, 1, 2] * 2:
                sq(lambda: 1.0 / (v_diag[i] + 1e-8))
            elem += [mom[i] * ops.rsqrt(v_diag[i]) for i in range(3)]
            for i in range(3):
                sq(lambda: mom2[i] / v_diag[i])
            n_rows = 30
        else:
            n_rows = 15
        elem_rows = list(range(n_rows))
    else:
        d0, d1 = dims
        fac_decay = _decays(ADAFACTOR_DECAYS, rank - 1)
        # +1: the state carries the decay axis first.
        v_row = fac_decay * state["v_row"] + (1.0 - fac_decay) * ops.mean(
            q3, axis=d0 + 1
        )
        v_col = fac_decay * state["v_col"] + (1.0 - fac_decay) * ops.mean(
            q3, axis=d1 + 1
        )
        new_state["v_row"] = v_row
        new_state["v_col"] = v_col
        row_axis = (d1 - 1 if d1 > d0 else d1) + 1
        r = ops.rsqrt(
            ops.maximum(v_row / (ops.mean(v_row, axis=row_axis, keepdims=True) + 1e-9), 1e-9)
        )
        c = ops.rsqrt(ops.maximum(v_col, 1e-9))
        row = ops.expand_dims(v_row, d0 + 1)
        col = ops.expand_dims(v_col, d1 + 1)
        r = ops.expand_dims(r, d0 + 1)
        c = ops.expand_dims(c, d1 + 1)
        r2, c2 = (ops.square(r), ops.square(c)) if fuse else (None, None)
        elem += [g * r[i] * c[i] for i in range(3)]
        for i in range(3):
            sq(lambda: g2 * r2[i] * c2[i])
        elem += [g * rho]
        sq(lambda: g2 * inv_v)
        bcast += [row[i] for i in range(3)]
        bcast += [col[i] for i in range(3)]
        bcast += [ops.rsqrt(row[i] + 1e-8) for i in range(3)]
        bcast += [ops.rsqrt(col[i] + 1e-8) for i in range(3)]
        elem += [mom[i] * r[i] * c[i] for i in range(3)]
        for i in range(3):
            sq(lambda: mom2[i] * r2[i] * c2[i])
        n_rows = 30
        # Rows 0..14 and 27..29 of the first layer are element-wise, rows
        # 15..26 (groups 9..12) are row/column statistics.
        elem_rows = list(range(15)) + list(range(27, 30))
    weights = ops.concatenate(blocks, axis=0)[:n_rows]
    bcast_rows = list(range(15, 27)) if bcast else []

    w_elem = ops.take(weights, elem_rows, axis=0)
    # The row- and column-statistic channels' first-layer terms, summed
    # per broadcast shape: (rows, 1, hidden) and (1, cols, hidden) stay
    # small until they meet the elements.
    bias_terms = {(): ops.convert_to_tensor(mlp["b0"])}
    for k, row_index in enumerate(bcast_rows):
        ch = bcast[k]
        term = ops.expand_dims(ch * _inv_rms(ch, norm_axes, norm_eps), -1) * weights[row_index]
        key = tuple(term.shape)
        bias_terms[key] = bias_terms[key] + term if key in bias_terms else term
    bias_terms = list(bias_terms.values())
    mlp = {k: ops.convert_to_tensor(mlp[k]) for k in ("w1", "b1", "w2", "b2")}
    # Input normalisation is a per-slice scale of each channel; fold it into
    # the first-layer weights instead of rescaling every element.
    if fuse:
        elem_scale = [ops.rsqrt(ms + norm_eps) for ms in means(elem_sq, norm_axes)]
        outputs = _mlp_elementwise(elem, elem_scale, w_elem, bias_terms, mlp, columns)
    else:
        lead = ws[: rank - len(norm_axes)]
        outputs = _mlp_matmul(elem, norm_eps, w_elem, bias_terms, mlp, ws, lead, columns)
    return outputs, new_state


def _batched_working_shape(shape, batch_axes):
    return tuple(shape[:batch_axes]) + working_shape(shape[batch_axes:])


def celo2_step(theta, state, grad, param, orthogonalize=True, batch_axes=0):
    """One Celo2 step for one tensor.

    Args:
        theta: dict of meta-weights (`THETA_SHAPES`), arrays or tensors.
        state: dict of accumulators as made by `init_state(param.shape)`.
        grad: the gradient, any float dtype; computed in float32.
        param: the current parameter value.
        orthogonalize: apply Newton-Schulz to tensors of rank >= 2 (Celo2);
            `False` gives Celo2-base.
        batch_axes: `1` when `grad` and `param` stack equally shaped,
            independent tensors along axis 0 (and `state` along
            `STACK_AXIS`): each gets exactly its own step.

    Returns:
        `(step, new_state)`: `step` has the parameter's shape, float32 and
        unit RMS over its last two axes; the parameter update is
        `param - lr * step` (plus decoupled weight decay).
    """
    shape = tuple(grad.shape)
    ws = _batched_working_shape(shape, batch_axes)
    rank = len(ws) - batch_axes
    axes = _norm_axes(rank)
    g = ops.reshape(ops.cast(grad, "float32"), ws)
    p = ops.reshape(ops.cast(param, "float32"), ws)
    g = ops.clip(g, -GRAD_CLIP, GRAD_CLIP)
    (direction,), new_state = learned_mlp(
        state,
        g,
        p,
        theta,
        columns=(0,),
        rms_decay=RMS_DECAY,
        rho_eps=1e-8,
        norm_axes=axes,
        norm_eps=1e-9,
        full_width_unfactored=False,
        batch_axes=batch_axes,
    )
    if orthogonalize and rank >= 2:
        direction = newton_schulz(direction)
    direction = direction * _inv_rms(direction, axes)
    return ops.reshape(direction, shape), new_state


def update(theta, state, gradient, param, learning_rate, weight_decay=0.0,
           orthogonalize=True, batch_axes=0):
    """One guarded Celo2 update of one tensor: `(new_param, new_state)`.

    `param - lr * step - lr * weight_decay * param` with `step` from
    `celo2_step`; a gradient with any non-finite entry leaves parameter and
    state as they were. The new parameter is float32.
    """

    def step(gradient):
        direction, new_state = celo2_step(
            theta, state, gradient, param, orthogonalize=orthogonalize,
            batch_axes=batch_axes,
        )
        return apply_step(param, direction, learning_rate, weight_decay), new_state

    return if_finite(gradient, step, param, state, batch_axes=batch_axes,
                     stack_axis=STACK_AXIS)
