"""Which tensors the learned rule takes, which Adam takes, and in what shape.

One function, `route`, decides for both drivers: the Keras optimizers call
it in `build` for every variable, the meta-trainer for every tensor of its
task models, so that meta-training sees exactly what a user's optimizer
does. A change of routing policy is a change to this file alone.

The policy today:

* `"celo2"`: tensors of rank >= 2 take the learned rule, viewed as they are
  (the rule normalises and orthogonalises each trailing 2-D slice); rank
  0/1 tensors, embeddings (`"embedding"` in the variable's path, unless
  `exclude_embeddings=False`) and paths matching `exclude_layers` take Adam.
* `"celo2_base"` and `"celo"`: every tensor takes the learned rule.
"""

import dataclasses
import re

from keras import ops

from keras_lopt.rules import adam
from keras_lopt.rules import celo2

RULE = "rule"
ADAM = "adam"


@dataclasses.dataclass(frozen=True)
class Route:
    """Where one tensor goes.

    Attributes:
        branch: `RULE` (the learned rule) or `ADAM`.
        shape: the shape that branch computes on (the view of the tensor;
            the tensor's own shape unless the policy reshapes it).
    """

    branch: str
    shape: tuple


def exclusion_patterns(exclude_layers):
    """`exclude_layers` as a tuple of regular expressions.

    A string is one pattern (not a sequence of one-letter patterns).
    """
    if exclude_layers is None:
        return ()
    if isinstance(exclude_layers, str):
        exclude_layers = (exclude_layers,)
    patterns = tuple(exclude_layers)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(
                "`exclude_layers` takes regular expressions (strings) matched "
                f"against variable paths; received {pattern!r} "
                f"({type(pattern).__name__})."
            )
        re.compile(pattern)
    return patterns


def route(shape, path, rule, exclude_layers=(), exclude_embeddings=True):
    """The `Route` of one tensor.

    Args:
        shape: the tensor's shape.
        path: its variable path (e.g. `"dense/kernel"`); `""` if unknown.
        rule: `"celo2"`, `"celo2_base"` or `"celo"`.
        exclude_layers: regular expressions (`exclusion_patterns`); a
            matching path takes Adam (`"celo2"` only).
        exclude_embeddings: send paths containing "embedding" to Adam
            (`"celo2"` only).
    """
    shape = tuple(int(d) for d in shape)
    if rule in ("celo2_base", "celo"):
        return Route(RULE, shape)
    if rule != "celo2":
        raise ValueError(f"Unknown rule {rule!r}.")
    if len(shape) < 2:
        return Route(ADAM, shape)
    if exclude_embeddings and "embedding" in path.lower():
        return Route(ADAM, shape)
    if any(re.search(pattern, path) for pattern in exclusion_patterns(exclude_layers)):
        return Route(ADAM, shape)
    return Route(RULE, shape)


def state_shapes(route):
    """The per-tensor state of a route's branch: `{name: shape}`, float32.

    Celo and Celo2 keep the same accumulators (`celo2.state_shapes`).
    """
    if route.branch == RULE:
        return celo2.state_shapes(route.shape)
    return adam.state_shapes(route.shape)


def view(x, route):
    """`x` in the shape its branch computes on."""
    return x if tuple(x.shape) == route.shape else ops.reshape(x, route.shape)


def unview(x, shape):
    """A branch's result back in the tensor's own `shape`."""
    shape = tuple(shape)
    return x if tuple(x.shape) == shape else ops.reshape(x, shape)
