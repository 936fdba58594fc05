"""Which tensors the learned rule takes, which Adam takes, and in what shape.

One function, `route`, decides for one tensor, and `plan` applies it to the
variables of a model; both drivers call `plan`: the Keras optimizers in
`build`, the meta-trainer for the tensors of its task models, so meta-training
sees exactly what a user's optimizer does. A change of routing policy is a
change to this file alone.

Two policies (`mode`):

* `"deployment"` (the default; how the Celo2 authors deploy the rule). For
  `"celo2"`, the learned rule takes the hidden matrices; Adam takes tensors
  of rank <= 1, biases, embeddings, the model's input and output layers
  and kernels that stand for no matrix (depthwise convolutions, einsum
  kernels whose contracted axes are not contiguous). A kernel of rank > 2
  is seen as the matrix its layer multiplies by:

  - `Conv1D/2D/3D` (and separable convs' pointwise kernels), kernel
    `(*k, cin, cout)` -> `(prod(k) * cin, cout)`;
  - `Conv*Transpose`, kernel `(*k, cout, cin)` -> `(prod(k) * cout, cin)`
    (the transpose of the matrix it means, which the rule treats alike);
  - `EinsumDense` (so `MultiHeadAttention`'s projections), from its
    equation: contracted axes x the others, e.g. a query kernel
    `(d, heads, head_dim)` -> `(d, heads * head_dim)`, an output kernel
    `(heads, head_dim, d)` -> `(heads * head_dim, d)`.

  `"celo2_base"` and `"celo"` have no Adam branch: every tensor takes the
  rule, with the same matrix views.
* `"reference"`: what the authors' reference code does to a tensor, which
  the fidelity tests replay. Every tensor of rank >= 2 that is not an
  embedding or excluded takes the rule as it is (normalised, and for Celo2
  orthogonalised, per trailing 2-D slice); `"celo2_base"` and `"celo"`
  route every tensor to the rule as it is.

Input and output layers (deployment, `"celo2"`) are found from the model
(`model_roles`): in a Functional or Sequential model, the first layers with
a kernel reached from the model's inputs through weightless layers
(reshapes, activations, dropout, normalisation) and the last ones before its
outputs, entering nested Functional models; a model may name its own with a
`routing_io_layers()` method returning `(input_layers, output_layers)`
(`keras_lopt.models` do); in any other model, the first and last layers
with a kernel in tracking order. With no model, the first and last
variables of rank >= 2 in the variable list stand for them.
"""

import dataclasses
import math
import re

from keras import ops

from keras_lopt.rules import adam
from keras_lopt.rules import celo2

RULE = "rule"
ADAM = "adam"
MODES = ("deployment", "reference")
INPUT = "input"
OUTPUT = "output"


@dataclasses.dataclass(frozen=True)
class Route:
    """Where one tensor goes.

    Attributes:
        branch: `RULE` (the learned rule) or `ADAM`.
        shape: the shape that branch computes on (the view of the tensor;
            the tensor's own shape unless the policy reshapes it).
        reason: why, in a few words (shown by `summary`).
    """

    branch: str
    shape: tuple
    reason: str = dataclasses.field(default="", compare=False)


def exclusion_patterns(exclude_layers):
    """`exclude_layers` (or `include_layers`) as a tuple of regular expressions.

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
                "Layer patterns are regular expressions (strings) matched "
                f"against variable paths; received {pattern!r} "
                f"({type(pattern).__name__})."
            )
        re.compile(pattern)
    return patterns


def check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"routing must be one of {MODES}; received {mode!r}.")
    return mode


def _matches(path, patterns):
    return any(re.search(p, path) for p in exclusion_patterns(patterns))


def route(
    shape,
    path,
    rule,
    mode="deployment",
    layer=None,
    role=None,
    exclude_layers=(),
    include_layers=(),
    exclude_embeddings=True,
):
    """The `Route` of one tensor.

    Args:
        shape: the tensor's shape.
        path: its variable path (e.g. `"dense/kernel"`); `""` if unknown.
        rule: `"celo2"`, `"celo2_base"` or `"celo"`.
        mode: `"deployment"` or `"reference"` (module docstring).
        layer: `layer_kind(...)` of the layer that owns it, or `None` if
            unknown (the path then decides).
        role: `INPUT`, `OUTPUT` or `None`: whether its layer is an input or
            output layer of the model (`"celo2"` deployment only).
        exclude_layers: regular expressions; a matching path takes Adam
            (`"celo2"` only).
        include_layers: regular expressions; a matching path of rank >= 2
            takes the rule even where the policy says Adam (`"celo2"` only;
            `exclude_layers` wins over it).
        exclude_embeddings: send embeddings to Adam (`"celo2"` only).
    """
    shape = tuple(int(d) for d in shape)
    check_mode(mode)
    if rule not in ("celo2", "celo2_base", "celo"):
        raise ValueError(f"Unknown rule {rule!r}.")
    if mode == "reference":
        if rule != "celo2":
            return Route(RULE, shape, "every tensor")
        if len(shape) < 2:
            return Route(ADAM, shape, f"rank {len(shape)}")
        if exclude_embeddings and "embedding" in path.lower():
            return Route(ADAM, shape, "embedding")
        if _matches(path, exclude_layers):
            return Route(ADAM, shape, "exclude_layers")
        return Route(RULE, shape, "rank >= 2, per 2-D slice")

    matrix, why = matrix_view(shape, path, layer)
    if rule != "celo2":
        return Route(RULE, matrix or shape, why if matrix else "every tensor")
    if len(shape) < 2:
        return Route(ADAM, shape, f"rank {len(shape)}")
    if _matches(path, exclude_layers):
        return Route(ADAM, shape, "exclude_layers")
    if _matches(path, include_layers):
        if matrix is None:
            return Route(RULE, shape, f"include_layers; {why}, per 2-D slice")
        return Route(RULE, matrix, f"include_layers; {why}")
    if _is_bias(path, layer):
        return Route(ADAM, shape, "bias")
    if exclude_embeddings and _is_embedding(path, layer):
        return Route(ADAM, shape, "embedding")
    if role is not None:
        return Route(ADAM, shape, f"{role} layer")
    if matrix is None:
        return Route(ADAM, shape, why)
    return Route(RULE, matrix, why)


def _name(path):
    return path.rsplit("/", 1)[-1].split(":")[0].lower()


def _is_bias(path, layer):
    return (layer is not None and layer.get("variable") == "bias") or _name(path).endswith("bias")


def _is_embedding(path, layer):
    if layer is not None and layer.get("kind") == "embedding":
        return True
    return "embedding" in path.lower()


def matrix_view(shape, path, layer=None):
    """`(matrix_shape or None, reason)`: the 2-D matrix a kernel stands for.

    `layer` is a `layer_kind` description; without one, a rank > 2 tensor
    whose layer name says "conv" is read as a Keras conv kernel.
    """
    shape = tuple(int(d) for d in shape)
    kind = (layer or {}).get("kind")
    if len(shape) < 2:
        return None, f"rank {len(shape)}"
    if kind == "no_matrix":
        return None, "its layer declares no matrix"
    if kind == "depthwise":
        return None, "depthwise kernel: no matrix"
    if len(shape) == 2:
        return shape, "matrix"
    if layer is None:
        owner = path.rsplit("/", 2)[-2].lower() if path.count("/") else ""
        if "depthwise" in owner:
            kind = "depthwise"
        elif "conv" in owner and _name(path) == "kernel":
            kind = "conv"
    if kind in ("conv", "conv_transpose"):
        return (math.prod(shape[:-1]), shape[-1]), f"{kind} kernel as a matrix"
    if kind == "depthwise":
        return None, "depthwise kernel: no matrix"
    if kind == "einsum":
        view = _einsum_view(layer["equation"], shape)
        if view is None:
            return None, f"einsum kernel {layer['equation']!r}: no matrix"
        return view, "einsum kernel as a matrix" if len(view) == 2 else "einsum kernel, per head"
    return None, f"rank {len(shape)}, layout unknown"


def _einsum_view(equation, shape):
    """`(*batch, contracted, rest)` or `(*batch, rest, contracted)`: the
    kernel axes the input is contracted with, and the others, each group
    contiguous; leading axes shared by input and output (one matrix per
    head, say) stay batch axes. `None` where no reshape gives that."""
    try:
        lhs, out = equation.replace(" ", "").split("->")
        x, kernel = lhs.split(",")
    except ValueError:
        return None
    x, out, kernel = x.replace("...", ""), out.replace("...", ""), kernel.replace("...", "")
    if len(kernel) != len(shape):
        return None
    batch = 0
    while batch < len(kernel) and kernel[batch] in x and kernel[batch] in out:
        batch += 1
    axes, dims = kernel[batch:], shape[batch:]
    if any(c in x and c in out for c in axes):
        return None
    contracted = [c in x for c in axes]
    k = sum(contracted)
    if k == 0 or k == len(axes):
        return None
    if all(contracted[:k]):
        return (*shape[:batch], math.prod(dims[:k]), math.prod(dims[k:]))
    if all(contracted[-k:]):
        return (*shape[:batch], math.prod(dims[:-k]), math.prod(dims[-k:]))
    return None


# -- reading a model ------------------------------------------------------


def layer_kind(layer, variable):
    """What routing needs to know of the layer that owns `variable`: a dict
    with `kind` (`"conv"`, `"conv_transpose"`, `"depthwise"`, `"einsum"`,
    `"no_matrix"`, `"embedding"`, `"dense"` or `"other"`), `variable`
    (`"kernel"`, `"bias"` or `"other"`) and, for einsum layers, `equation`.

    A layer with kernels Keras does not know declares them with a
    `routing_layouts()` method: `{attribute name: einsum equation}`, the
    equation the layer computes with (e.g. `"bld,dhk->blhk"`), or `None`
    for a tensor that stands for no matrix (a depthwise filter).
    """
    from keras import layers as L

    def is_(name):
        return getattr(layer, name, None) is variable

    declared = getattr(layer, "routing_layouts", None)
    if callable(declared):
        for name, equation in declared().items():
            if is_(name):
                if equation is None:
                    return {"kind": "no_matrix", "variable": "kernel"}
                return {"kind": "einsum", "variable": "kernel", "equation": equation}

    which = "bias" if is_("bias") else "kernel" if is_("kernel") else "other"
    if isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D)):
        kind = "depthwise"
    elif isinstance(layer, (L.SeparableConv1D, L.SeparableConv2D)):
        kind = "depthwise" if is_("depthwise_kernel") else "conv"
        which = "kernel" if is_("pointwise_kernel") or is_("depthwise_kernel") else which
    elif isinstance(layer, (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)):
        kind = "conv_transpose"
    elif isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D)):
        kind = "conv"
    elif isinstance(layer, L.EinsumDense):
        return {"kind": "einsum", "variable": which, "equation": layer.equation}
    elif isinstance(layer, L.Embedding):
        kind = "embedding"
    elif isinstance(layer, L.Dense):
        kind = "dense"
    else:
        kind = "other"
    return {"kind": kind, "variable": which}


def _own_variables(layer):
    return [v for v in getattr(layer, "_trainable_variables", []) if v.trainable]


def _has_kernel(layer):
    """Owns (itself, not through sub-layers) a trainable tensor of rank >= 2."""
    return any(len(v.shape) >= 2 for v in _own_variables(layer))


def _is_weightless(layer):
    return not any(len(v.shape) >= 2 for v in getattr(layer, "trainable_variables", []))


def _functional(model):
    import keras

    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if hasattr(model, "_nodes_by_depth") and getattr(model, "inputs", None):
        return model
    return None


def io_layers(model):
    """`(input_layers, output_layers)` of `model` (module docstring), as lists."""
    hook = getattr(model, "routing_io_layers", None)
    if callable(hook):
        inputs, outputs = hook()
        return [l for l in inputs if l is not None], [l for l in outputs if l is not None]
    graph = _functional(model)
    if graph is None:
        weighted = [l for l in model._flatten_layers(include_self=False) if _has_kernel(l)]
        return weighted[:1], weighted[-1:]
    return _graph_ends(graph, INPUT), _graph_ends(graph, OUTPUT)


def _graph_ends(graph, side):
    """The first (`INPUT`) or last (`OUTPUT`) layers with a kernel on the
    paths through `graph`, seen through weightless layers and into nested
    Functional models; other composite layers end the search."""
    found = []

    def reached(op):
        if op in found:
            return
        if _functional(op) is not None:
            found.extend(l for l in _graph_ends(_functional(op), side) if l not in found)
        elif _has_kernel(op):
            found.append(op)
        # A composite layer of unknown structure (a Transformer block, say):
        # its first kernel is hidden from the model's inputs, not an input layer.

    if side == INPUT:
        raw = {id(x) for x in graph.inputs}
        for depth in sorted(graph._nodes_by_depth, reverse=True):
            for node in graph._nodes_by_depth[depth]:
                if node.is_input or not any(id(t) in raw for t in node.input_tensors):
                    continue
                if _is_weightless(node.operation):
                    raw.update(id(t) for t in node.outputs)
                else:
                    reached(node.operation)
        return found

    stack, seen = list(graph.outputs), set()
    while stack:
        tensor = stack.pop()
        history = getattr(tensor, "_keras_history", None)
        if history is None or history.operation is None or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        op = history.operation
        if _is_weightless(op):
            stack.extend(op._inbound_nodes[history.node_index].input_tensors)
        else:
            reached(op)
    return found


def model_roles(model):
    """`{id(variable): (layer_kind, role)}` for the trainable variables of
    `model`; `role` is `INPUT`, `OUTPUT` or `None`."""
    owners = {}
    for layer in model._flatten_layers(include_self=True):
        for v in _own_variables(layer):
            owners[id(v)] = layer  # the deepest owner wins: later in the walk
    inputs, outputs = io_layers(model)
    roles = {}
    for v in model.trainable_variables:
        layer = owners.get(id(v))
        role = None
        if layer is not None and any(layer is l for l in outputs):
            role = OUTPUT
        elif layer is not None and any(layer is l for l in inputs):
            role = INPUT
        roles[id(v)] = (layer_kind(layer, v) if layer is not None else None, role)
    return roles


def plan(variables, rule, model=None, paths=None, mode="deployment", **options):
    """The `Route` of each of `variables`, in order.

    Args:
        variables: the variables (or anything with `.shape`), in the model's
            order.
        rule: `"celo2"`, `"celo2_base"` or `"celo"`.
        model: the Keras model that owns them, if known: its layers then
            decide matrix views and input/output layers (`model_roles`).
            Without it, paths and the list's order do (module docstring).
        paths: their paths; default `variable.path`.
        mode: `"deployment"` or `"reference"`.
        **options: `exclude_layers`, `include_layers`, `exclude_embeddings`
            (see `route`).
    """
    variables = list(variables)
    if paths is None:
        paths = [getattr(v, "path", None) or getattr(v, "name", "") or "" for v in variables]
    roles = model_roles(model) if model is not None else None
    described = [None] * len(variables)
    if roles is not None:
        described = [roles.get(id(v), (None, None)) for v in variables]
    elif variables:
        described = _roles_from_order(variables, paths)
    return [
        route(v.shape, p, rule, mode=mode, layer=kind, role=role, **options)
        for v, p, (kind, role) in zip(variables, paths, described)
    ]


def _roles_from_order(variables, paths):
    """No model: the layers (path prefixes) of the first and last variables
    of rank >= 2 are the input and output layers."""
    # A path without a layer part (a raw variable's name) is its own layer.
    prefix = [p.rsplit("/", 1)[0] if "/" in p else (i,) for i, p in enumerate(paths)]
    ranked = [i for i, v in enumerate(variables) if len(v.shape) >= 2]
    first = prefix[ranked[0]] if ranked else None
    last = prefix[ranked[-1]] if ranked else None
    out = []
    for i in range(len(variables)):
        role = OUTPUT if prefix[i] == last else INPUT if prefix[i] == first else None
        out.append((None, role))
    return out


def summary(variables, routes, paths=None):
    """A table of `routes`: path, shape, branch, the shape it computes on, why."""
    if paths is None:
        paths = [getattr(v, "path", None) or getattr(v, "name", "") or "" for v in variables]
    rows = [("variable", "shape", "update", "as", "why")]
    for v, p, r in zip(variables, paths, routes):
        own = tuple(int(d) for d in v.shape)
        rows.append((p, str(own), "learned" if r.branch == RULE else "adam",
                     "" if r.shape == own else str(r.shape), r.reason))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    learned = sum(r.branch == RULE for r in routes)
    lines.append(f"{learned} of {len(routes)} variables take the learned rule.")
    return "\n".join(lines)


def state_shapes(route):
    """The per-tensor state of a route's branch: `{name: shape}`, float32.

    Celo and Celo2 keep the same accumulators (`celo2.state_shapes`).
    """
    if route.branch == RULE:
        return celo2.state_shapes(route.shape)
    return adam.state_shapes(route.shape)


def state_axes(route, shape):
    """How each state entry of `route` lies along a tensor of `shape`.

    `{name: groups}`, one group per state axis: the tuple of the tensor's
    axes that state axis runs along (several where the view merges
    contiguous axes, as a conv kernel's `(*k, cin)`; `()` for an axis of
    the state's own, the decay channels). Drivers lay out state like its
    tensor from this (`keras_lopt.backend.derived_layout`): under
    `keras.distribution.ModelParallel` a sharded kernel gets sharded state.
    """
    merged = _merged_axes(tuple(int(d) for d in shape), route.shape)
    own = celo2.state_axes(route.shape) if route.branch == RULE else adam.state_axes(route.shape)
    return {
        key: tuple(() if a is None or merged is None else merged[a] for a in axes)
        for key, axes in own.items()
    }


def _merged_axes(shape, view_shape):
    """For each axis of `view_shape`, the contiguous axes of `shape` it
    merges; `None` when the view is not such a merge."""
    groups, i = [], 0
    for size in view_shape:
        group, product = [], 1
        while i < len(shape) and product * shape[i] <= size and \
                (product < size or shape[i] == 1):
            group.append(i)
            product *= shape[i]
            i += 1
        if product != size:
            return None
        groups.append(tuple(group))
    return groups if all(d == 1 for d in shape[i:]) else None


def view(x, route):
    """`x` in the shape its branch computes on."""
    return x if tuple(x.shape) == route.shape else ops.reshape(x, route.shape)


def unview(x, shape):
    """A branch's result back in the tensor's own `shape`."""
    shape = tuple(shape)
    return x if tuple(x.shape) == shape else ops.reshape(x, shape)
