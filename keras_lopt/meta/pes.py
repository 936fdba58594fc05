"""Truncated Persistent Evolution Strategies (PES) for learned optimizers.

JAX only: the outer loop is `jit`-compiled, antithetic particles are
`vmap`ped, inner steps are `lax.scan`ned, and the population is sharded over
every visible JAX device. The update rule applied inside is exactly the
`keras.ops` code used by the Keras optimizers (`celo2_rule`).

Estimator (Vicol et al., 2021): for antithetic pair `theta +- eps` whose
inner runs have accumulated the perturbations `xi` since their last reset,
`g = (L+ - L-) (xi + eps) / (2 sigma^2)`; a reset inside a truncation splits
the truncation so that steps of the new run see only `eps`.
"""

import dataclasses
import math

import numpy as np

from keras_lopt.optimizers import celo2_rule
from keras_lopt.optimizers import celo_rule

RULES = ("celo2", "celo2_base", "celo")


@dataclasses.dataclass
class MetaTrainConfig:
    """Hyper-parameters of a meta-training run (all recorded in checkpoints).

    Args:
        rule: `"celo2"` (orthogonalised rule on matrices, Adam branch on
            vectors), `"celo2_base"` (the rule on every tensor) or `"celo"`
            (Celo v1: MLP plus learned LSTM scheduler on every tensor).
        phase: Celo only. `1` meta-trains the MLP with no scheduler
            (`lr_mult = 1`); `2` freezes the MLP (from `init_weights`) and
            meta-trains the scheduler. Inner runs then hand their raw
            training loss and horizon to the rule.
        seed: seeds everything; equal seeds give identical runs.
        pairs_per_family: antithetic pairs per task family.
        truncation: inner steps per outer iteration.
        min_horizon, max_horizon: inner horizons are drawn log-uniformly.
        sigma: PES perturbation scale.
        outer_lr: AdamW learning rate on the meta-weights.
        outer_weight_decay: AdamW decoupled weight decay.
        inner_lr: learning rate of the learned rule in inner runs (Celo2
            rules; Celo has none: its step is `1e-3 * ... * lr_mult`).
        adam_lr_ratio: Adam-branch multiplier (rule `"celo2"` only).
        min_scale, max_scale: range of the log-uniform reparametrisation
            scale `s` (the task optimises `L(s * w)` from `w0 / s`).
        families: names of the task families (`tasks.FAMILIES`).
        init_weights: optional path of meta-weights (`.npz` or the
            authors' `.state`) to start from instead of a random
            initialisation, e.g. to continue from shipped weights with a
            new task mix.
    """

    rule: str = "celo2"
    phase: int = 1
    seed: int = 0
    pairs_per_family: int = 8
    truncation: int = 50
    min_horizon: int = 100
    max_horizon: int = 2000
    sigma: float = 0.01
    outer_lr: float = 3e-4
    outer_beta_1: float = 0.9
    outer_beta_2: float = 0.999
    outer_epsilon: float = 1e-8
    outer_weight_decay: float = 1e-4
    inner_lr: float = 1e-3
    adam_lr_ratio: float = 20.0
    min_scale: float = 1e-3
    max_scale: float = 1e3
    families: tuple = (
        "digits_mlp",
        "mnist1d_mlp",
        "teacher_mlp",
        "mnist1d_conv",
        "teacher_regression",
        "raw_scale_binary",
    )
    init_weights: str = ""

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}; received {self.rule!r}.")
        if self.phase not in (1, 2):
            raise ValueError(f"phase must be 1 or 2; received {self.phase!r}.")
        if self.rule == "celo" and self.phase == 2 and not self.init_weights:
            raise ValueError(
                "Celo phase 2 trains the scheduler on a frozen phase-1 MLP: "
                "pass init_weights (the phase-1 theta.npz)."
            )
        if self.pairs_per_family < 1 or self.truncation < 1:
            raise ValueError("pairs_per_family and truncation must be >= 1.")
        if not 1 <= self.min_horizon <= self.max_horizon:
            raise ValueError("Need 1 <= min_horizon <= max_horizon.")


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

        from keras_lopt.meta import tasks

        if families is None:
            families = tasks.make_families(list(config.families))
        else:
            # Record what is really trained on, so checkpoints name it.
            config = dataclasses.replace(config, families=tuple(f.name for f in families))
        self.config = config
        self.families = families
        if theta is None and config.init_weights:
            from keras_lopt.optimizers.checkpoints import load_theta

            module = None if config.rule == "celo" else "ff_mod_stack/~"
            theta = load_theta(config.init_weights, module=module)
        if theta is None:
            init = celo_rule.init_theta if config.rule == "celo" else celo2_rule.init_theta
            theta = init(config.seed)
        # Meta-weights that PES perturbs and trains, and those held fixed.
        if config.rule == "celo":
            trained = celo_rule.MLP_KEYS if config.phase == 1 else celo_rule.SCHEDULER_KEYS
        else:
            trained = tuple(theta)
        self.theta0 = {k: theta[k] for k in trained}
        self.frozen = {k: np.asarray(v) for k, v in theta.items() if k not in trained}
        self.orthogonalize = config.rule == "celo2"
        devices = jax.devices()
        self.mesh = jax.sharding.Mesh(np.array(devices), ("pop",))
        self._outer_step = jax.jit(self._outer_step_impl, donate_argnums=(0,))

    # ----------------------------------------------------------------- runs
    def _routes(self, family):
        if self.orthogonalize:
            return ["rule" if len(s) >= 2 else "adam" for s in family.shapes]
        return ["rule"] * len(family.shapes)

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
        opt = []
        for shape, route in zip(family.shapes, self._routes(family)):
            if route == "rule":
                opt.append(celo2_rule.init_state(shape))
            else:
                opt.append({"m": jnp.zeros(shape), "v": jnp.zeros(shape)})
        run = {
            "params": params,
            "opt": opt,
            "key": key,
            "t": jnp.zeros((), "int32"),
            "horizon": jnp.floor(jnp.exp(log_t)).astype("int32"),
            "log_scale": log_s,
        }
        if cfg.rule == "celo":
            run["loss_buffer"] = celo_rule.init_loss_buffer()
            # The learned initial state is taken from the (perturbed) theta
            # at the first update of the run.
            zeros = jnp.zeros((len(family.shapes), celo_rule.LSTM_SIZE))
            run["lstm"] = {"hidden": zeros, "cell": zeros, "fresh": jnp.ones((), bool)}
        return run

    def _full_theta(self, theta):
        import jax.numpy as jnp

        full = {k: jnp.asarray(v) for k, v in self.frozen.items()}
        full.update(theta)
        return full

    def _inner_step(self, family, theta, run):
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
        new_params, new_opt = [], []
        for p, g, st, route in zip(run["params"], grads, run["opt"], self._routes(family)):
            if route == "rule":
                step, st = celo2_rule.celo2_step(theta, st, g, p, self.orthogonalize)
                lr = cfg.inner_lr
            else:
                step, st = celo2_rule.adam_step(st, g, run["t"] + 1)
                lr = cfg.inner_lr * cfg.adam_lr_ratio
            new_params.append(celo2_rule.apply_step(p, step, lr))
            new_opt.append(st)
        run = dict(run, params=new_params, opt=new_opt, t=run["t"] + 1)
        return run, (family.normalized_loss(loss), reset)

    def _celo_update(self, theta, run, loss, grads):
        """One Celo update of a run: loss buffer, scheduler, per-tensor MLP."""
        import jax.numpy as jnp

        n = len(grads)
        if self.config.phase == 1:
            lr_mult = jnp.ones((n,))
            lstm, buffer = run["lstm"], run["loss_buffer"]
        else:
            decays = celo_rule.loss_decays(run["horizon"])
            # As the Keras optimizer: a non-finite loss leaves the buffer and
            # the LSTM as they were.
            ok = jnp.isfinite(loss)
            features, buffer = celo_rule.update_loss_buffer(
                run["loss_buffer"], jnp.where(ok, loss, 0.0), decays
            )
            buffer = {k: jnp.where(ok, v, run["loss_buffer"][k]) for k, v in buffer.items()}
            inputs = celo_rule.scheduler_inputs(run["t"], run["horizon"], features, n)
            fresh = run["lstm"]["fresh"]
            init_hidden, init_cell = celo_rule.init_lstm_state(theta, n)
            hidden = jnp.where(fresh, init_hidden, run["lstm"]["hidden"])
            cell = jnp.where(fresh, init_cell, run["lstm"]["cell"])
            lr_mult, _, new_hidden, new_cell = celo_rule.scheduler_step(theta, hidden, cell, inputs)
            lstm = {
                "hidden": jnp.where(ok, new_hidden, hidden),
                "cell": jnp.where(ok, new_cell, cell),
                "fresh": jnp.logical_and(run["lstm"]["fresh"], ~ok),
            }
        mlp = celo_rule.mix_mlp(theta)
        new_params, new_opt = [], []
        for i, (p, g, st) in enumerate(zip(run["params"], grads, run["opt"])):
            delta, st = celo_rule.celo_step(mlp, st, g, p)
            new_params.append(p - lr_mult[i] * delta)
            new_opt.append(st)
        return dict(
            run, params=new_params, opt=new_opt, t=run["t"] + 1,
            loss_buffer=buffer, lstm=lstm,
        )

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
        b1, b2 = cfg.outer_beta_1, cfg.outer_beta_2
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state["adam_m"], grad)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state["adam_v"], grad)
        tf = t.astype("float32")

        def update(th, m, v):
            m_hat = m / (1 - b1**tf)
            v_hat = v / (1 - b2**tf)
            step = m_hat / (jnp.sqrt(v_hat) + cfg.outer_epsilon)
            return th - cfg.outer_lr * (step + cfg.outer_weight_decay * th)

        theta = jax.tree_util.tree_map(update, theta, m, v)
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
