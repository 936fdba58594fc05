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
    with pytest.raises(ValueError, match=r"choose from \['celo2-v1', 'celo2-v2'\]"):
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
