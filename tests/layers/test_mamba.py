"""`Mamba` and `Mamba2`: chunked call == step loop == a float64 NumPy recurrence,
prefill/step continuation, padding, initialisation, options, saving, errors."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_lopt.layers.mamba import Mamba
from keras_lopt.layers.mamba2 import Mamba2
from tests.layers.reference import numpy_feature_map
from tests.layers.reference import numpy_rotary

TOL = dict(rtol=1e-5, atol=1e-5)


def np_(x):
    return np.asarray(ops.convert_to_numpy(x), "float64")


def softplus(x):
    return np.logaddexp(0.0, x)


def silu(x):
    return x / (1.0 + np.exp(-x))


def weights(layer):
    return {v.name: np_(v) for v in layer.weights}


def np_conv(x, kernel, bias):
    width, length = kernel.shape[0], x.shape[1]
    full = np.concatenate([np.zeros((x.shape[0], width - 1, x.shape[2])), x], axis=1)
    y = sum(full[:, i : i + length] * kernel[i] for i in range(width))
    return y if bias is None else y + bias


def np_dense(x, w, name):
    y = x @ w[f"{name}_kernel"]
    return y + w[f"{name}_bias"] if f"{name}_bias" in w else y


def numpy_mamba(layer, u, mask=None):
    """Mamba-1 recomputed from the layer's weights, one time step at a time."""
    w, di, r, n = weights(layer), layer.d_inner, layer.dt_rank, layer.d_state
    mask = np.ones(u.shape[:2]) if mask is None else mask.astype("float64")
    xz = np_dense(u.astype("float64"), w, "in_proj")
    x, z = xz[..., :di] * mask[..., None], xz[..., di:]
    x = silu(np_conv(x, w["conv_kernel"], w.get("conv_bias")))
    dbc = x @ w["x_proj_kernel"]
    delta = softplus(dbc[..., :r] @ w["dt_proj_kernel"] + w["dt_bias"]) * mask[..., None]
    b, c = dbc[..., r : r + n], dbc[..., r + n :]
    a = -np.exp(w["A_log"])
    h = np.zeros((u.shape[0], di, n))
    y = np.zeros(x.shape)
    for t in range(u.shape[1]):
        h = np.exp(delta[:, t, :, None] * a) * h + (delta[:, t] * x[:, t])[..., None] * b[
            :, t, None, :
        ]
        y[:, t] = np.einsum("bdn,bn->bd", h, c[:, t])
    y = y + w["D"] * x
    if layer.gate:
        y = y * silu(z)
    return np_dense(y, w, "out_proj") * mask[..., None]


def np_feature_map(name, layer, x):
    kernel = np_(layer.kernel) if name == "hedgehog" else None
    return numpy_feature_map(name, x, kernel)


def numpy_mamba2(layer, u, mask=None):
    """Mamba-2 (SSD) recomputed from the layer's weights, one time step at a time,
    including the options conv_activation, bc_feature_map, rotary, norm_per_head."""
    w, di, n, bc = weights(layer), layer.d_inner, layer.d_state, layer.bc_dim
    heads, p, groups = layer.num_heads, layer.head_dim, layer.num_groups
    batch, length = u.shape[:2]
    mask = np.ones((batch, length)) if mask is None else mask.astype("float64")
    proj = np_dense(u.astype("float64"), w, "in_proj")
    z, xbc, dt = proj[..., :di], proj[..., di:-heads], proj[..., -heads:]
    xbc = np_conv(xbc * mask[..., None], w["conv_kernel"], w.get("conv_bias"))
    if layer.conv_activation == "silu":
        xbc = silu(xbc)
    x = xbc[..., :di].reshape(batch, length, heads, p)
    b = xbc[..., di:di + groups * bc].reshape(batch, length, groups, bc)
    c = xbc[..., di + groups * bc:].reshape(batch, length, groups, bc)
    if layer.rotary:
        positions = np.cumsum(mask, axis=1) - 1.0
        b = numpy_rotary(b, positions, layer.rotary_max_wavelength)
        c = numpy_rotary(c, positions, layer.rotary_max_wavelength)
    b = np_feature_map(layer.bc_feature_map, layer.b_feature_map, b)
    c = np_feature_map(layer.bc_feature_map, layer.c_feature_map, c)
    group_of = np.arange(heads) // (heads // groups)
    b, c = b[:, :, group_of], c[:, :, group_of]
    dt = softplus(dt + w["dt_bias"]) * mask[..., None]
    a = -np.exp(w["A_log"])
    state = np.zeros((batch, heads, n, p))
    y = np.zeros(x.shape)
    for t in range(length):
        state = np.exp(dt[:, t] * a)[..., None, None] * state
        state = state + b[:, t, :, :, None] * (dt[:, t, :, None] * x[:, t])[:, :, None, :]
        y[:, t] = np.einsum("bhn,bhnp->bhp", c[:, t], state)
    y = (y + w["D"][:, None] * x).reshape(batch, length, di)
    if layer.gate:
        y = y * silu(z)
    shape = (batch, length, heads, p) if layer.norm_per_head else y.shape
    y = y.reshape(shape)
    y = y / np.sqrt(np.mean(y**2, axis=-1, keepdims=True) + layer.norm_epsilon)
    y = y.reshape(batch, length, di) * w["norm_scale"]
    return np_dense(y, w, "out_proj") * mask[..., None]


NUMPY = {Mamba: numpy_mamba, Mamba2: numpy_mamba2}


def randomize(layer, seed=0):
    """Small random weights (values stay O(1)) and step sizes ~0.1..1 so decay matters."""
    rng = np.random.default_rng(seed)
    for v in layer.weights:
        shape = tuple(v.shape)
        if v.name == "A_log":
            continue
        if v.name == "dt_bias":
            value = rng.uniform(-2.0, 0.5, shape)
        elif v.name.endswith("_kernel") and v.name != "conv_kernel":
            value = rng.standard_normal(shape) / math.sqrt(shape[0])
        elif v.name == "conv_kernel":
            value = rng.standard_normal(shape) * 0.5
        elif v.name == "D":
            value = 1.0 + 0.5 * rng.standard_normal(shape)
        elif v.name == "norm_scale":
            value = rng.uniform(0.5, 1.5, shape)
        else:  # biases
            value = 0.1 * rng.standard_normal(shape)
        v.assign(value.astype("float32"))
    return layer


def make(cls, d_model=8, seed=0, **kwargs):
    defaults = {Mamba: dict(d_state=4, chunk_size=4),
                Mamba2: dict(d_state=4, head_dim=4, chunk_size=4)}[cls]
    layer = cls(d_model=d_model, seed=seed, **{**defaults, **kwargs})
    layer.build((None, None, d_model))
    return randomize(layer, seed)


# Tests share one batch size and few lengths: JAX compiles eager ops per shape.
BATCH, LENGTH = 2, 9


def inputs(length=LENGTH, seed=1, batch=BATCH):
    return np.random.default_rng(seed).standard_normal((batch, length, 8)).astype("float32")


def step_all(layer, u, cache=None):
    cache = layer.init_cache(u.shape[0]) if cache is None else cache
    outs = []
    for t in range(u.shape[1]):
        o, cache = layer.step(u[:, t], cache)
        outs.append(np_(o))
    return np.stack(outs, axis=1), cache


CASES = [
    (Mamba, {}, 1),
    (Mamba, {}, LENGTH),
    (Mamba, dict(use_bias=True, dt_rank=3), LENGTH),
    (Mamba, dict(within_chunk="sequential"), LENGTH),
    (Mamba2, {}, 1),
    (Mamba2, {}, LENGTH),
    (Mamba2, dict(num_groups=2, use_bias=True, conv_bias=False), LENGTH),
]


@pytest.mark.parametrize("cls,kwargs,length", CASES)
def test_call_matches_numpy_and_steps(cls, kwargs, length):
    layer = make(cls, **kwargs)
    u = inputs(length)
    want = NUMPY[cls](layer, u)
    np.testing.assert_allclose(np_(layer(u)), want, **TOL)
    stepped, _ = step_all(layer, u)
    np.testing.assert_allclose(stepped, want, **TOL)


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
def test_prefill_then_step_continues_the_call(cls):
    layer = make(cls)
    u = inputs()
    full = np_(layer(u))
    out, cache = layer.prefill(u[:, :6])
    np.testing.assert_allclose(np_(out), full[:, :6], **TOL)
    assert tuple(cache["conv"].shape) == (BATCH, 3, layer._conv_channels)
    assert tuple(cache["ssm"].shape) == (BATCH,) + layer._state_shape
    tail, _ = step_all(layer, u[:, 6:], cache)
    np.testing.assert_allclose(tail, full[:, 6:], **TOL)


def check_padded_prefill(cls, mask, check_call=False):
    """Padded prompt (junk at padded positions) + steps == the unpadded sequence."""
    layer = make(cls)
    u = inputs()
    given, mask = mask, np.asarray(mask, bool)
    junk = np.where(mask[..., None], u, 7.0).astype("float32")
    out, cache = layer.prefill(junk, padding_mask=given)
    out = np_(out)
    np.testing.assert_array_equal(out[~mask], 0.0)
    if check_call:  # `call` and `prefill` share their code: checked once
        np.testing.assert_allclose(np_(layer(junk, padding_mask=given)), out, **TOL)
    nxt = inputs(2, seed=9)
    cont, _ = step_all(layer, nxt, cache)
    for row in range(BATCH):
        whole = np.concatenate([u[row, mask[row]], nxt[row]])[None]
        want = NUMPY[cls](layer, whole)[0]
        real = int(mask[row].sum())
        np.testing.assert_allclose(out[row, mask[row]], want[:real], **TOL)
        np.testing.assert_allclose(cont[row], want[real:], **TOL)
    return layer, cache


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
def test_left_padding_is_invisible(cls):
    mask = np.arange(LENGTH)[None, :] >= np.array([[3], [LENGTH]])  # row 1: all padding
    _, cache = check_padded_prefill(cls, mask, check_call=True)
    np.testing.assert_array_equal(np_(cache["conv"])[1], 0.0)
    np.testing.assert_array_equal(np_(cache["ssm"])[1], 0.0)


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
def test_right_padding_prefill_caches_the_last_real_token(cls):
    # Row 0 is shorter than the conv window; int masks are accepted.
    mask = (np.arange(LENGTH)[None, :] < np.array([[2], [6]])).astype("int32")
    check_padded_prefill(cls, mask)


def test_mamba_reference_initialisation():
    assert Mamba(d_model=40).dt_rank == 3 and Mamba(d_model=40).d_inner == 80
    assert Mamba(d_model=40, dt_rank=5, expand=1.5).dt_rank == 5
    layer = Mamba(d_model=8, d_state=4, seed=3)
    layer.build((None, None, 8))
    assert layer.d_inner == 16 and layer.dt_rank == 1
    np.testing.assert_allclose(np_(layer.A_log), np.log(np.tile(np.arange(1, 5), (16, 1))),
                               rtol=1e-6)
    np.testing.assert_array_equal(np_(layer.D), 1.0)
    dt = softplus(np_(layer.dt_bias))
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
    assert dt.min() < 1e-2 < dt.max()  # spread over the log-uniform range
    assert np.abs(np_(layer.dt_proj_kernel)).max() <= 1.0  # U(+-dt_rank**-0.5)
    assert np.abs(np_(layer.in_proj_kernel)).max() <= 8**-0.5
    assert tuple(layer.x_proj_kernel.shape) == (16, 1 + 8)
    assert layer.x_proj_layout == {"delta": (0, 1), "B": (1, 5), "C": (5, 9)}
    assert layer.in_proj_layout == {"x": (0, 16), "z": (16, 32)}


def test_mamba2_reference_initialisation():
    layer = Mamba2(d_model=8, d_state=4, head_dim=4, num_groups=2, seed=3,
                   dt_min=0.01, dt_max=0.05)
    layer.build((None, None, 8))
    assert layer.num_heads == 4
    a = np.exp(np_(layer.A_log))
    assert a.shape == (4,) and a.min() >= 1.0 and a.max() <= 16.0 and np.ptp(a) > 0
    np.testing.assert_array_equal(np_(layer.D), 1.0)
    np.testing.assert_array_equal(np_(layer.norm_scale), 1.0)
    dt = softplus(np_(layer.dt_bias))
    assert dt.shape == (4,) and dt.min() >= 0.01 * (1 - 1e-4) and dt.max() <= 0.05 * (1 + 1e-4)
    assert layer.in_proj_layout == {"z": (0, 16), "x": (16, 32), "B": (32, 40), "C": (40, 48),
                                    "dt": (48, 52)}
    assert tuple(layer.in_proj_kernel.shape) == (8, 52)
    assert tuple(layer.conv_kernel.shape) == (4, 32)
    assert layer.init_cache(3)["ssm"].shape == (3, 4, 4, 4)


def test_dt_floor_applies():
    layer = Mamba(d_model=8, d_state=4, dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-4)
    layer.build((None, None, 8))
    np.testing.assert_allclose(softplus(np_(layer.dt_bias)), 1e-4, rtol=1e-3)


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
def test_identity_conv_and_neutral_gate(cls):
    layer = make(cls, conv_init="identity", gate=False)
    fresh = cls(d_model=8, d_state=4, conv_init="identity", **(
        {"head_dim": 4} if cls is Mamba2 else {}))
    fresh.build((None, None, 8))
    kernel = np_(fresh.conv_kernel)
    np.testing.assert_array_equal(kernel[:-1], 0.0)
    np.testing.assert_array_equal(kernel[-1], 1.0)
    np.testing.assert_array_equal(np_(fresh.conv_bias), 0.0)
    # gate=False: the z columns of in_proj have no effect ...
    u = inputs()
    before = np_(layer(u))
    kernel = np_(layer.in_proj_kernel)
    lo, hi = layer.in_proj_layout["z"]
    kernel[:, lo:hi] = 5.0
    layer.in_proj_kernel.assign(kernel.astype("float32"))
    np.testing.assert_allclose(np_(layer(u)), before, **TOL)
    # ... and switching the gate on later makes them count.
    layer.gate = True
    after = np_(layer(u))
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_allclose(after, NUMPY[cls](layer, u), **TOL)


def test_mamba2_initialised_as_linear_attention():
    """The distillation recipe: identity conv, no gate, decay 1, dt 1, D 0."""
    layer = Mamba2(d_model=8, d_state=4, head_dim=4, conv_init="identity", gate=False)
    layer.build((None, None, 8))
    rng = np.random.default_rng(0)
    wq, wk, wv = (rng.standard_normal((8, n)) / 3 for n in (4, 4, 16))
    wo = rng.standard_normal((16, 8)) / 4
    kernel = np.zeros(tuple(layer.in_proj_kernel.shape))
    for name, w in (("x", wv), ("B", wk), ("C", wq)):
        lo, hi = layer.in_proj_layout[name]
        kernel[:, lo:hi] = w
    layer.in_proj_kernel.assign(kernel.astype("float32"))
    layer.out_proj_kernel.assign(wo.astype("float32"))
    layer.A_log.assign(np.full((4,), -30.0, "float32"))
    layer.dt_bias.assign(np.full((4,), math.log(math.e - 1), "float32"))
    layer.D.assign(np.zeros((4,), "float32"))
    u = inputs().astype("float64")
    q, k, v = silu(u @ wq), silu(u @ wk), silu(u @ wv).reshape(BATCH, LENGTH, 4, 4)
    scores = np.tril(np.einsum("btn,bsn->bts", q, k))
    o = np.einsum("bts,bshp->bthp", scores, v).reshape(BATCH, LENGTH, 16)
    want = o / np.sqrt(np.mean(o**2, -1, keepdims=True) + 1e-5) @ wo
    np.testing.assert_allclose(np_(layer(u.astype("float32"))), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
def test_config_round_trip(cls):
    layer = make(cls, chunk_size=4, max_sequence_length=32, conv_init="identity", gate=False)
    config = layer.get_config()
    clone = cls.from_config(config)
    assert clone.get_config() == config
    clone.build((None, None, 8))
    clone.set_weights(layer.get_weights())
    u = inputs()
    np.testing.assert_allclose(np_(clone(u)), np_(layer(u)), **TOL)


def test_model_save_and_load(tmp_path):
    tokens = keras.Input((LENGTH, 8))
    mask = keras.Input((LENGTH,), dtype="bool")
    h = Mamba(d_state=4, chunk_size=4, seed=1)(tokens, padding_mask=mask)
    h = Mamba2(d_state=4, head_dim=4, chunk_size=4, seed=2)(h, padding_mask=mask)
    model = keras.Model([tokens, mask], h)
    for layer in model.layers[2:]:
        randomize(layer)
    u = inputs()
    m = np.ones((BATCH, LENGTH), bool)
    m[0, :2] = False
    want = np_(model([u, m]))
    path = str(tmp_path / "mamba.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(np_(loaded([u, m])), want, rtol=1e-6, atol=1e-6)
    assert isinstance(loaded.layers[2], Mamba) and isinstance(loaded.layers[3], Mamba2)


def tiny_model(dtype):
    return keras.Sequential([
        keras.Input((8, 8)),
        Mamba(d_state=4, chunk_size=4, seed=1, dtype=dtype),
        Mamba2(d_state=4, head_dim=4, chunk_size=4, seed=2, dtype=dtype),
        keras.layers.Dense(1, dtype=dtype),
    ])


def test_mixed_bfloat16_trains_and_reduces_the_loss():
    model = tiny_model("mixed_bfloat16")
    mamba, mamba2 = model.layers[0], model.layers[1]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 8, 8)).astype("float32")
    y = np.cumsum(x[..., :1], axis=1) / 3  # needs the recurrence
    assert keras.backend.standardize_dtype(mamba2.A_log.dtype) == "float32"
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    losses = model.fit(x, y, batch_size=8, epochs=12, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0]
    # The cache path works under the mixed policy too.
    out, cache = mamba.step(x[:, 0], mamba.init_cache(8))
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(cache["ssm"].dtype) == "float32"
    assert np.all(np.isfinite(np_(out)))


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
def test_bad_inputs(cls):
    layer = make(cls, max_sequence_length=6)
    with pytest.raises(ValueError, match="rank 3"):
        layer(np.zeros((2, 8), "float32"))
    with pytest.raises(ValueError, match="rank 2"):
        layer.step(np.zeros((2, 1, 8), "float32"), layer.init_cache(2))
    with pytest.raises(TypeError, match="floating-point"):
        layer(np.zeros((2, 3, 8), "int32"))
    with pytest.raises(TypeError, match="floating-point"):
        layer.step(np.zeros((2, 8), "int32"), layer.init_cache(2))
    with pytest.raises(ValueError, match="d_model=8"):
        layer(np.zeros((2, 3, 6), "float32"))
    with pytest.raises(ValueError, match="d_model=8"):
        layer.step(np.zeros((2, 6), "float32"), layer.init_cache(2))
    with pytest.raises(ValueError, match="max_sequence_length=6"):
        layer(np.zeros((1, 7, 8), "float32"))
    with pytest.raises(ValueError, match="max_sequence_length=6"):
        layer.prefill(np.zeros((1, 7, 8), "float32"))
    with pytest.raises(ValueError, match="padding_mask"):
        layer(np.zeros((1, 5, 8), "float32"), padding_mask=np.ones((1, 4)))
    with pytest.raises(ValueError, match="cache"):
        layer.step(np.zeros((2, 8), "float32"), {"conv": np.zeros((2, 2, 3), "float32")})
    with pytest.raises(ValueError, match="conv_init"):
        cls(conv_init="zeros")
    with pytest.raises(ValueError, match="not built"):
        cls().init_cache(1)
    unbuilt = cls(d_model=8, d_state=4, **({"head_dim": 4} if cls is Mamba2 else {}))
    with pytest.raises(ValueError, match="d_model=8"):
        unbuilt(np.zeros((1, 3, 5), "float32"))


def test_mamba2_head_and_group_errors():
    with pytest.raises(ValueError, match="head_dim"):
        Mamba2(d_model=8, head_dim=5)
    with pytest.raises(ValueError, match="num_groups"):
        Mamba2(d_model=8, head_dim=4, num_groups=3)
    layer = Mamba2(head_dim=4, num_groups=3)  # d_model inferred: checked at build
    with pytest.raises(ValueError, match="num_groups"):
        layer(np.zeros((1, 2, 8), "float32"))


def test_step_builds_from_d_model_and_matches_call():
    layer = Mamba(d_model=8, d_state=4, chunk_size=4, seed=0)
    u = inputs(1)
    out, _ = layer.step(u[:, 0], layer.init_cache(BATCH))
    np.testing.assert_allclose(np_(out), np_(layer(u))[:, 0], **TOL)


# -- Mamba2 options for reproducing linear attention --------------------------


def make_options(**kwargs):
    layer = make(Mamba2, **kwargs)
    rng = np.random.default_rng(5)
    for feature_map in {id(m): m for m in (layer.b_feature_map, layer.c_feature_map)
                        if m is not None and m.weights}.values():
        # Identity plus noise: a Hedgehog map away from its initialisation.
        kernel = np_(feature_map.kernel)
        feature_map.kernel.assign(
            (np.eye(kernel.shape[1], kernel.shape[2]) + 0.3 * rng.standard_normal(kernel.shape))
            .astype("float32"))
    return layer


HEDGEHOG = dict(bc_feature_map="hedgehog", bc_dim=2, d_state=4)
OPTION_CASES = [
    dict(conv_activation=None, norm_per_head=True, norm_epsilon=1e-3),
    dict(HEDGEHOG, num_groups=2, rotary=True, conv_activation=None, norm_per_head=True,
         gate=False),
    dict(bc_feature_map="elu", rotary=True, rotary_max_wavelength=100.0, use_bias=True),
    dict(bc_feature_map="relu", num_groups=2, bc_dim=4),
]


@pytest.mark.parametrize("kwargs", OPTION_CASES)
def test_mamba2_options_call_matches_numpy_and_steps(kwargs):
    layer = make_options(**kwargs)
    u = inputs()
    want = numpy_mamba2(layer, u)
    np.testing.assert_allclose(np_(layer(u)), want, **TOL)
    stepped, _ = step_all(layer, u)
    np.testing.assert_allclose(stepped, want, **TOL)


def test_mamba2_options_padded_prefill_then_step():
    """Left padding (row 0) and right padding (row 1) with rotary + Hedgehog."""
    layer = make_options(**OPTION_CASES[1])
    u = inputs()
    mask = np.ones((BATCH, LENGTH), bool)
    mask[0, :3] = False
    mask[1, 7:] = False
    junk = np.where(mask[..., None], u, 7.0).astype("float32")
    out, cache = layer.prefill(junk, padding_mask=mask)
    np.testing.assert_array_equal(np_(cache["position"]), mask.sum(1))
    np.testing.assert_allclose(np_(out), numpy_mamba2(layer, u, mask), **TOL)
    nxt = inputs(2, seed=9)
    cont, cache = step_all(layer, nxt, cache)
    np.testing.assert_array_equal(np_(cache["position"]), mask.sum(1) + 2)
    for row in range(BATCH):
        whole = np.concatenate([u[row, mask[row]], nxt[row]])[None]
        want = numpy_mamba2(layer, whole)[0]
        np.testing.assert_allclose(cont[row], want[int(mask[row].sum()):], **TOL)


def test_mamba2_options_config_round_trip_and_save(tmp_path):
    from keras_lopt.layers.feature_maps import HedgehogFeatureMap

    shared = HedgehogFeatureMap(feature_dim=2, name="shared_map")  # a layer: B, C share it
    for kwargs in (OPTION_CASES[1], dict(bc_feature_map=shared, bc_dim=4, d_state=4)):
        layer = make_options(**kwargs)
        config = layer.get_config()
        clone = Mamba2.from_config(config)
        assert clone.get_config() == config
        clone.build((None, None, 8))
        clone.set_weights(layer.get_weights())
        u = inputs()
        np.testing.assert_allclose(np_(clone(u)), np_(layer(u)), **TOL)
    assert layer.b_feature_map is layer.c_feature_map
    assert layer.get_config()["bc_feature_map"]["class_name"] == "HedgehogFeatureMap"
    model = keras.Sequential([keras.Input((LENGTH, 8)), make_options(**OPTION_CASES[1])])
    path = str(tmp_path / "mamba2_options.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(np_(loaded(u)), np_(model(u)), rtol=1e-6, atol=1e-6)


def test_mamba2_defaults_are_unchanged():
    layer = make(Mamba2)
    config = layer.get_config()
    assert (config["conv_activation"], config["bc_feature_map"], config["bc_dim"],
            config["rotary"], config["norm_per_head"], config["norm_epsilon"]) == (
        "silu", None, None, False, False, 1e-5)
    assert layer.b_feature_map is None and layer.bc_dim == layer.d_state
    assert set(layer.init_cache(1)) == {"conv", "ssm"}
    assert set(layer.prefill(inputs())[1]) == {"conv", "ssm"}
    old = {k: v for k, v in config.items()  # a config saved before the options existed
           if k not in ("conv_activation", "bc_feature_map", "bc_dim", "rotary",
                        "rotary_max_wavelength", "norm_per_head", "norm_epsilon")}
    assert Mamba2.from_config(old).get_config() == config


def test_mamba2_option_errors():
    with pytest.raises(ValueError, match="conv_activation"):
        Mamba2(conv_activation="relu")
    with pytest.raises(ValueError, match="bc_dim=2 differs from d_state=4"):
        Mamba2(d_state=4, bc_dim=2)
    with pytest.raises(ValueError, match="maps bc_dim=4 to 8 features but d_state=4"):
        Mamba2(d_state=4, bc_feature_map="hedgehog")
    with pytest.raises(ValueError, match="even bc_dim"):
        Mamba2(d_state=6, bc_dim=3, bc_feature_map="hedgehog", rotary=True)
    with pytest.raises(ValueError, match="Unknown feature map"):
        Mamba2(bc_feature_map="softmax")
    from keras_lopt.layers.feature_maps import HedgehogFeatureMap

    layer = Mamba2(d_model=8, d_state=4, head_dim=4, bc_feature_map=HedgehogFeatureMap())
    with pytest.raises(ValueError, match="to 8 features but d_state=4"):
        layer.build((None, None, 8))
    layer = make(Mamba2, rotary=True)
    cache = layer.init_cache(BATCH)
    del cache["position"]
    with pytest.raises(ValueError, match="position"):
        layer.step(inputs(1)[:, 0], cache)
