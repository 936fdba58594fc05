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


def _reference_file(name, what):
    """Path of a file in the reference folder; skips (saying why) when absent."""
    path = reference_dir()
    if not os.path.exists(os.path.join(path, name)):
        pytest.skip(
            f"{what} not found at {os.path.abspath(path)} "
            "(set KERAS_LOPT_REFERENCE_DIR or place ../shared/reference beside the repo)"
        )
    return path


@pytest.fixture(scope="session")
def reference():
    """The authors' Celo2 reference numbers; skips (saying why) when absent."""
    path = _reference_file("celo2_cases.npz", "reference data")
    return {
        "dir": path,
        "cases": np.load(os.path.join(path, "celo2_cases.npz")),
        "theta_path": os.path.join(path, "celo2_theta.state"),
    }


@pytest.fixture(scope="session")
def celo_reference():
    """The authors' Celo v1 numbers and released weights; skips when absent."""
    path = _reference_file("celo_cases.npz", "Celo reference data")
    return {
        "cases": np.load(os.path.join(path, "celo_cases.npz")),
        "theta_path": os.path.join(path, "celo_theta.state"),
    }


def backend():
    return keras.backend.backend()


jax_only = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="needs KERAS_BACKEND=jax"
)
