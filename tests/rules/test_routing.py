"""`rules.routing`: the one routing decision, as both drivers take it."""

import keras
import numpy as np
import pytest

from keras_lopt.optimizers import Celo
from keras_lopt.optimizers import Celo2
from keras_lopt.optimizers import Celo2Base
from keras_lopt.rules import routing


def _model():
    return keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(20, 8, name="embedding"),
            keras.layers.Flatten(),
            keras.layers.Dense(8, name="body"),
            keras.layers.Dense(4, name="head"),
        ]
    )


def test_policy():
    assert routing.route((3, 4), "body/kernel", "celo2") == routing.Route("rule", (3, 4))
    assert routing.route((4,), "body/bias", "celo2").branch == "adam"
    assert routing.route((), "scale", "celo2").branch == "adam"
    assert routing.route((20, 8), "embedding/embeddings", "celo2").branch == "adam"
    assert routing.route(
        (20, 8), "embedding/embeddings", "celo2", exclude_embeddings=False
    ).branch == "rule"
    assert routing.route((8, 4), "head/kernel", "celo2", exclude_layers="head").branch == "adam"
    for rule in ("celo2_base", "celo"):
        assert routing.route((4,), "body/bias", rule).branch == "rule"
    with pytest.raises(ValueError, match="Unknown rule"):
        routing.route((3, 4), "x", "sgd")


def test_exclude_layers_string_is_one_pattern():
    assert routing.exclusion_patterns("head") == ("head",)
    assert routing.exclusion_patterns(None) == ()
    # Split into letters, "head" would also send "body/kernel" (its "d") to Adam.
    opt = Celo2(exclude_layers="head")
    assert opt.exclude_layers == ["head"]
    model = _model()
    opt.build(model.trainable_variables)
    branches = {v.path.split("/", 1)[1]: opt._routes[i].branch
                for i, v in enumerate(model.trainable_variables)}
    assert branches["body/kernel"] == "rule" and branches["head/kernel"] == "adam"
    assert Celo2.from_config(opt.get_config()).exclude_layers == ["head"]
    with pytest.raises(TypeError, match="regular expressions"):
        Celo2(exclude_layers=["head", 3])


@pytest.mark.parametrize("cls", [Celo2, Celo2Base, Celo])
def test_optimizers_take_their_routing_from_routing_route(cls, monkeypatch):
    """Every optimizer routes through `routing.route` and nothing else: a
    change there (here, every tensor to Adam or to the rule) is what it does."""
    calls = []
    original = routing.route

    def patched(shape, path, rule, **kwargs):
        calls.append((tuple(shape), path, rule))
        got = original(shape, path, rule, **kwargs)
        # Flip the decision for the body kernel only.
        if path.endswith("body/kernel"):
            flipped = routing.ADAM if got.branch == routing.RULE else routing.RULE
            return routing.Route(flipped, got.shape)
        return got

    monkeypatch.setattr(routing, "route", patched)
    model = _model()
    kwargs = {"total_steps": 5} if cls is Celo else {}
    opt = cls(**kwargs)
    if cls is not Celo2:
        # No Adam branch: the flipped kernel has no update to take.
        opt.build(model.trainable_variables)
        assert [c[2] for c in calls] == [cls.rule] * len(model.trainable_variables)
        index = [v.path for v in model.trainable_variables].index(
            next(v.path for v in model.trainable_variables if v.path.endswith("body/kernel"))
        )
        assert opt._routes[index].branch == "adam"
        grads = [np.ones(v.shape, "float32") for v in model.trainable_variables]
        with pytest.raises(NotImplementedError, match="routes no variable to Adam"):
            opt.apply(grads, model.trainable_variables, **({"loss": 1.0} if cls is Celo else {}))
        return
    opt.build(model.trainable_variables)
    assert len(calls) == len(model.trainable_variables)
    by_path = {v.path.split("/", 1)[1]: opt._routes[i] for i, v in enumerate(model.trainable_variables)}
    assert by_path["body/kernel"].branch == "adam"
    assert set(opt._states[1]) == {"m", "v"}
    # The kernel then gets exactly Adam's first step (lr 20 x 1e-3; bias
    # corrected, m_hat / (sqrt(v_hat) + eps) = 1 for a constant gradient).
    body = model.trainable_variables[1]
    start = keras.ops.convert_to_numpy(body)
    grads = [np.ones(v.shape, "float32") for v in model.trainable_variables]
    opt.apply(grads, model.trainable_variables)
    step = start - keras.ops.convert_to_numpy(body)
    np.testing.assert_allclose(step, 0.02 / (1 + 1e-8), rtol=1e-5)


# -- the deployment policy, model by model ----------------------------------


def _routes(optimizer, model):
    optimizer.attach(model).build(model.trainable_variables)
    prefix = model.name + "/"
    return {
        v.path[len(prefix):] if v.path.startswith(prefix) else v.path:
        optimizer._routes[optimizer._get_variable_index(v)]
        for v in model.trainable_variables
    }


def test_sequential_cnn_io_layers_conv_views_and_depthwise():
    model = keras.Sequential([
        keras.Input((8, 8, 2)),
        keras.layers.Conv2D(4, 3, name="stem"),
        keras.layers.Conv2D(6, 3, name="conv"),
        keras.layers.DepthwiseConv2D(3, name="dw"),
        keras.layers.SeparableConv2D(5, 1, name="sep"),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.1),
        keras.layers.Dense(16, name="hidden"),
        keras.layers.Dense(3, name="head"),
        keras.layers.Activation("softmax"),
    ])
    r = _routes(Celo2(), model)
    assert (r["stem/kernel"].branch, r["stem/kernel"].reason) == ("adam", "input layer")
    assert r["conv/kernel"] == routing.Route("rule", (3 * 3 * 4, 6))
    assert r["dw/kernel"].branch == "adam" and "depthwise" in r["dw/kernel"].reason
    assert r["sep/depthwise_kernel"].branch == "adam"
    assert r["sep/pointwise_kernel"] == routing.Route("rule", (6, 5))
    assert r["hidden/kernel"] == routing.Route("rule", (2 * 2 * 5, 16))
    # The head is found through the trailing Activation.
    assert (r["head/kernel"].branch, r["head/kernel"].reason) == ("adam", "output layer")
    assert {k for k, v in r.items() if v.branch == "rule"} == {
        "conv/kernel", "sep/pointwise_kernel", "hidden/kernel"}
    # Celo2Base and Celo: no Adam branch, the same matrix views.
    for cls, kwargs in ((Celo2Base, {}), (Celo, {"total_steps": 5})):
        base = _routes(cls(**kwargs), model)
        assert {v.branch for v in base.values()} == {"rule"}
        assert base["conv/kernel"].shape == (36, 6)
        assert base["stem/kernel"].shape == (18, 4)
    # The authors' per-slice behaviour stays available.
    ref = _routes(Celo2(routing="reference"), model)
    assert ref["conv/kernel"] == routing.Route("rule", (3, 3, 4, 6))
    assert ref["stem/kernel"].branch == ref["head/kernel"].branch == "rule"


def test_functional_attention_nested_model_and_multiple_outputs():
    inner = keras.Sequential([keras.Input((6, 8)), keras.layers.Dense(8, name="inner_first"),
                              keras.layers.Dense(8, name="inner_last")], name="inner")
    x_in = keras.Input((6, 8))
    x = inner(x_in)
    x = keras.layers.MultiHeadAttention(2, 4, name="mha")(x, x)
    x = keras.layers.LayerNormalization()(x)
    a = keras.layers.Dense(3, name="head_a")(x)
    b = keras.layers.Reshape((6, 2))(keras.layers.EinsumDense("abc,cd->abd", (6, 2), name="head_b")(x))
    model = keras.Model(x_in, [a, b])
    r = _routes(Celo2(), model)
    assert r["inner/inner_first/kernel"].reason == "input layer"  # inside the nested model
    assert r["inner/inner_last/kernel"].branch == "rule"
    assert r["mha/query/kernel"] == routing.Route("rule", (8, 8))
    assert r["mha/attention_output/kernel"] == routing.Route("rule", (8, 8))
    assert r["mha/query/bias"].reason == "bias"  # rank 2, still a bias
    assert r["head_a/kernel"].reason == r["head_b/kernel"].reason == "output layer"


def test_subclassed_model_uses_tracking_order():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.first = keras.layers.Dense(8)
            self.middle = keras.layers.Dense(8)
            self.last = keras.layers.Dense(2)

        def call(self, x):
            return self.last(self.middle(self.first(x)))

    model = Net()
    model(np.ones((1, 4), "float32"))
    optimizer = Celo2().attach(model)
    optimizer.build(model.trainable_variables)
    reasons = [route.reason for route in optimizer._routes if len(route.shape) == 2]
    assert reasons == ["input layer", "matrix", "output layer"]


@pytest.mark.parametrize("tied", [True, False])
def test_keras_lopt_models_declare_their_io_layers(tied):
    from keras_lopt.models import Mamba2LM
    from keras_lopt.models import TransformerLM

    lm = TransformerLM(50, num_layers=1, hidden_dim=16, intermediate_dim=32,
                       mixer_config={"num_heads": 2, "key_dim": 8}, tie_embeddings=tied)
    lm.build()
    r = _routes(Celo2(), lm)
    assert r["token_embedding/embeddings"].branch == "adam"
    assert r["block_0/mixer/query"] == routing.Route("rule", (16, 16))
    assert r["block_0/mixer/output"] == routing.Route("rule", (16, 16))
    assert r["block_0/mlp_in/kernel"].branch == "rule"
    if not tied:
        assert r["lm_head/kernel"].reason == "output layer"
    ssm = Mamba2LM(50, num_layers=1, hidden_dim=16, mixer_config={"head_dim": 8},
                   tie_embeddings=tied)
    ssm.build()
    r = _routes(Celo2(), ssm)
    assert r["block_0/mixer/conv_kernel"].branch == "adam"  # a depthwise filter
    assert r["block_0/mixer/in_proj_kernel"].branch == "rule"
    assert r["block_0/mixer/out_proj_kernel"].branch == "rule"


def test_keras_hub_gpt2_tied_head_and_attention_views():
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=16)
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    optimizer = Celo2()
    text = optimizer.routing_summary(lm, print_fn=None)
    assert "12 of" not in text and "6 of 20 variables take the learned rule." in text
    r = _routes(optimizer, lm)
    assert r["transformer_layer_0/self_attention/query/kernel"] == routing.Route("rule", (16, 16))
    assert r["token_embedding/embeddings"].branch == "adam"


def test_fit_finds_the_model_on_every_backend():
    """`build` is called by Keras from inside the model; the optimizer finds it."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(8),
                              keras.layers.Dense(2)])
    model.compile(optimizer=Celo2(total_steps=4), loss="mse")
    model.fit(np.ones((8, 4), "float32"), np.ones((8, 2), "float32"), batch_size=4, verbose=0)
    reasons = [r.reason for r in model.optimizer._routes if len(r.shape) == 2]
    assert reasons == ["input layer", "matrix", "output layer"]
    summary = model.optimizer.routing_summary(print_fn=None)
    assert "1 of 6 variables take the learned rule." in summary


def test_without_a_model_the_order_stands_for_the_layers():
    variables = [keras.Variable(np.zeros(s, "float32"), name=n) for s, n in
                 [((4, 8), "k0"), ((8,), "b0"), ((8, 8), "k1"), ((8, 2), "k2")]]
    # Names without a layer part: each variable is its own layer.
    routes = routing.plan(variables, "celo2", paths=["a/kernel", "a/bias", "b/kernel", "c/kernel"])
    assert [r.reason for r in routes] == ["input layer", "rank 1", "matrix", "output layer"]
    with pytest.raises(ValueError, match="routing must be one of"):
        Celo2(routing="per_tensor")


def test_einsum_views():
    view = routing._einsum_view
    assert view("abc,cde->abde", (8, 2, 4)) == (8, 8)
    assert view("abcd,cde->abe", (2, 4, 8)) == (8, 8)
    assert view("...hd,hdf->...hf", (2, 4, 6)) == (2, 4, 6)  # a matrix per head
    assert view("ab,cb->ac", (3, 5)) == (3, 5)
    assert view("abc,bdc->ad", (2, 3, 4)) is None  # contracted axes not contiguous
    assert view("abc,bcd->abd", (2, 3, 4)) == (2, 3, 4)  # b: one matrix per b
    assert view("abc,cbd->abd", (2, 3, 4)) is None  # b is shared, not leading


@pytest.mark.parametrize("kind", ["conv", "attention"])
def test_a_matrix_view_step_is_the_rule_on_the_explicit_matrix(kind):
    """Celo2 on a conv (or attention) kernel steps exactly as the rule on the
    2-D matrix the layer means."""
    from keras_lopt.rules import celo2 as rule
    from keras_lopt.rules import theta as theta_lib

    keras.utils.set_random_seed(1)
    if kind == "conv":
        inner = keras.layers.Conv2D(6, 3, name="target")
        layers = [keras.Input((7, 7, 4)), keras.layers.Conv2D(4, 1), inner,
                  keras.layers.Flatten(), keras.layers.Dense(2)]
        model = keras.Sequential(layers)
        var, matrix = inner.kernel, (36, 6)
    else:
        x_in = keras.Input((5, 8))
        x = keras.layers.Dense(8)(x_in)
        mha = keras.layers.MultiHeadAttention(2, 4, name="target")
        x = mha(x, x)
        model = keras.Model(x_in, keras.layers.Dense(2)(x))
        var, matrix = mha._query_dense.kernel, (8, 8)
    optimizer = Celo2(learning_rate=1e-2).attach(model)
    variables = model.trainable_variables
    optimizer.build(variables)
    assert optimizer._routes[optimizer._get_variable_index(var)].shape == matrix
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=v.shape).astype("float32") for v in variables]
    index = [id(v) for v in variables].index(id(var))
    start = keras.ops.convert_to_numpy(var)
    tensor = keras.ops.convert_to_tensor
    theta = {k: tensor(v) for k, v in theta_lib.load("celo2", None).items()}
    state = {k: keras.ops.zeros(s, "float32") for k, s in rule.state_shapes(matrix).items()}
    expected = tensor(start.reshape(matrix))
    for _ in range(2):
        optimizer.apply(grads, variables)
        expected, state = rule.update(theta, state, tensor(grads[index].reshape(matrix)),
                                      expected, tensor(1e-2), orthogonalize=True)
    expected = keras.ops.convert_to_numpy(expected)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(var), expected.reshape(start.shape),
                               rtol=0, atol=2e-6)


def test_routing_settings_round_trip_and_old_configs_keep_their_routing():
    opt = Celo2(routing="reference", include_layers="stem", exclude_layers=["head"], total_steps=10)
    config = opt.get_config()
    clone = Celo2.from_config(config)
    assert (clone.routing, clone.include_layers, clone.exclude_layers, clone.total_steps) == (
        "reference", ["stem"], ["head"], 10)
    assert Celo2().get_config()["routing"] == "deployment"
    # A config written before `routing` existed was routed tensor by tensor.
    del config["routing"]
    assert Celo2.from_config(config).routing == "reference"


def test_meta_trainer_and_optimizer_route_every_family_alike():
    if keras.backend.backend() != "jax":
        pytest.skip("the meta-trainer runs on JAX only")
    from keras_lopt.meta import tasks
    from keras_lopt.meta.config import MetaTrainConfig
    from keras_lopt.meta.pes import PESMetaTrainer

    families = [tasks.FAMILIES["mnist1d_conv"](), tasks.FAMILIES["digits_deep_mlp"]()]
    for rule, cls in (("celo2", Celo2), ("celo2_base", Celo2Base)):
        trainer = PESMetaTrainer(MetaTrainConfig(rule=rule, pairs_per_family=1), families=families)
        for family in families:
            optimizer = cls().attach(family.model)
            optimizer.build(family.model.trainable_variables)
            assert trainer._routes(family) == optimizer._routes, (rule, family.name)
    conv = trainer._routes(families[0])
    assert (5 * 1, 8) in [r.shape for r in conv] and (3 * 8, 8) in [r.shape for r in conv]


def test_state_axes_follow_the_tensor_through_its_view():
    rule = routing.RULE
    # A conv kernel (3, 3, 16, 32) is the (144, 32) matrix: the state's
    # rows merge the kernel's first three axes; the decay channels are the
    # state's own. Celo2 factors along the larger axis (rows, 144).
    conv = routing.state_axes(routing.Route(rule, (144, 32)), (3, 3, 16, 32))
    assert conv["rms"] == ((0, 1, 2), (3,))
    assert conv["mom"] == ((), (0, 1, 2), (3,))
    assert conv["v_row"] == ((), (3,)) and conv["v_col"] == ((), (0, 1, 2))
    # 1x1 convs and an attention output kernel (heads, head_dim, d).
    assert routing.state_axes(routing.Route(rule, (16, 8)), (1, 1, 16, 8))["rms"] == \
        ((0, 1, 2), (3,))
    assert routing.state_axes(routing.Route(rule, (32, 16)), (4, 8, 16))["rms"] == \
        ((0, 1), (2,))
    # Adam keeps the tensor's shape; a scalar's state is (1,) and its own.
    assert routing.state_axes(routing.Route(routing.ADAM, (5, 7)), (5, 7)) == \
        {"m": ((0,), (1,)), "v": ((0,), (1,))}
    assert routing.state_axes(routing.Route(rule, ()), ())["rms"] == ((),)
    assert routing.state_axes(routing.Route(rule, (3,)), (3,))["v_diag"] == ((), (0,))
    # Not a merge of whole axes: nothing is claimed.
    assert routing.state_axes(routing.Route(rule, (6, 4)), (4, 6))["rms"] == ((), ())
    for key, shape in routing.state_shapes(routing.Route(rule, (144, 32))).items():
        assert len(conv[key]) == len(shape), key


def test_derived_layout_keeps_a_sharded_axis_only_where_it_cuts_blocks():
    from keras_lopt.backend import derived_layout

    layout = keras.distribution.TensorLayout((None, None, "data", "model"))
    conv = routing.state_axes(routing.Route(routing.RULE, (144, 32)), (3, 3, 16, 32))
    # The merged rows' inner axis is sharded: the merged axis is not cut in
    # blocks, so it is replicated; the columns keep "model".
    assert derived_layout(layout, conv["mom"]).axes == (None, None, "model")
    outer = keras.distribution.TensorLayout(("model", None, None))
    assert derived_layout(outer, ((0, 1), (2,))).axes == ("model", None)
    assert derived_layout(outer, ((), (0, 1), (2,))).axes == (None, "model", None)
    assert derived_layout(None, ((0,),)) is None
