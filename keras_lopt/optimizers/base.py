"""What every learned optimizer shares: weights, routing, state, config."""

import sys
import weakref

from keras import backend
from keras import ops
from keras import optimizers

from keras_lopt.backend import densify
from keras_lopt.backend import derived_layout
from keras_lopt.backend import grouped_updates_allowed
from keras_lopt.backend import no_grad
from keras_lopt.rules import routing as routing_lib
from keras_lopt.rules import theta as theta_lib

try:
    from keras.src.optimizers.base_optimizer import (
        base_optimizer_keyword_args as BASE_ARGS_DOC,
    )
except ImportError:  # a private name of Keras; only docstrings use it
    BASE_ARGS_DOC = "Any other argument of `keras.optimizers.Optimizer`."


def fill_base_args_doc(cls):
    """Fills in the base optimizer arguments, as Keras does for its own."""
    cls.__doc__ = cls.__doc__.replace("{{base_optimizer_keyword_args}}", BASE_ARGS_DOC)
    return cls


def variable_path(variable):
    # Raw TensorFlow variables have no `path`; their name is the closest thing.
    return getattr(variable, "path", None) or getattr(variable, "name", "") or ""


def _check_float(variable):
    dtype = str(getattr(variable.dtype, "name", variable.dtype))
    if "float" not in dtype:
        raise TypeError(
            f"Learned optimizers update floating-point variables only; "
            f"{variable_path(variable)!r} has dtype {dtype}."
        )


def calling_model(var_list, depth=16):
    """The `keras.Model` that owns `var_list`, found among the callers.

    Keras builds an optimizer from inside the model it trains (`fit`,
    `train_on_batch`, `evaluate`, `compile_from_config`, the backends'
    `train_step`), with `self` the model; a custom loop usually holds the
    model in a local variable. The first model found whose trainable
    variables include every variable of `var_list` is returned, else `None`.
    """
    import keras

    wanted = {id(v) for v in var_list}
    if not wanted:
        return None
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        for name, value in list(frame.f_locals.items()):
            if isinstance(value, keras.Model) and wanted <= {
                id(v) for v in value.trainable_variables
            }:
                return value
        frame = frame.f_back
    return None


def _values(slots):
    return {k: v.value if hasattr(v, "value") else v for k, v in slots.items()}


class LearnedOptimizer(optimizers.Optimizer):
    """Base class of the learned optimizers (not for direct use).

    A subclass names its `rule` (`"celo2"`, `"celo2_base"`, `"celo"`, which
    selects its meta-weights and its routing policy in
    `keras_lopt.rules.routing`) and implements `_rule_update`; a subclass
    with an Adam branch also implements `_adam_update`. This class loads and
    validates the meta-weights, routes every variable in `build` and creates
    its state, runs the per-variable update, and writes the meta-weights
    into `get_config` (a shipped version by name, other weights as arrays).
    """

    rule = None
    # Whether the branches take `batch_axes=1` (a stack of equally shaped,
    # equally routed variables in one call; see `_backend_update_step`).
    supports_groups = False
    # None: group where the backend gains from it (`backend.
    # grouped_updates_allowed`); True / False: always / never (tests,
    # benchmarks).
    group_updates = None

    def __init__(self, learning_rate, weights=None, routing="deployment", name=None, **kwargs):
        # Every other argument (weight_decay, clipnorm, use_ema, ...) is the
        # base optimizer's, passed as is.
        super().__init__(
            learning_rate=learning_rate,
            name=name or self.__class__.__name__.lower(),
            **kwargs,
        )
        self.theta = theta_lib.load(
            self.rule, weights, what=f"{self.__class__.__name__} weights"
        )
        self._weights_name = theta_lib.version_name(self.rule, weights)
        self._theta_tensors = None
        self.routing = routing_lib.check_mode(routing)
        self._attached_model = None

    # -- routing and state ------------------------------------------------

    def _routing_options(self):
        """Keyword arguments of `routing.route` besides shape, path, rule."""
        return {}

    def attach(self, model):
        """Names the model whose variables this optimizer will update.

        Routing reads the model's layers (input and output layers, conv and
        einsum kernels' matrices). `fit` and `train_on_batch` make this
        unnecessary: the optimizer finds the model that builds it. Call it
        in a custom training loop, before the first update. Returns `self`.
        """
        if self.built:
            raise ValueError("attach(model) must come before the optimizer is built.")
        self._attached_model = weakref.ref(model)
        return self

    def _plan(self, var_list, model=None):
        if model is None and self._attached_model is not None:
            model = self._attached_model()
        if model is None:
            model = calling_model(var_list)
        return routing_lib.plan(
            var_list, self.rule, model=model,
            paths=[variable_path(v) for v in var_list],
            mode=self.routing, **self._routing_options(),
        )

    def routing_summary(self, model=None, print_fn=print):
        """Prints (and returns) how each variable is updated, and why.

        Before the optimizer is built, pass the `model` to see how it would
        route it.

        Example:

        >>> optimizer = keras_lopt.optimizers.Celo2()
        >>> optimizer.routing_summary(model)  # doctest: +SKIP
        variable                shape      update   as          why
        dense/kernel            (64, 128)  adam                 input layer
        ...
        """
        if self.built and model is None:
            variables = [v for v in self._trainable_variables]
            routes = [self._routes[self._get_variable_index(v)] for v in variables]
            kept = [(v, r) for v, r in zip(variables, routes) if r is not None]
            variables, routes = [v for v, _ in kept], [r for _, r in kept]
        elif model is not None:
            variables = model.trainable_variables
            routes = self._plan(variables, model=model)
        else:
            raise ValueError(
                "The optimizer is not built yet: pass the model, "
                "`optimizer.routing_summary(model)`."
            )
        text = routing_lib.summary(variables, routes, [variable_path(v) for v in variables])
        if print_fn is not None:
            print_fn(text)
        return text

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._routes = [None] * len(var_list)
        self._states = [None] * len(var_list)
        routes = self._plan(var_list)
        for var, route in zip(var_list, routes):
            if self._overwrite_variable_with_gradient(var):
                continue
            _check_float(var)
            index = self._get_variable_index(var)
            prefix = variable_path(var).replace("/", "_").replace(":", "_")
            if route.branch == routing_lib.ADAM:
                prefix += "_adam"
            self._routes[index] = route
            # State laid out like its variable: under a ModelParallel
            # distribution a sharded kernel's state is sharded alike, not
            # replicated on every device.
            layout = getattr(var, "_layout", None)
            axes = routing_lib.state_axes(route, var.shape)
            self._states[index] = {
                key: self._add_state(shape, f"{prefix}_{key}", derived_layout(layout, axes[key]))
                for key, shape in routing_lib.state_shapes(route).items()
            }

    def _add_state(self, shape, name, layout):
        if layout is None:  # older Keras has no `layout` argument
            return self.add_variable(shape, dtype="float32", name=name)
        return self.add_variable(shape, dtype="float32", name=name, layout=layout)

    def _theta(self):
        # Graph backends (jax tracing, tf.function) must create the constants
        # inside each trace; only eager torch can reuse one set of tensors.
        if backend.backend() != "torch":
            return self.theta
        if self._theta_tensors is None:
            self._theta_tensors = {
                k: ops.convert_to_tensor(v) for k, v in self.theta.items()
            }
        return self._theta_tensors

    # -- the update -------------------------------------------------------

    def _apply_weight_decay(self, variables):
        # Decay is applied inside `update_step`, scaled like each branch's
        # step and after the rule has seen the un-decayed parameter.
        return

    def _decay(self, variable):
        if not self.weight_decay or not self._use_weight_decay(variable):
            return 0.0
        return self.weight_decay

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        route = self._routes[index]
        slots = self._states[index]
        gradient = routing_lib.view(densify(gradient), route)
        param = routing_lib.view(variable, route)
        branch = self._rule_update if route.branch == routing_lib.RULE else self._adam_update
        new_value, new_state = branch(
            _values(slots), gradient, param, ops.cast(learning_rate, "float32"),
            self._decay(variable), index,
        )
        for key, slot in slots.items():
            self.assign(slot, new_state[key])
        new_value = routing_lib.unview(new_value, variable.shape)
        self.assign(variable, ops.cast(new_value, variable.dtype))

    def _update_groups(self, variables):
        """Lists of variable indices updated together: same branch, same
        working shape, dtype and weight decay."""
        groups = {}
        for variable in variables:
            index = self._get_variable_index(variable)
            route = self._routes[index]
            if route is None:
                continue
            key = (route.branch, tuple(route.shape), str(variable.dtype),
                   float(self._decay(variable)))
            groups.setdefault(key, []).append(index)
        return list(groups.values())

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # The rule is traced (and on JAX and TensorFlow compiled) once per
        # group instead of once per variable: a GPT-2 block's q, k, v and o
        # matrices are one call. Each variable's step is exactly its own
        # (the rules' `batch_axes`), state stays per variable, so configs,
        # checkpoints and `update_step` are unchanged.
        allowed = grouped_updates_allowed(prefer=self.group_updates)
        if not self.supports_groups or not allowed:
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        by_index = {self._get_variable_index(v): (g, v) for g, v in zip(grads, trainable_variables)}
        with no_grad():
            for group in self._update_groups(trainable_variables):
                if len(group) == 1:
                    gradient, variable = by_index[group[0]]
                    self.update_step(gradient, variable, learning_rate)
                else:
                    self._group_update_step([by_index[i] for i in group], group, learning_rate)

    def _group_update_step(self, pairs, indices, learning_rate):
        route = self._routes[indices[0]]
        variables = [v for _, v in pairs]
        gradient = ops.stack([routing_lib.view(densify(g), route) for g, _ in pairs])
        param = ops.stack([routing_lib.view(v.value, route) for v in variables])
        axes = self._stack_axes(route)
        slots = [self._states[i] for i in indices]
        state = {
            key: ops.stack([_values(s)[key] for s in slots], axis=axes.get(key, 0))
            for key in slots[0]
        }
        branch = self._rule_update if route.branch == routing_lib.RULE else self._adam_update
        new_param, new_state = branch(
            state, gradient, param, ops.cast(learning_rate, "float32"),
            self._decay(variables[0]), indices[0], batch_axes=1,
        )
        new_state = {k: ops.unstack(v, axis=axes.get(k, 0)) for k, v in new_state.items()}
        for j, (variable, value, slot) in enumerate(zip(variables, ops.unstack(new_param), slots)):
            for key, tensor in slot.items():
                self.assign(tensor, new_state[key][j])
            value = routing_lib.unview(value, variable.shape)
            self.assign(variable, ops.cast(value, variable.dtype))

    def _stack_axes(self, route):
        """The axis each state entry of `route`'s branch stacks along."""
        return {}

    def _rule_update(self, state, gradient, param, learning_rate, weight_decay, index):
        """`(new_param, new_state)` of the learned rule for one variable."""
        raise NotImplementedError

    def _adam_update(self, state, gradient, param, learning_rate, weight_decay, index):
        """`(new_param, new_state)` of the Adam branch for one variable."""
        raise NotImplementedError(
            f"{self.__class__.__name__} routes no variable to Adam."
        )

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # Configs saved before routing was an option were routed tensor by
        # tensor (today's "reference"); their optimizer state has that layout.
        config = dict(config)
        config.setdefault("routing", "reference")
        return super().from_config(config, custom_objects=custom_objects)

    def get_config(self):
        config = super().get_config()
        # Shipped weights by their version ("celo2-v2", never "the default"),
        # which never changes once shipped: a saved model keeps its weights
        # when a later release ships new defaults, and the config stays
        # small. Other weights travel as arrays (never as a path), so that a
        # saved model loads anywhere.
        if self._weights_name is not None:
            config["weights"] = self._weights_name
        else:
            config["weights"] = {k: v.tolist() for k, v in self.theta.items()}
        config["routing"] = self.routing
        return config
