"""Shipped weight versions and their provenance records."""

import os

import numpy as np
import pytest

from keras_lopt.optimizers import Celo, Celo2, Celo2Base
from keras_lopt.rules import theta as theta_lib

CLASSES = {"celo2": Celo2, "celo2_base": Celo2Base, "celo": Celo}


def _make(rule, weights):
    kwargs = {"total_steps": 10} if rule == "celo" else {}
    return CLASSES[rule](weights=weights, **kwargs)


@pytest.mark.parametrize("rule", theta_lib.RULES)
def test_every_shipped_version_loads_by_name_with_its_provenance(rule):
    versions = theta_lib.shipped_versions(rule)
    assert theta_lib.DEFAULT_VERSION[rule] in versions
    seen = []
    for version in versions:
        record = theta_lib.provenance(version)
        # Enough to find the run again: which run, which commit shipped it.
        assert record["version"] == version and record["rule"] == rule
        assert record["run"] and record["shipped_in"] and record["recipe"]
        assert record["wall_s"] > 0
        theta = _make(rule, version).theta
        assert all(np.isfinite(v).all() for v in theta.values())
        seen.append(theta)
    # Versions differ from one another: a version name is not an alias.
    for a, b in zip(seen, seen[1:]):
        assert any(not np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("rule", theta_lib.RULES)
def test_default_is_the_default_version(rule):
    default = _make(rule, None).theta
    named = _make(rule, theta_lib.DEFAULT_VERSION[rule]).theta
    for k in default:
        np.testing.assert_array_equal(default[k], named[k])
    assert theta_lib.provenance(rule)["version"] == theta_lib.DEFAULT_VERSION[rule]


def test_unknown_versions_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"choose from \['celo2-v1', 'celo2-v2', 'celo2-v3', 'celo2-v4'\]"):
        Celo2(weights="celo2-v99")
    with pytest.raises(ValueError, match="not a shipped weight version"):
        theta_lib.shipped_path("celo2-v99")


def test_provenance_is_written_and_read_back(tmp_path):
    path = os.path.join(tmp_path, "theta.npz")
    record = {"version": "mine-v1", "iteration": 12, "config": {"rule": "celo2"}}
    theta = theta_lib.init_theta("celo2", seed=1)
    theta_lib.save_theta(path, theta, "celo2", provenance=record)
    assert theta_lib.provenance(path) == record
    # The record is metadata: the weights load exactly, without it.
    loaded = Celo2(weights=path).theta
    assert set(loaded) == set(theta)
    for k in theta:
        np.testing.assert_array_equal(loaded[k], theta[k])
    # Re-saving loaded weights does not carry a stale record along.
    plain = os.path.join(tmp_path, "plain.npz")
    theta_lib.save_theta(plain, theta_lib.load_theta(path), "celo2")
    assert theta_lib.provenance(plain) is None


def test_momentum_theta_steps_like_orthogonalised_momentum():
    """`momentum_theta` makes Celo2 Muon-like: its step is NS(m_0.9), unit RMS."""
    from keras import ops

    from keras_lopt.rules import celo2

    rng = np.random.default_rng(0)
    theta = {k: ops.convert_to_tensor(v) for k, v in theta_lib.momentum_theta().items()}
    param = rng.standard_normal((6, 4)).astype("float32")
    state = celo2.init_state(param.shape)
    m = np.zeros_like(param)
    for _ in range(3):
        grad = rng.standard_normal(param.shape).astype("float32")
        m = 0.9 * m + 0.1 * grad
        step, state = celo2.celo2_step(theta, state, ops.convert_to_tensor(grad),
                                       ops.convert_to_tensor(param))
        expected = ops.convert_to_numpy(celo2.newton_schulz(ops.convert_to_tensor(m)))
        expected = expected / np.sqrt(np.mean(expected ** 2))
        np.testing.assert_allclose(ops.convert_to_numpy(step), expected, rtol=1e-4, atol=1e-4)
    # Loadable by name, as a meta-training starting point.
    assert Celo2(weights="momentum").theta["w2"][0, 0] == 1.0
    with pytest.raises(ValueError, match="Celo2 and Celo2Base only"):
        Celo(weights="momentum", total_steps=10)
