"""keras-lopt: learnable training algorithms for Keras 3.

Subpackages are imported on first use, so that command-line tools can choose
the Keras backend before Keras is imported.
"""

import importlib

__version__ = "0.1.0"
_SUBPACKAGES = ("optimizers", "callbacks", "meta", "layers", "models", "distillation")


def __getattr__(name):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"keras_lopt.{name}")
    raise AttributeError(f"module 'keras_lopt' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBPACKAGES))
