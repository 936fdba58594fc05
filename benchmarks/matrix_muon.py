"""`MatrixMuon`: Keras Muon routed and reshaped like Celo2's deployment.

Keras's `Muon` orthogonalises 2-D variables only and sends every other
variable (conv kernels, attention kernels) to its AdamW branch. Celo2's
default routing (issue 14) instead gives the learned rule every hidden
matrix, viewing a kernel of rank > 2 as the matrix the layer means. For a
fair comparison the harness gives Muon the same routing: `MatrixMuon`
decides per variable in `build` with `_muon_routes(var_list, model)`:

* when `keras_lopt.rules.routing.plan` exists, its decisions for
  `rule="celo2"` (branch `"rule"` -> Muon's orthogonalised step on the
  route's 2-D `shape`, `"adam"` -> Muon's AdamW branch);
* otherwise `local_plan`, the same rule written here: AdamW for rank <= 1,
  embeddings (`"embedding"` in the path) and the model's input and output
  layers (the layers owning the first and the last variable of rank >= 2
  among the model's trainable variables, or among `var_list` when no
  model is given); the orthogonalised step for every other tensor of rank >= 2,
  viewed as a matrix: query/key/value kernels of attention `(d, heads,
  head_dim)` as `(d, heads * head_dim)`, every other kernel (conv
  `(k..., cin, cout)`, attention output `(heads, head_dim, d)`) as
  `(prod(shape[:-1]), shape[-1])`.

The orthogonalised step on a reshaped kernel is Keras Muon's own math on
the view: momentum (elementwise, so on the tensor itself), Newton-Schulz
on the Nesterov gradient reshaped to the view, Moonlight's RMS adjustment
with the view's dimensions, and the update reshaped back.
"""

import math

import keras
from keras import ops

RULE = "rule"
ADAM = "adam"

_QKV = ("query", "key", "value")


class LocalRoute:
    """What `keras_lopt.rules.routing.Route` holds: `branch`, `shape`, `reason`."""

    def __init__(self, branch, shape, reason):
        self.branch, self.shape, self.reason = branch, tuple(shape), reason

    def __repr__(self):
        return f"LocalRoute({self.branch!r}, {self.shape}, {self.reason!r})"


def _layer_path(variable):
    path = getattr(variable, "path", "") or getattr(variable, "name", "")
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _io_key(variable):
    """The layer of a variable (its path prefix; a bare name is its own layer)."""
    return _layer_path(variable) or ("variable", id(variable))


def _matrix_view(variable):
    shape = tuple(int(d) for d in variable.shape)
    if len(shape) <= 2:
        return shape
    layer = _layer_path(variable).rsplit("/", 1)[-1]
    if layer in _QKV:  # attention input projection (d, heads, head_dim)
        return (shape[0], math.prod(shape[1:]))
    return (math.prod(shape[:-1]), shape[-1])


def local_plan(variables, model=None):
    """The harness's own copy of Celo2's default routing (see the module docstring)."""
    variables = list(variables)
    # The model's variables decide its input and output layers; without a
    # model, the list's own order does (as `keras_lopt.rules.routing.plan`).
    ordered = model.trainable_variables if model is not None else variables
    weighted = [v for v in ordered if len(v.shape) >= 2]
    io_layers = {_io_key(weighted[0]), _io_key(weighted[-1])} if weighted else set()
    routes = []
    for variable in variables:
        shape = tuple(int(d) for d in variable.shape)
        path = getattr(variable, "path", "") or ""
        if len(shape) <= 1:
            routes.append(LocalRoute(ADAM, shape, "rank <= 1"))
        elif "embedding" in path.lower():
            routes.append(LocalRoute(ADAM, shape, "embedding"))
        elif _io_key(variable) in io_layers:
            routes.append(LocalRoute(ADAM, shape, "input or output layer"))
        else:
            view = _matrix_view(variable)
            reason = "hidden matrix" if view == shape else f"hidden kernel viewed as {view}"
            routes.append(LocalRoute(RULE, view, reason))
    return routes


def _muon_routes(var_list, model=None):
    """Celo2's routes for `var_list`: the library's `plan` when it has one."""
    try:
        from keras_lopt.rules.routing import plan
    except ImportError:
        return local_plan(var_list, model)
    return list(plan(var_list, rule="celo2", model=model))


class MatrixMuon(keras.optimizers.Muon):
    """Keras Muon with Celo2's routing and matrix views (module docstring).

    Args:
        model: the model whose variables it trains (to recognise its input
            and output layers); None: only rank, embeddings and shapes decide.
        **kwargs: `keras.optimizers.Muon`'s arguments (`exclude_layers` and
            `exclude_embeddings` are ignored: the routing decides).
    """

    def __init__(self, *args, model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._routing_model = model
        self.routes = None

    def build(self, var_list):
        if self.built:
            return
        self.routes = _muon_routes(var_list, self._routing_model)
        super().build(var_list)

    def _route(self, variable):
        return self.routes[self._get_variable_index(variable)]

    def _should_use_adamw(self, variable):
        return self._route(variable).branch != RULE

    def routing_table(self):
        """`(path, branch, shape, view, reason)` per variable."""
        return [(v.path, r.branch, tuple(int(d) for d in v.shape), tuple(r.shape),
                 getattr(r, "reason", ""))
                for v, r in zip(self._trainable_variables, self.routes)]

    def routing_summary(self):
        """One line per variable: path, branch, shape (and view), reason."""
        return "\n".join(
            f"{path}: {branch} {shape}" + (f" as {view}" if view != shape else "")
            + f" ({reason})"
            for path, branch, shape, view, reason in self.routing_table()
        )

    def _muon_update_step(self, gradient, variable, lr, m):
        view = tuple(self._route(variable).shape)
        if view == tuple(variable.shape):
            return super()._muon_update_step(gradient, variable, lr, m)
        self.assign_add(m, ops.add(gradient, m * (self.momentum - 1)))
        g = ops.add(gradient, self.momentum * m) if self.nesterov else m
        update = self.zeropower_via_newtonschulz5(ops.reshape(g, view), self.ns_steps)
        update = self.lr_adjust(lr * update)
        self.assign_sub(variable, ops.reshape(update, variable.shape))

    def get_config(self):
        return super().get_config()  # `model` is not serialisable; routing is rebuilt
