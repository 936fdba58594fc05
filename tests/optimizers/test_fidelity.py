"""Fidelity against the authors' reference numbers (../shared/reference)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_lopt.optimizers import Celo2
from keras_lopt.optimizers import Celo2Base
from keras_lopt.rules import celo2
from keras_lopt.rules.theta import init_theta
from keras_lopt.optimizers import load_theta
from keras_lopt.backend import jit_when_eager

# What the reference numbers record: the authors' per-tensor routing and the
# Adam variant the meta-weights were trained with.
REFERENCE = {"routing": "reference", "adam_bias_correction": False}

STEPS = 12


def _leaves(cases):
    return [str(s) for s in cases["meta/leaf_names"]]


def _variables(cases):
    """Keras variables whose paths imitate the reference's leaf names."""
    variables = {}
    for leaf in _leaves(cases):
        init = cases[f"params0/{leaf}"]
        scope, _, name = leaf.rpartition("/")
        if scope:
            with keras.name_scope(scope):
                variables[leaf] = keras.Variable(init, name=name)
        else:
            variables[leaf] = keras.Variable(init, name=name)
    return variables


def test_theta_file_matches_reference_arrays(reference):
    theta = load_theta(reference["theta_path"])
    cases = reference["cases"]
    assert sorted(theta) == sorted(celo2.THETA_SHAPES)
    for name, value in theta.items():
        np.testing.assert_array_equal(value, cases[f"theta/ff_mod_stack/~/{name}"])


@pytest.mark.parametrize("variant", ["orth", "base"])
def test_rule_steps_and_state_match_reference(reference, variant):
    cases = reference["cases"]
    theta = load_theta(reference["theta_path"])
    # On JAX, the compiled form that `fit` and the meta-trainer run.
    rule = jit_when_eager(celo2.celo2_step, static_argnames=("orthogonalize",))
    for leaf in _leaves(cases):
        param = cases[f"params0/{leaf}"]
        state = celo2.init_state(param.shape)
        for t in range(STEPS):
            step, state = rule(
                theta,
                state,
                ops.convert_to_tensor(cases[f"grads/{t}/{leaf}"]),
                ops.convert_to_tensor(param),
                orthogonalize=variant == "orth",
            )
            step = ops.convert_to_numpy(step)
            np.testing.assert_allclose(
                step, cases[f"step_{variant}/{t}/{leaf}"], rtol=0, atol=1e-4,
                err_msg=f"step {t} of {leaf}",
            )
            param = (param - np.float32(1e-3) * step).astype("float32")
            ref_mom = cases[f"state/{t}/mom/{leaf}"]
            mom = np.moveaxis(ops.convert_to_numpy(state["mom"]), 0, -1)
            np.testing.assert_allclose(
                mom.reshape(ref_mom.shape), ref_mom, rtol=1e-5, atol=1e-7,
                err_msg=f"momentum after step {t} of {leaf}",
            )
            ref_rms = cases[f"state/{t}/rms/{leaf}"]
            np.testing.assert_allclose(
                ops.convert_to_numpy(state["rms"]).reshape(ref_rms.shape), ref_rms,
                rtol=1e-5, atol=1e-30, err_msg=f"rms after step {t} of {leaf}",
            )
            for key in ("v_row", "v_col", "v_diag"):
                if f"state/{t}/{key}/{leaf}" in cases:
                    ref = cases[f"state/{t}/{key}/{leaf}"]
                    mine = np.moveaxis(ops.convert_to_numpy(state[key]), 0, -1)
                    np.testing.assert_allclose(
                        mine.reshape(ref.shape), ref, rtol=1e-5, atol=1e-30,
                        err_msg=f"{key} after step {t} of {leaf}",
                    )


def _run_optimizer(optimizer, cases):
    variables = _variables(cases)
    leaves = list(variables)
    trajectory = []
    for t in range(STEPS):
        grads = [ops.convert_to_tensor(cases[f"grads/{t}/{leaf}"]) for leaf in leaves]
        optimizer.apply(grads, [variables[leaf] for leaf in leaves])
        trajectory.append({leaf: ops.convert_to_numpy(variables[leaf]) for leaf in leaves})
    return trajectory


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda path: Celo2Base(weights=path, learning_rate=1e-3, routing="reference"), "params_base"),
        (lambda path: Celo2Base(weights=path, learning_rate=1e-3, weight_decay=0.01, routing="reference"), "full_base/params"),
        (lambda path: Celo2(weights=path, learning_rate=1e-3, weight_decay=0.01, **REFERENCE), "full/params"),
    ],
    ids=["Celo2Base", "Celo2Base-wd", "Celo2-full"],
)
def test_public_optimizer_reproduces_reference_trajectory(reference, make, key):
    cases = reference["cases"]
    trajectory = _run_optimizer(make(reference["theta_path"]), cases)
    for t, params in enumerate(trajectory):
        for leaf, value in params.items():
            np.testing.assert_allclose(
                value, cases[f"{key}/{t}/{leaf}"], rtol=0, atol=1e-6,
                err_msg=f"{key}: step {t} of {leaf}",
            )


def test_celo2_routing_matches_reference_mask(reference):
    cases = reference["cases"]
    optimizer = Celo2(weights=reference["theta_path"], **REFERENCE)
    variables = _variables(cases)
    optimizer.build(list(variables.values()))
    mask = dict(zip([str(s) for s in cases["meta/full_adam_mask_leaf_order"]],
                    cases["meta/full_adam_mask"]))
    for leaf, var in variables.items():
        route = optimizer._routes[optimizer._get_variable_index(var)]
        assert (route.branch == "adam") == bool(mask[leaf]), leaf
