"""LinearAttention: chunked call == recurrent steps == a float64 NumPy recurrence."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_lopt.distillation.weights import copy_attention_weights
from keras_lopt.layers.feature_maps import HedgehogFeatureMap
from keras_lopt.layers.feature_maps import get_feature_map
from keras_lopt.layers.linear_attention import LinearAttention
from tests.layers.reference import numpy_feature_map
from tests.layers.reference import numpy_rotary

D_MODEL = 12
TOL = dict(rtol=1e-5, atol=1e-5)


def np_(x):
    return ops.convert_to_numpy(x).astype("float64")


def compiled(fn):
    """`fn`, compiled on JAX, whose eager mode compiles every op on its own (slow)."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    return fn


def numpy_phi(layer, feature_map, x):
    kernel = np_(feature_map.kernel) if layer.feature_map == "hedgehog" else None
    return numpy_feature_map(layer.feature_map, x, kernel)


def numpy_linear_attention(layer, x, mask=None):
    """The layer's maths, from its weights, as a per-token float64 recurrence."""
    x = x.astype("float64")
    batch, length, _ = x.shape
    mask = np.ones((batch, length)) if mask is None else mask.astype("float64")

    def project(dense):
        y = np.einsum("bld,dhk->blhk", x, np_(dense.kernel))
        return y + np_(dense.bias) if layer.use_bias else y

    q, k, v = project(layer.query_dense), project(layer.key_dense), project(layer.value_dense)
    if layer.rotary:
        positions = np.cumsum(mask, axis=1) - 1
        q = numpy_rotary(q, positions, layer.rotary_max_wavelength)
        k = numpy_rotary(k, positions, layer.rotary_max_wavelength)
    groups = layer.num_heads // layer.num_key_value_heads
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    phi_q = numpy_phi(layer, layer.query_feature_map, q)
    phi_k = numpy_phi(layer, layer.key_feature_map, k) * mask[:, :, None, None]
    v = v * mask[:, :, None, None]
    heads = layer.num_heads
    a = np.ones((batch, length, heads))
    if layer.decay:
        a_head = 1 / (1 + np.exp(-np_(layer.decay_logit)))
        a = np.where(mask[:, :, None] > 0, a_head, 1.0)

    s = np.zeros((batch, heads, phi_k.shape[-1], v.shape[-1]))
    z = np.zeros((batch, heads, phi_k.shape[-1]))
    if not layer.causal:
        s = np.einsum("blhk,blhv->bhkv", phi_k, v)
        z = phi_k.sum(axis=1)
    num = np.zeros(q.shape[:3] + v.shape[-1:])
    den = np.zeros(q.shape[:3])
    for t in range(length):
        if layer.causal:
            s = a[:, t, :, None, None] * s + phi_k[:, t, :, :, None] * v[:, t, :, None, :]
            z = a[:, t, :, None] * z + phi_k[:, t]
        num[:, t] = np.einsum("bhk,bhkv->bhv", phi_q[:, t], s)
        den[:, t] = np.einsum("bhk,bhk->bh", phi_q[:, t], z)
    if layer.normalization == "denominator":
        o = num / (den[..., None] + layer.epsilon)
    elif layer.normalization == "norm":
        rms = np.sqrt(np.mean(num**2, axis=-1, keepdims=True) + layer.epsilon)
        o = num / rms * np_(layer.norm_scale)
    else:
        o = num
    y = np.einsum("blhv,hvo->blo", o, np_(layer.output_dense.kernel))
    if layer.use_bias:
        y = y + np_(layer.output_dense.bias)
    return y * mask[:, :, None]


def make_layer(seed=0, **kwargs):
    """A built layer with random projections and every other weight perturbed."""
    # Zero init then NumPy noise: JAX would compile a random kernel per shape.
    kwargs.setdefault("kernel_initializer", "zeros")
    layer = LinearAttention(**kwargs)
    layer.build((None, None, D_MODEL))
    rng = np.random.default_rng(seed)
    for w in layer.weights:
        scale = 0.3 if w.path.endswith("/kernel") and "feature_map" not in w.path else 0.1
        w.assign(np_(w) + scale * rng.standard_normal(w.shape))
    return layer


def run_steps(layer, x, cache=None):
    cache = layer.init_cache(x.shape[0]) if cache is None else cache
    step = compiled(layer.step)
    outs = []
    for t in range(x.shape[1]):
        y, cache = step(x[:, t], cache)
        outs.append(np_(y))
    return np.stack(outs, axis=1), cache


CASES = [
    # length, chunk, kwargs
    (1, 4, dict(feature_map="elu")),
    (11, 4, dict(feature_map="elu")),
    (11, 4, dict(feature_map="relu", decay=True)),
    (9, 4, dict(feature_map="identity", normalization="norm", rotary=True)),
    (10, 3, dict(feature_map="hedgehog", decay=True, rotary=True)),
    (13, 4, dict(feature_map="hedgehog", normalization="norm", decay=True, num_key_value_heads=1)),
    (7, 64, dict(feature_map="elu", rotary=True, num_key_value_heads=2, use_bias=True)),
    (8, 4, dict(feature_map="elu", normalization=None, decay=True, value_dim=6, output_dim=5)),
]


@pytest.mark.parametrize("length,chunk,kwargs", CASES)
def test_chunked_equals_steps_equals_numpy(length, chunk, kwargs):
    layer = make_layer(num_heads=4, key_dim=4, chunk_size=chunk, **kwargs)
    x = np.random.default_rng(1).standard_normal((2, length, D_MODEL)).astype("float32")
    want = numpy_linear_attention(layer, x)
    np.testing.assert_allclose(np_(compiled(layer)(x)), want, **TOL)
    stepped, cache = run_steps(layer, x)
    np.testing.assert_allclose(stepped, want, **TOL)
    np.testing.assert_array_equal(ops.convert_to_numpy(cache["position"]), [length, length])


def test_init_cache_layout():
    layer = LinearAttention(num_heads=4, key_dim=6, value_dim=5, feature_map="hedgehog")
    cache = layer.init_cache(3)
    assert tuple(cache["state"].shape) == (3, 4, 12, 6)  # hedgehog doubles K, +1 for z
    assert keras.backend.standardize_dtype(cache["state"].dtype) == "float32"
    assert tuple(cache["position"].shape) == (3,)
    assert keras.backend.standardize_dtype(cache["position"].dtype) == "int32"
    norm = LinearAttention(num_heads=4, key_dim=6, value_dim=5, normalization="norm")
    assert tuple(norm.init_cache(1)["state"].shape) == (1, 4, 6, 5)


def test_prefill_then_step_continues_like_call():
    layer = make_layer(
        num_heads=2, key_dim=4, chunk_size=4, feature_map="hedgehog", decay=True, rotary=True
    )
    x = np.random.default_rng(2).standard_normal((2, 10, D_MODEL)).astype("float32")
    want = np_(compiled(layer)(x))
    head, cache = compiled(layer.prefill)(x[:, :6])
    np.testing.assert_allclose(np_(head), want[:, :6], **TOL)
    tail, _ = run_steps(layer, x[:, 6:], cache)
    np.testing.assert_allclose(tail, want[:, 6:], **TOL)


def test_non_causal_matches_numpy():
    layer = make_layer(num_heads=2, key_dim=4, causal=False, feature_map="hedgehog", rotary=True)
    x = np.random.default_rng(3).standard_normal((2, 9, D_MODEL)).astype("float32")
    mask = np.ones((2, 9), bool)
    mask[0, :3] = mask[1, 7:] = False
    call = compiled(layer)
    np.testing.assert_allclose(np_(call(x)), numpy_linear_attention(layer, x), **TOL)
    got = np_(call(x, padding_mask=mask))
    np.testing.assert_allclose(got, numpy_linear_attention(layer, x, mask), **TOL)
    # Row 1 without its right padding: same real-token outputs.
    np.testing.assert_allclose(got[1, :7], np_(call(x[1:, :7]))[0], **TOL)


PADDING_KWARGS = dict(
    num_heads=2,
    key_dim=4,
    chunk_size=4,
    feature_map="hedgehog",
    decay=True,
    rotary=True,
    use_bias=True,
)


def test_left_padding_equals_unpadded_sequence():
    layer = make_layer(**PADDING_KWARGS)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 7, D_MODEL)).astype("float32")
    padded = np.concatenate([100 * rng.standard_normal((1, 5, D_MODEL)), x], 1).astype("float32")
    mask = np.array([[0] * 5 + [1] * 7])
    prefill = compiled(layer.prefill)
    want, want_cache = prefill(x)
    got, cache = prefill(padded, padding_mask=mask)
    np.testing.assert_allclose(np_(got)[:, 5:], np_(want), **TOL)
    np.testing.assert_array_equal(np_(got)[:, :5], 0.0)
    np.testing.assert_allclose(np_(cache["state"]), np_(want_cache["state"]), **TOL)
    np.testing.assert_array_equal(ops.convert_to_numpy(cache["position"]), [7])
    np.testing.assert_allclose(np_(compiled(layer)(padded, padding_mask=mask)), np_(got), **TOL)
    np.testing.assert_allclose(np_(got), numpy_linear_attention(layer, padded, mask), **TOL)


def test_right_padding_keeps_outputs_and_final_state():
    layer = make_layer(**PADDING_KWARGS)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, D_MODEL)).astype("float32")
    padded = np.concatenate([x, 100 * rng.standard_normal((2, 5, D_MODEL))], 1).astype("float32")
    mask = np.array([[1] * 6 + [0] * 5] * 2, bool)
    prefill = compiled(layer.prefill)
    want, want_cache = prefill(x)
    got, cache = prefill(padded, padding_mask=mask)
    np.testing.assert_allclose(np_(got)[:, :6], np_(want), **TOL)
    np.testing.assert_array_equal(np_(got)[:, 6:], 0.0)
    np.testing.assert_allclose(np_(cache["state"]), np_(want_cache["state"]), **TOL)
    np.testing.assert_array_equal(ops.convert_to_numpy(cache["position"]), [6, 6])


def numpy_plain_causal_attention(x, wq, wk, wv, wo, bq, bk, bv, bo, heads, kv_heads):
    def split(y, h):
        return y.reshape(y.shape[:2] + (h, -1))

    q, k, v = split(x @ wq + bq, heads), split(x @ wk + bk, kv_heads), split(x @ wv + bv, kv_heads)
    k, v = np.repeat(k, heads // kv_heads, 2), np.repeat(v, heads // kv_heads, 2)
    scores = np.einsum("bthk,bshk->bhts", q, k) * np.tril(np.ones((x.shape[1],) * 2))
    o = np.einsum("bhts,bshv->bthv", scores, v)
    return o.reshape(o.shape[:2] + (-1,)) @ wo + bo


def test_copied_attention_weights_reproduce_given_attention():
    # The one copy path (and weight convention) into LinearAttention.
    heads, kv_heads, key_dim, value_dim, d_out = 4, 2, 3, 5, 7
    layer = LinearAttention(
        heads,
        key_dim,
        num_key_value_heads=kv_heads,
        value_dim=value_dim,
        output_dim=d_out,
        feature_map="identity",
        normalization=None,
        use_bias=True,
        chunk_size=4,
        kernel_initializer="zeros",
    )
    layer.build((None, None, D_MODEL))
    rng = np.random.default_rng(6)
    shapes = dict(
        query=(D_MODEL, heads, key_dim),
        key=(D_MODEL, kv_heads, key_dim),
        value=(D_MODEL, kv_heads, value_dim),
        output=(heads, value_dim, d_out),
        query_bias=(heads, key_dim),
        key_bias=(kv_heads, key_dim),
        value_bias=(kv_heads, value_dim),
        output_bias=(d_out,),
    )
    w = {
        name: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype("float32")
        for name, shape in shapes.items()
    }
    copy_attention_weights(w, layer)
    x = rng.standard_normal((2, 9, D_MODEL)).astype("float32")
    flat = [w[n].astype("float64") for n in ("query", "key", "value")]
    flat = [k.reshape(D_MODEL, -1) for k in flat] + [w["output"].reshape(-1, d_out)]
    flat += [w[n].astype("float64").reshape(-1) for n in shapes if n.endswith("_bias")]
    want = numpy_plain_causal_attention(x.astype("float64"), *flat, heads, kv_heads)
    np.testing.assert_allclose(np_(compiled(layer)(x)), want, **TOL)
    bad = dict(w, key=w["query"])
    with pytest.raises(ValueError, match="attention key"):
        copy_attention_weights(bad, layer)
    no_bias = LinearAttention(heads, key_dim, num_key_value_heads=kv_heads)
    no_bias.build((None, None, D_MODEL))
    with pytest.raises(ValueError, match="biases differ"):
        copy_attention_weights(w, no_bias)


def test_feature_maps():
    x = np.random.default_rng(12).standard_normal((2, 3, 4, 5)).astype("float32")
    hedgehog = get_feature_map("hedgehog")
    phi = np_(hedgehog(x))
    assert phi.shape == (2, 3, 4, 10)
    np.testing.assert_array_equal(np_(hedgehog.kernel), np.tile(np.eye(5), (4, 1, 1)))
    e = np.exp(np.concatenate([x, -x], -1))
    np.testing.assert_allclose(phi, e / e.sum(-1, keepdims=True), rtol=1e-5)
    assert np_(get_feature_map("ELU")(x)).min() > 0
    wide = HedgehogFeatureMap(feature_dim=7)
    assert tuple(wide(x).shape) == (2, 3, 4, 14)
    np.testing.assert_array_equal(np_(wide.kernel)[1], np.eye(5, 7))
    clone = HedgehogFeatureMap.from_config(wide.get_config())
    assert clone.feature_dim == 7


def test_get_config_round_trip():
    layer = make_layer(
        num_heads=2,
        key_dim=4,
        feature_map=HedgehogFeatureMap(feature_dim=3),  # one instance for q and k
        normalization="norm",
        decay=True,
        rotary=True,
        max_sequence_length=50,
        output_dim=6,
        kernel_initializer="ones",
    )
    config = layer.get_config()
    clone = LinearAttention.from_config(config)
    assert clone.get_config() == config
    clone.build((None, None, D_MODEL))
    clone.set_weights(layer.get_weights())
    x = np.random.default_rng(7).standard_normal((2, 5, D_MODEL)).astype("float32")
    np.testing.assert_array_equal(np_(compiled(clone)(x)), np_(compiled(layer)(x)))


@keras.saving.register_keras_serializable(package="keras_lopt_tests")
class ScaledSoftplus(keras.layers.Layer):
    """A custom feature map with one learnable scale."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(), initializer="ones", name="scale")

    def call(self, inputs):
        return ops.softplus(inputs * self.scale)


@pytest.mark.parametrize("feature_map", ["hedgehog", ScaledSoftplus])
def test_model_save_and_load(tmp_path, feature_map):
    if not isinstance(feature_map, str):
        feature_map = feature_map()
    keras.utils.set_random_seed(8)
    inputs = keras.Input((6, D_MODEL))
    mask = keras.Input((6,), dtype="int32")
    hidden = LinearAttention(
        2, 4, feature_map=feature_map, decay=True, rotary=True, normalization="norm", chunk_size=4
    )(inputs, padding_mask=mask)
    model = keras.Model([inputs, mask], keras.layers.Dense(3)(hidden))
    for w in model.weights:
        w.assign(np_(w) + 0.1)  # so that a silently re-initialised weight shows
    x = np.random.default_rng(8).standard_normal((2, 6, D_MODEL)).astype("float32")
    m = np.array([[0, 1, 1, 1, 1, 1], [1] * 6], "int32")
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(
        np_(loaded.predict([x, m], verbose=0)), np_(model.predict([x, m], verbose=0))
    )
    layer = loaded.layers[2]
    assert type(layer.query_feature_map) is type(model.layers[2].query_feature_map)


def tiny_model(**kwargs):
    inputs = keras.Input((8, D_MODEL))
    hidden = LinearAttention(2, 4, chunk_size=4, **kwargs)(inputs)
    return keras.Model(inputs, keras.layers.Dense(1)(hidden))


def regression_data():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((16, 8, D_MODEL)).astype("float32")
    y = np.cumsum(x[..., :1], axis=1).astype("float32") / 3
    return x, y


def test_mixed_bfloat16_trains_without_nan():
    keras.utils.set_random_seed(10)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = tiny_model(feature_map="hedgehog", decay=True, rotary=True, normalization="norm")
        layer = model.layers[1]
        assert all(keras.backend.standardize_dtype(w.dtype) == "float32" for w in layer.weights)
        x, y = regression_data()
        model.compile(keras.optimizers.Adam(1e-2), "mse")
        history = model.fit(x, y, batch_size=8, epochs=3, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
        assert np.isfinite(np_(layer.decay_logit)).all()
        head, cache = compiled(layer.prefill)(x[:2])
        out, _ = compiled(layer.step)(x[:2, 0], cache)
        for y in (head, out):
            assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
            assert np.isfinite(np_(y)).all()
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_fit_reduces_loss():
    keras.utils.set_random_seed(11)
    model = tiny_model(feature_map="hedgehog", decay=True, use_bias=True)
    x, y = regression_data()
    weights = model.layers[1].trainable_weights
    before = [np_(w) for w in weights]
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    loss = model.fit(x, y, batch_size=16, epochs=15, verbose=0).history["loss"]
    assert loss[-1] < 0.8 * loss[0]
    # Every weight of the layer received a gradient (Adam leaves a zero-gradient
    # weight exactly where it was).
    assert len(weights) == 11  # 4 kernels, 4 biases, 2 Hedgehog maps, decay
    for w, old in zip(weights, before):
        assert not np.array_equal(np_(w), old), w.path


def test_compute_output_shape():
    layer = LinearAttention(2, 4, output_dim=5)
    assert layer.compute_output_shape((3, 7, D_MODEL)) == (3, 7, 5)
    assert LinearAttention(2, 4).compute_output_shape((None, None, 9)) == (None, None, 9)
    symbolic = LinearAttention(2, 4)(keras.Input((None, D_MODEL)))
    assert tuple(symbolic.shape) == (None, None, D_MODEL)


def test_bad_inputs_raise_clear_errors():
    x = np.zeros((2, 5, D_MODEL), "float32")
    with pytest.raises(ValueError, match="3-D input"):
        LinearAttention(2, 4)(x[:, 0])
    with pytest.raises(ValueError, match="3-D input"):
        LinearAttention(2, 4)(keras.Input((3, 4, D_MODEL)))
    layer = LinearAttention(2, 4)
    layer.build(x.shape)
    with pytest.raises(ValueError, match="2-D input"):
        layer.step(x, layer.init_cache(2))
    with pytest.raises(TypeError, match="int32"):
        layer(np.zeros((2, 5, D_MODEL), "int32"))
    with pytest.raises(TypeError, match="int32"):
        LinearAttention(2, 4)(keras.Input((5, D_MODEL), dtype="int32"))
    with pytest.raises(ValueError, match="cache"):
        layer.step(x[:, 0], LinearAttention(2, 3).init_cache(2))
    with pytest.raises(TypeError, match="int64"):
        layer.step(np.zeros((2, D_MODEL), "int64"), layer.init_cache(2))
    with pytest.raises(ValueError, match="divisible"):
        LinearAttention(6, 4, num_key_value_heads=4)
    with pytest.raises(ValueError, match="Unknown feature map 'cosine'"):
        LinearAttention(2, 4, feature_map="cosine")
    with pytest.raises(TypeError, match="feature_map"):
        get_feature_map(3)
    with pytest.raises(ValueError, match="Unknown normalization 'layer'"):
        LinearAttention(2, 4, normalization="layer")
    bidirectional = LinearAttention(2, 4, causal=False)
    with pytest.raises(ValueError, match="causal"):
        bidirectional.prefill(x)
    with pytest.raises(ValueError, match="causal"):
        bidirectional.step(x[:, 0], {})
    with pytest.raises(ValueError, match="causal"):
        LinearAttention(2, 4, causal=False, decay=True)
    short = LinearAttention(2, 4, max_sequence_length=4)
    with pytest.raises(ValueError, match="max_sequence_length=4"):
        short(x)
    with pytest.raises(ValueError, match="max_sequence_length=4"):
        short.prefill(x)
    with pytest.raises(ValueError, match="even key_dim"):
        LinearAttention(2, 3, rotary=True)
    with pytest.raises(ValueError, match="padding_mask"):
        layer(x, padding_mask=np.ones((2, 5, 1)))
