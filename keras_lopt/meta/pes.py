"""Truncated Persistent Evolution Strategies (PES) for learned optimizers.

JAX only: the outer loop is `jit`-compiled, antithetic particles are
`vmap`ped, inner steps are `lax.scan`ned, and the population is sharded over
every visible JAX device. The update rule applied inside is exactly the
`keras.ops` code the Keras optimizers run (`keras_lopt.rules`), tensors are
routed by the same `rules.routing.plan` (on the task's Keras model), and Celo's scheduler advances
through the same `rules.celo.scheduler_update`.

Estimator (Vicol et al., 2021): for antithetic pair `theta +- eps` whose
inner runs have accumulated the perturbations `xi` since their last reset,
`g = (L+ - L-) (xi + eps) / (2 sigma^2)`; a reset inside a truncation splits
the truncation so that steps of the new run see only `eps`.
"""

import dataclasses
import math

import numpy as np

from keras_lopt.meta import tasks
from keras_lopt.meta.config import MetaTrainConfig
from keras_lopt.rules import adam
from keras_lopt.rules import celo
from keras_lopt.rules import celo2
from keras_lopt.rules import routing
from keras_lopt.rules import schedule
from keras_lopt.rules import theta as theta_lib

__all__ = ["MetaTrainConfig", "PESMetaTrainer", "require_jax"]

def require_jax():
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(
            "Meta-training needs the JAX backend (it relies on jax.jit, vmap "
            "and lax.scan); the current Keras backend is "
            f"{keras.backend.backend()!r}. Set KERAS_BACKEND=jax."
        )


class PESMetaTrainer:
    """Meta-trains Celo2 or Celo meta-weights with truncated PES on task families.

    Args:
        config: a `MetaTrainConfig`.
        families: list of `TaskFamily` objects; defaults to those named in
            `config.families`.
        theta: initial meta-weights; defaults to `config.init_weights` when
            set, else to the rule's `init_theta(seed)`. For Celo, only the
            phase's part (MLP or scheduler) is trained; the rest is frozen.

    Example:

    >>> trainer = PESMetaTrainer(MetaTrainConfig(rule="celo2", seed=0))
    >>> state = trainer.init()
    >>> state, metrics = trainer.outer_step(state)
    """

    def __init__(self, config, families=None, theta=None):
        require_jax()
        import jax

        if families is None:
            families = tasks.make_families(list(config.families))
        else:
            # Record what is really trained on, so checkpoints name it.
            config = dataclasses.replace(config, families=tuple(f.name for f in families))
        self.config = config
        self.families = families
        if theta is None and config.init_weights:
            theta = theta_lib.load(config.rule, config.init_weights, what="init_weights")
        if theta is None:
            theta = theta_lib.init_theta(config.rule, config.seed)
        # Meta-weights that PES perturbs and trains, and those held fixed.
        if config.rule == "celo":
            trained = celo.MLP_KEYS if config.phase == 1 else celo.SCHEDULER_KEYS
        else:
            trained = tuple(theta)
        self.theta0 = {k: theta[k] for k in trained}
        self.frozen = {k: np.asarray(v) for k, v in theta.items() if k not in trained}
        self.orthogonalize = config.rule == "celo2"
        # The optimizer's routing of each family's tensors, from its model.
        self._family_routes = {
            f.name: routing.plan(
                f.model.trainable_variables, config.rule, model=f.model, mode=config.routing
            )
            for f in families
        }
        # A family whose every tensor goes to the Adam branch gives the same
        # loss whatever theta is: its runs only add noise and dilute the
        # meta-loss (a 64-32-10 MLP under the deployment routing has no hidden
        # matrix: its input and output layers are Adam's).
        idle = [name for name, routes in self._family_routes.items()
                if not any(r.branch == routing.RULE for r in routes)]
        if idle:
            raise ValueError(
                f"Under routing={config.routing!r}, the task families {idle} send no "
                f"tensor to the learned rule, so meta-training cannot learn from them. "
                f"Use families with hidden matrices (e.g. the '*_deep' MLP families, "
                f"'mnist1d_conv', 'digits_attention'), or routing='reference'."
            )
        devices = jax.devices()
        self.mesh = jax.sharding.Mesh(np.array(devices), ("pop",))
        self._outer_step = jax.jit(self._outer_step_impl, donate_argnums=(0,))
        self._validate = None

    # ----------------------------------------------------------------- runs
    def _routes(self, family):
        return self._family_routes[family.name]

    def _init_run(self, family, key):
        import jax
        import jax.numpy as jnp

        cfg = self.config
        k_t, k_s, k_w = jax.random.split(key, 3)
        log_t = jax.random.uniform(
            k_t, (), minval=math.log(cfg.min_horizon), maxval=math.log(cfg.max_horizon)
        )
        log_s = jax.random.uniform(
            k_s, (), minval=math.log(cfg.min_scale), maxval=math.log(cfg.max_scale)
        )
        params = [w / jnp.exp(log_s) for w in family.init_params(k_w)]
        opt = [
            {k: jnp.zeros(s, "float32") for k, s in routing.state_shapes(route).items()}
            for route in self._routes(family)
        ]
        run = {
            "params": params,
            "opt": opt,
            "key": key,
            "t": jnp.zeros((), "int32"),
            "horizon": jnp.floor(jnp.exp(log_t)).astype("int32"),
            "log_scale": log_s,
        }
        if cfg.rule == "celo":
            # The learned initial LSTM state is taken from the (perturbed)
            # theta at the first update of the run (`fresh`). This layout
            # is what checkpoints hold; keep it so that they resume.
            run["loss_buffer"] = celo.init_loss_buffer()
            zeros = jnp.zeros((len(family.shapes), celo.LSTM_SIZE))
            run["lstm"] = {"hidden": zeros, "cell": zeros, "fresh": jnp.ones((), bool)}
        return run

    def _full_theta(self, theta):
        import jax.numpy as jnp

        full = {k: jnp.asarray(v) for k, v in self.frozen.items()}
        full.update(theta)
        return full

    def _inner_step(self, family, theta, run, cosine=None):
        import jax
        import jax.numpy as jnp

        cfg = self.config
        reset = run["t"] >= run["horizon"]
        fresh = self._init_run(family, jax.random.fold_in(run["key"], 7))
        run = jax.tree_util.tree_map(lambda a, b: jnp.where(reset, a, b), fresh, run)
        x, y = family.sample_batch(jax.random.fold_in(run["key"], run["t"]))
        scale = jnp.exp(run["log_scale"])

        def loss_fn(params):
            return family.loss([scale * p for p in params], x, y)

        loss, grads = jax.value_and_grad(loss_fn)(run["params"])
        if cfg.rule == "celo":
            run = self._celo_update(self._full_theta(theta), run, loss, grads)
            return run, (family.normalized_loss(loss), reset)
        lr = cfg.inner_lr
        if cosine is None and cfg.warmup_cosine_fraction > 0:
            # Each run draws its schedule once, from its own key.
            cosine = jax.random.uniform(jax.random.fold_in(run["key"], 11)) < (
                cfg.warmup_cosine_fraction)
        if cosine is not None:
            lr = lr * jnp.where(cosine, schedule.warmup_cosine(run["t"], run["horizon"]), 1.0)
        new_params, new_opt = [], []
        for p, g, st, route in zip(run["params"], grads, run["opt"], self._routes(family)):
            g, view = routing.view(g, route), routing.view(p, route)
            if route.branch == routing.RULE:
                new, st = celo2.update(
                    theta, st, g, view, lr, orthogonalize=self.orthogonalize
                )
            else:
                new, st = adam.update(
                    st, g, view, lr * cfg.adam_lr_ratio, iteration=run["t"] + 1,
                    bias_correction=cfg.adam_bias_correction,
                )
            new_params.append(routing.unview(new, p.shape))
            new_opt.append(st)
        run = dict(run, params=new_params, opt=new_opt, t=run["t"] + 1)
        return run, (family.normalized_loss(loss), reset)

    def _celo_update(self, theta, run, loss, grads):
        """One Celo update of a run: the shared scheduler step, then each tensor."""
        import jax.numpy as jnp

        n = len(grads)
        lstm = run["lstm"]
        init_hidden, init_cell = celo.init_lstm_state(theta, n)
        state = dict(
            run["loss_buffer"],
            hidden=jnp.where(lstm["fresh"], init_hidden, lstm["hidden"]),
            cell=jnp.where(lstm["fresh"], init_cell, lstm["cell"]),
        )
        lr_mult, _, loss_ok, state = celo.scheduler_update(
            theta, state, loss, run["t"], run["horizon"], celo.loss_decays(run["horizon"]),
            use_scheduler=self.config.phase == 2,
        )
        mlp = celo.mix_mlp(theta)
        new_params, new_opt = [], []
        for i, (p, g, st) in enumerate(zip(run["params"], grads, run["opt"])):
            p, st = celo.update(mlp, st, g, p, lr_mult[i], loss_ok)
            new_params.append(p)
            new_opt.append(st)
        lstm = {
            "hidden": state.pop("hidden"),
            "cell": state.pop("cell"),
            "fresh": jnp.logical_and(lstm["fresh"], ~loss_ok),
        }
        return dict(
            run, params=new_params, opt=new_opt, t=run["t"] + 1, loss_buffer=state, lstm=lstm,
        )

    # ----------------------------------------------------------- validation
    def _validation_impl(self, theta):
        import jax
        import jax.numpy as jnp

        cfg = self.config
        n, horizon = cfg.validation_runs, cfg.validation_horizon
        # A key stream of its own, so that changing the training seed or
        # iteration count leaves the validation runs as they are.
        key = jax.random.PRNGKey(cfg.validation_seed)
        means, finals = [], []
        for i, family in enumerate(self.families):
            keys = jax.random.split(jax.random.fold_in(key, i), n)
            runs = jax.vmap(lambda k: self._init_run(family, k))(keys)
            # What users run: unit scale, one horizon, warm-up + cosine
            # (or the constant rate when meta-training never sees cosine).
            runs["horizon"] = jnp.full((n,), horizon, "int32")
            # Undo the reparametrisation `_init_run` drew: w0, not w0 / s.
            scale = jnp.exp(runs["log_scale"])
            runs["params"] = [p * jnp.reshape(scale, (n,) + (1,) * (p.ndim - 1))
                              for p in runs["params"]]
            runs["log_scale"] = jnp.zeros((n,), "float32")
            cosine = cfg.rule != "celo" and cfg.warmup_cosine_fraction > 0
            step = jax.vmap(lambda run: self._inner_step(family, theta, run, cosine=cosine))

            def body(runs, _):
                runs, (loss, _) = step(runs)
                return runs, loss

            _, losses = jax.lax.scan(body, runs, None, length=horizon)
            tail = max(1, horizon // 10)
            means.append(jnp.mean(losses))
            finals.append(jnp.mean(losses[-tail:]))
        return jnp.stack(means), jnp.stack(finals)

    def validate(self, theta):
        """Scores meta-weights on a fixed set of inner runs.

        Meta-training's own loss mixes runs at every point of staggered
        horizons and changing tasks, so its curve is dominated by which runs
        happen to be early or late. Validation instead trains
        `config.validation_runs` fresh runs per family, the same ones every
        call (`config.validation_seed`), at unit scale for
        `config.validation_horizon` steps with the deployed schedule, and
        reports their normalised training loss.

        Args:
            theta: the (trained part of the) meta-weights, e.g.
                `state["theta"]`.

        Returns:
            A dict: `val_loss` (mean over families of the mean loss over
            each run, PES's objective), `val_final` (mean over families of
            the last 10% of steps), and `val_<family>` / `final_<family>`.
        """
        import jax

        if self._validate is None:
            self._validate = jax.jit(self._validation_impl)
        means, finals = jax.device_get(self._validate(theta))
        out = {"val_loss": float(np.mean(means)), "val_final": float(np.mean(finals))}
        for family, m, f in zip(self.families, means, finals):
            out[f"val_{family.name}"] = float(m)
            out[f"final_{family.name}"] = float(f)
        return out

    # ----------------------------------------------------------- population
    def _init_population(self, family, key):
        import jax
        import jax.numpy as jnp

        pairs = self.config.pairs_per_family
        k_runs, k_offsets = jax.random.split(key)
        runs = jax.vmap(lambda k: self._init_run(family, k))(
            jax.random.split(k_runs, pairs)
        )
        # Staggered starts: each run begins part-way through its horizon.
        offsets = jax.random.uniform(k_offsets, (pairs,))
        runs["t"] = jnp.floor(offsets * runs["horizon"]).astype("int32")
        # Antithetic particles: rows [0, P) are theta + eps, [P, 2P) theta - eps.
        runs = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, a]), runs)
        xi = jax.tree_util.tree_map(
            lambda v: jnp.zeros((pairs,) + v.shape, "float32"), self.theta0
        )
        return {"runs": runs, "xi": xi}

    def init(self):
        """The full meta-training state at iteration 0."""
        import jax
        import jax.numpy as jnp

        key = jax.random.PRNGKey(self.config.seed)
        k_pop, key = jax.random.split(key)
        pop_keys = jax.random.split(k_pop, len(self.families))
        theta = {k: jnp.asarray(v) for k, v in self.theta0.items()}
        state = {
            "theta": theta,
            "adam_m": jax.tree_util.tree_map(jnp.zeros_like, theta),
            "adam_v": jax.tree_util.tree_map(jnp.zeros_like, theta),
            "iteration": jnp.zeros((), "int32"),
            "key": key,
            "populations": [
                self._init_population(f, k) for f, k in zip(self.families, pop_keys)
            ],
        }
        return self.shard(state)

    def shard(self, state):
        """Places population arrays across devices (leading particle axis)."""
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec

        ndev = self.mesh.devices.size
        split = NamedSharding(self.mesh, PartitionSpec("pop"))
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def place(x):
            if ndev > 1 and x.ndim >= 1 and x.shape[0] % ndev == 0:
                return jax.device_put(x, split)
            return jax.device_put(x, replicated)

        pops = jax.tree_util.tree_map(place, state["populations"])
        rest = {k: v for k, v in state.items() if k != "populations"}
        rest = jax.tree_util.tree_map(lambda x: jax.device_put(x, replicated), rest)
        return dict(rest, populations=pops)

    # ----------------------------------------------------------- estimator
    def _family_gradient(self, family, theta, population, eps):
        import jax
        import jax.numpy as jnp

        cfg = self.config
        pairs = cfg.pairs_per_family
        thetas = jax.tree_util.tree_map(
            lambda t, e: jnp.concatenate([t[None] + e, t[None] - e]), theta, eps
        )
        step = jax.vmap(lambda th, run: self._inner_step(family, th, run))

        def body(runs, _):
            runs, out = step(thetas, runs)
            return runs, out

        runs, (losses, resets) = jax.lax.scan(
            body, population["runs"], None, length=cfg.truncation
        )
        loss_pos, loss_neg = losses[:, :pairs], losses[:, pairs:]
        in_new_run = jnp.cumsum(resets[:, :pairs].astype("int32"), axis=0) > 0
        diff = (loss_pos - loss_neg) / cfg.truncation
        diff_old = jnp.sum(jnp.where(in_new_run, 0.0, diff), axis=0)
        diff_new = jnp.sum(jnp.where(in_new_run, diff, 0.0), axis=0)
        restarted = in_new_run[-1]

        def expand(v, like):
            return v.reshape((pairs,) + (1,) * (like.ndim - 1))

        def pair_grad(xi, e):
            g = expand(diff_old, e) * (xi + e) + expand(diff_new, e) * e
            g = jnp.where(jnp.isfinite(g), g, 0.0)
            return jnp.mean(g, axis=0) / (2.0 * cfg.sigma**2)

        grad = jax.tree_util.tree_map(pair_grad, population["xi"], eps)
        xi = jax.tree_util.tree_map(
            lambda x, e: jnp.where(expand(restarted, e), e, x + e), population["xi"], eps
        )
        meta_loss = jnp.mean(losses)
        return grad, {"runs": runs, "xi": xi}, meta_loss

    def perturbations(self, key, family_index, theta):
        """The antithetic perturbations `eps` (one per pair) of a family."""
        import jax

        leaves, treedef = jax.tree_util.tree_flatten(theta)
        keys = jax.random.split(jax.random.fold_in(key, family_index), len(leaves))
        return jax.tree_util.tree_unflatten(
            treedef,
            [
                self.config.sigma
                * jax.random.normal(k, (self.config.pairs_per_family,) + leaf.shape)
                for k, leaf in zip(keys, leaves)
            ],
        )

    def _outer_step_impl(self, state):
        import jax
        import jax.numpy as jnp

        cfg = self.config
        key, k_eps = jax.random.split(state["key"])
        theta = state["theta"]
        grads, pops, losses = [], [], []
        for i, (family, population) in enumerate(zip(self.families, state["populations"])):
            eps = self.perturbations(k_eps, i, theta)
            g, pop, loss = self._family_gradient(family, theta, population, eps)
            grads.append(g)
            pops.append(pop)
            losses.append(loss)
        grad = jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *grads)
        t = state["iteration"] + 1
        theta, m, v = {}, {}, {}
        for k in state["theta"]:
            step, moments = adam.adam_step(
                {"m": state["adam_m"][k], "v": state["adam_v"][k]}, grad[k], t,
                beta_1=cfg.outer_beta_1, beta_2=cfg.outer_beta_2,
                epsilon=cfg.outer_epsilon, bias_correction=True,
            )
            theta[k] = adam.apply_step(
                state["theta"][k], step, cfg.outer_lr, cfg.outer_weight_decay
            )
            m[k], v[k] = moments["m"], moments["v"]
        grad_norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grad)))
        new_state = {
            "theta": theta,
            "adam_m": m,
            "adam_v": v,
            "iteration": t,
            "key": key,
            "populations": pops,
        }
        metrics = {"meta_loss": jnp.mean(jnp.stack(losses)), "grad_norm": grad_norm}
        for family, loss in zip(self.families, losses):
            metrics[f"loss_{family.name}"] = loss
        return new_state, metrics

    def outer_step(self, state):
        """One PES outer iteration; returns `(new_state, metrics)`."""
        return self._outer_step(state)

    def theta_numpy(self, state):
        """The full meta-weights (trained and frozen) as NumPy arrays."""
        theta = {k: np.asarray(v) for k, v in self.frozen.items()}
        theta.update({k: np.asarray(v) for k, v in state["theta"].items()})
        return theta
