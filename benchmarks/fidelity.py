"""Fidelity to the authors' code: the numbers of BENCHMARKS.md's fidelity tables.

The tests (`tests/optimizers/test_fidelity.py`, `test_celo.py`) assert
thresholds; this prints the errors themselves, for one backend per run:

    KERAS_BACKEND=jax python -m benchmarks.fidelity
    KERAS_BACKEND=tensorflow python -m benchmarks.fidelity
    KERAS_BACKEND=torch python -m benchmarks.fidelity

Reads `../shared/reference` (or `KERAS_LOPT_REFERENCE_DIR`).
"""

import os

import keras
import numpy as np
from keras import ops

from keras_lopt.backend import jit_when_eager
from keras_lopt.optimizers import Celo
from keras_lopt.optimizers import Celo2
from keras_lopt.optimizers import Celo2Base
from keras_lopt.rules import celo2
from keras_lopt.rules.theta import load_theta

# What the reference numbers record: the authors' per-tensor routing and the
# Adam variant the meta-weights were trained with.
REFERENCE_ROUTING = {"routing": "reference", "adam_bias_correction": False}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.environ.get(
    "KERAS_LOPT_REFERENCE_DIR", os.path.join(ROOT, "..", "shared", "reference")
)
STEPS = 12


def _leaves(cases):
    return [str(s) for s in cases["meta/leaf_names"]]


def _variables(cases):
    # Paths that imitate the reference's leaf names, so that Celo2 routes alike.
    variables = {}
    for leaf in _leaves(cases):
        scope, _, name = leaf.rpartition("/")
        init = cases[f"params0/{leaf}"]
        if scope:
            with keras.name_scope(scope):
                variables[leaf] = keras.Variable(init, name=name)
        else:
            variables[leaf] = keras.Variable(init, name=name)
    return variables


def rule_step_error(cases, theta, orthogonalize):
    key = "orth" if orthogonalize else "base"
    rule = jit_when_eager(celo2.celo2_step, static_argnames=("orthogonalize",))
    worst = 0.0
    for leaf in _leaves(cases):
        param = cases[f"params0/{leaf}"]
        state = celo2.init_state(param.shape)
        for t in range(STEPS):
            step, state = rule(
                theta, state, ops.convert_to_tensor(cases[f"grads/{t}/{leaf}"]),
                ops.convert_to_tensor(param), orthogonalize=orthogonalize,
            )
            step = ops.convert_to_numpy(step)
            worst = max(worst, float(np.abs(step - cases[f"step_{key}/{t}/{leaf}"]).max()))
            param = (param - np.float32(1e-3) * step).astype("float32")
    return worst


def trajectory_error(optimizer, cases, key):
    variables = _variables(cases)
    leaves = list(variables)
    worst = 0.0
    for t in range(STEPS):
        grads = [ops.convert_to_tensor(cases[f"grads/{t}/{leaf}"]) for leaf in leaves]
        optimizer.apply(grads, [variables[leaf] for leaf in leaves])
        for leaf in leaves:
            value = ops.convert_to_numpy(variables[leaf])
            worst = max(worst, float(np.abs(value - cases[f"{key}/{t}/{leaf}"]).max()))
    return worst


def celo_errors(cases, theta_path):
    order = [str(s) for s in cases["meta/leaf_order_jax"]]
    variables = [
        keras.Variable(cases[f"params0/{leaf}"], name=leaf.replace("/", "_")) for leaf in order
    ]
    optimizer = Celo(weights=theta_path, total_steps=int(cases["celo/num_steps"]), routing="reference")
    previous = [cases[f"params0/{leaf}"] for leaf in order]
    lr_err = step_err = param_err = 0.0
    for t in range(len(cases["celo/losses"])):
        grads = [ops.convert_to_tensor(cases[f"celo/grads/{t}/{leaf}"]) for leaf in order]
        optimizer.apply(grads, variables, loss=cases["celo/losses"][t])
        want = float(cases[f"celo/lr_mult/{t}"][0])
        lr_err = max(lr_err, abs(optimizer.lr_mult - want) / abs(want))
        for leaf, var, before in zip(order, variables, previous):
            value = ops.convert_to_numpy(var.value)
            param_err = max(param_err, float(np.abs(value - cases[f"celo/params/{t}/{leaf}"]).max()))
            step = cases[f"celo/step/{t}/{leaf}"]
            step_err = max(
                step_err, float(np.abs((before - value) - step).max() / np.abs(step).max())
            )
        previous = [ops.convert_to_numpy(v.value) for v in variables]
    return lr_err, step_err, param_err


def main():
    backend = keras.backend.backend()
    cases = np.load(os.path.join(REFERENCE, "celo2_cases.npz"))
    theta_path = os.path.join(REFERENCE, "celo2_theta.state")
    theta = load_theta(theta_path)
    orth, base = rule_step_error(cases, theta, True), rule_step_error(cases, theta, False)
    params_base = trajectory_error(
        Celo2Base(weights=theta_path, learning_rate=1e-3, routing="reference"), cases, "params_base"
    )
    full_base = trajectory_error(
        Celo2Base(weights=theta_path, learning_rate=1e-3, weight_decay=0.01, routing="reference"), cases,
        "full_base/params",
    )
    full = trajectory_error(
        Celo2(weights=theta_path, learning_rate=1e-3, weight_decay=0.01, **REFERENCE_ROUTING), cases, "full/params"
    )
    print("Celo2 / Celo2-base (max abs errors):")
    print("| backend | rule step (orth / base) | Celo2Base params | Celo2Base wd | Celo2 wd |")
    print(f"| {backend} | {orth:.1e} / {base:.1e} | {params_base:.1e} | {full_base:.1e} | {full:.1e} |")
    celo_cases = np.load(os.path.join(REFERENCE, "celo_cases.npz"))
    lr_err, step_err, param_err = celo_errors(
        celo_cases, os.path.join(REFERENCE, "celo_theta.state")
    )
    print("Celo:")
    print("| backend | lr_mult, max relative error | step, max error / max abs step | parameters |")
    print(f"| {backend} | {lr_err:.1e} | {step_err:.1e} | {param_err:.1e} |")


if __name__ == "__main__":
    main()
