"""Grouped updates: equally shaped, equally routed variables are updated in
one call (the rule is traced once per group, not once per variable), and
each variable's step is exactly the one it would get alone. Forced on here
(`group_updates=True`): by default JAX updates per variable."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_lopt.optimizers import Celo2
from keras_lopt.optimizers import Celo2Base


def _model():
    keras.utils.set_random_seed(1)
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8, name="inp"),
        keras.layers.Dense(8, activation="tanh", name="h1"),
        keras.layers.Dense(8, activation="tanh", name="h2"),
        keras.layers.Dense(8, activation="tanh", name="h3"),
        keras.layers.Dense(3, name="out"),
    ])


def _grads(step, variables, poison=None):
    rng = np.random.default_rng(step)
    grads = [rng.normal(size=v.shape).astype("float32") for v in variables]
    if poison is not None:
        grads[poison][0, 0] = np.nan
    return [ops.convert_to_tensor(g) for g in grads]


@pytest.mark.parametrize("cls", [Celo2, Celo2Base], ids=lambda c: c.__name__)
def test_grouped_update_equals_per_variable_updates(cls):
    runs = []
    for grouped in (True, False):
        model = _model()
        optimizer = cls(weight_decay=0.1).attach(model)
        optimizer.group_updates = grouped
        variables = model.trainable_variables
        for step in range(4):
            # Step 2 gives h2's kernel (one of a group of three) a NaN: it
            # alone keeps its value and state.
            poison = 4 if step == 2 else None
            optimizer.apply(_grads(step, variables, poison), variables)
            if step == 2:
                kept = ops.convert_to_numpy(variables[4])
            if step == 1:
                before_poison = ops.convert_to_numpy(variables[4]).copy()
        runs.append(([ops.convert_to_numpy(v) for v in variables],
                     [ops.convert_to_numpy(v) for v in optimizer.variables], kept, before_poison))
    (grouped, grouped_state, kept, before), (alone, alone_state, _, _) = runs
    np.testing.assert_array_equal(kept, before)
    assert variables[4].path.endswith("h2/kernel")
    for a, b in zip(grouped + grouped_state, alone + alone_state):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_groups_follow_branch_shape_and_decay():
    model = _model()
    optimizer = Celo2(weight_decay=0.1).attach(model)
    optimizer.exclude_from_weight_decay(var_list=model.get_layer("h3").trainable_variables)
    optimizer.build(model.trainable_variables)
    groups = optimizer._update_groups(model.trainable_variables)
    names = [sorted(model.trainable_variables[i].path.split("/", 1)[1] for i in g)
             for g in groups]
    # h1 and h2 kernels share the rule; h3's has no decay; the (8,) biases
    # share Adam except h3's; the input and output layers are Adam's alone.
    assert ["h1/kernel", "h2/kernel"] in names
    assert ["h3/kernel"] in names
    assert ["h1/bias", "h2/bias", "inp/bias"] in names
    assert sum(len(g) for g in groups) == len(model.trainable_variables)


def test_fit_with_groups_matches_per_variable_fit():
    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, 32)
    results = []
    for grouped in (True, False):
        model = _model()
        optimizer = Celo2(total_steps=8)
        optimizer.group_updates = grouped
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        results.append([ops.convert_to_numpy(v) for v in model.trainable_variables])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_default_grouping_per_backend():
    from keras_lopt.backend import grouped_updates_allowed

    assert grouped_updates_allowed() == (keras.backend.backend() != "jax")
    assert grouped_updates_allowed(prefer=True) and not grouped_updates_allowed(prefer=False)
