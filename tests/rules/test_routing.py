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
