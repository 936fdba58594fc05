"""keras-lopt: learnable training algorithms for Keras 3.

Importing the package imports (and so registers for Keras serialization)
every public class: a model saved with a `Celo2` optimizer or a `Mamba2LM`
loads in a new process after `import keras_lopt` alone. Only Keras and
NumPy are needed; JAX, TensorFlow or torch are imported by Keras for the
backend it runs on, and by `keras_lopt.meta` (JAX) when meta-training.

Layout:

* `rules`: the learned rules as pure `keras.ops` math, their routing and
  their meta-weights; `optimizers`: the Keras drivers (`Celo2`,
  `Celo2Base`, `Celo`); `meta`: the JAX meta-trainer, the other driver;
  `callbacks`: `FeedLossAndHorizon` for Celo in `fit`.
* `ops`: sequence kernels; `layers`: the mixers built on them; `models`:
  causal LMs of those mixers; `distillation`: Transformer -> linear
  attention -> Mamba-2.
* `backend`: the one module with backend-specific code.

The command line (`keras-lopt meta-train`, `python -m keras_lopt.cli`)
defaults to the JAX backend when `KERAS_BACKEND` is unset.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"


def _running_the_cli():
    # `keras-lopt ...` or `python -m keras_lopt.cli ...`: this package is
    # imported first, so the command's JAX default must be set here, before
    # Keras loads and picks its own default backend.
    argv = getattr(_sys, "orig_argv", _sys.argv)
    if _os.path.basename(_sys.argv[0] if _sys.argv else "") == "keras-lopt":
        return True
    return any(a == "-m" and b == "keras_lopt.cli" for a, b in zip(argv, argv[1:]))


def _has_jax():
    import importlib.util

    return importlib.util.find_spec("jax") is not None


# Without JAX the command still answers --help and --version on Keras's own
# default backend, and refuses meta-training with the extra to install.
if (
    "keras" not in _sys.modules and "KERAS_BACKEND" not in _os.environ
    and _running_the_cli() and _has_jax()
):
    _os.environ["KERAS_BACKEND"] = "jax"

from keras_lopt import backend  # noqa: E402
from keras_lopt import callbacks  # noqa: E402
from keras_lopt import distillation  # noqa: E402
from keras_lopt import layers  # noqa: E402
from keras_lopt import meta  # noqa: E402
from keras_lopt import models  # noqa: E402
from keras_lopt import ops  # noqa: E402
from keras_lopt import optimizers  # noqa: E402
from keras_lopt import rules  # noqa: E402
