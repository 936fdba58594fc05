import os

import keras
import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_dir():
    return os.environ.get(
        "KERAS_LOPT_REFERENCE_DIR",
        os.path.join(REPO_ROOT, "..", "shared", "reference"),
    )


@pytest.fixture(scope="session")
def reference():
    """The authors' reference numbers; skips (saying why) when absent."""
    path = reference_dir()
    cases = os.path.join(path, "celo2_cases.npz")
    if not os.path.exists(cases):
        pytest.skip(
            f"reference data not found at {os.path.abspath(path)} "
            "(set KERAS_LOPT_REFERENCE_DIR or place ../shared/reference beside the repo)"
        )
    return {
        "dir": path,
        "cases": np.load(cases),
        "theta_path": os.path.join(path, "celo2_theta.state"),
    }


@pytest.fixture(scope="session")
def celo_reference():
    """The authors' Celo v1 numbers and released weights; skips when absent."""
    path = reference_dir()
    cases = os.path.join(path, "celo_cases.npz")
    if not os.path.exists(cases):
        pytest.skip(
            f"Celo reference data not found at {os.path.abspath(path)} "
            "(set KERAS_LOPT_REFERENCE_DIR or place ../shared/reference beside the repo)"
        )
    return {
        "cases": np.load(cases),
        "theta_path": os.path.join(path, "celo_theta.state"),
    }


def backend():
    return keras.backend.backend()


jax_only = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="needs KERAS_BACKEND=jax"
)
