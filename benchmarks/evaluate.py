"""Compare optimizers fairly on held-out tasks (harness v2).

Run from the repository root as a module of the `benchmarks` package, on any
Keras backend:

    KERAS_BACKEND=jax .venv/bin/python -m benchmarks.evaluate            # full run (~31 min on 2 cores)
    KERAS_BACKEND=jax .venv/bin/python -m benchmarks.evaluate --quick    # smoke test (~4 min on 2 cores)
    KERAS_BACKEND=jax .venv/bin/python -m benchmarks.evaluate --estimate # the time estimate only
    KERAS_BACKEND=torch .venv/bin/python -m benchmarks.evaluate --quick --tasks autoencoder_digits
    .venv/bin/python -m benchmarks.evaluate --tasks cnn_digits_aug --optimizers celo2 adamw

Tasks (`benchmarks/eval_tasks.py`, `DEFAULT_TASKS`): nine tasks whose
training loss cannot be memorised to zero (label noise, observation noise,
fresh augmentation or noise per batch, a bottleneck, or a large corpus):
noisy tabular classification, a noisy-teacher regression, a CNN on augmented
digits, a conv denoiser, an MLP autoencoder, a small ViT, and three
byte-level LMs on the standard library's sources (a functional Keras
Transformer, a GRU, and `keras_lopt.models.Mamba2LM`). Each has a training
set, a fixed validation subset and a fixed test subset.

Optimizers (`OPTIMIZERS`; `register_optimizer` adds more before `main`):
by default `adamw` (Keras AdamW) and `muon` (`benchmarks.matrix_muon.MatrixMuon`:
Keras Muon routed like Celo2, i.e. orthogonalised steps on hidden matrices,
conv and attention kernels viewed as matrices, AdamW on vectors, embeddings
and the model's input and output layers) tuned, `celo2` at its default peak
rate 1e-3 (untuned) and `celo2_tuned`. Opt-in: `celo2_base[_tuned]`, `celo`,
`muon_keras` (Keras Muon as shipped, output layer excluded),
`muon_celo2_rates` (Muon's direction at Celo2's step sizes: a diagnostic)
and, when
`../shared/reference` holds them, `celo_released` / `celo2_released`.

Protocol (every optimizer alike):

* schedule: linear warm-up from 0 over the first 5% of the steps to the
  peak rate, then cosine decay to 0 (`warmup_cosine`; Keras `CosineDecay`
  with `warmup_target`). Its value for each step (`schedule_values`: a
  closed form checked against the Keras schedule) is assigned to the
  optimizer's learning-rate variable before the step, which is what passing
  the schedule does, but keeps the compiled step independent of the peak so
  the JAX compilation cache serves the whole grid. Celo (v1) runs its own
  learned schedule (it gets `total_steps` and each batch's loss). `celo2`
  and `celo2_tuned` share runs: the default 1e-3 is a point of the tuned
  grid, and the same rate and seed give the same run.
* peak-rate grids in half-decades (1e-3, 3.16e-3, ...); a run is seeded
  (`keras.utils.set_random_seed`), and every optimizer sees the same
  initialisation and the same batches (and augmentation) for a seed.
* validation loss: on the task's fixed validation subset, at step 0 and
  every K = max(1, steps // 20) steps, and after the last step.
* selection: a tuned optimizer's peak rate is the one with the lowest final
  validation loss, on seed 0. If it sits on an edge of the grid, the grid
  is extended by one half-decade on that side (at most `--max-extend`
  times); an optimum still on an edge is flagged in the report.
* seeds: the selected rate (the default one for untuned optimizers) is
  rerun with seeds 1 .. `--seeds`-1 (seed 0 is the selection run).

What the numbers mean (per task and seed s, against tuned AdamW's run with
the same seed):

* final validation loss: the validation loss after the last step.
* validation speedup of X: AdamW's best validation loss (lowest over its
  evaluation points) is the target; n_ref = the step where AdamW first
  reaches it, n_X = the first step where X's validation curve is <= the
  target, both linearly interpolated between evaluation points; speedup =
  n_ref / n_X. Above 1, X gets there sooner.
* training speedup: the same with the smoothed training curve (trailing
  moving average over W = max(1, round(5% of steps)) steps of the per-step
  `train_on_batch` losses, computed before each update) and AdamW's final
  smoothed training loss as the target.
* did not reach: the fraction of (task, seed) runs in which X never reaches
  the target. Those runs have no speedup: "IQM (reached)" is the
  interquartile mean over the runs that did reach it, and "IQM (0 if not)"
  counts the others as speedup 0 (never), a lower bound. 95% intervals:
  percentile stratified bootstrap over seeds within tasks (rliable style,
  2000 replicates, `benchmarks.stats`).
* ahead of AdamW: the number of tasks on which X's final validation loss,
  averaged over seeds, is below tuned AdamW's.
* performance profile: the fraction of tasks on which X's seed-averaged
  final validation loss is within a factor tau of the best optimizer's.

Reproducibility: on XLA CPU the numerics depend on how many CPUs the
process may use (its thread pool and work partitioning follow the affinity
mask), so runs of the same seed under `taskset -c 1` and `taskset -c 0,1`
differ in the last bits from the first step on (Transformer LM, AdamW:
|diff| up to 5e-7 on losses ~3-6 over 150 steps; such differences can grow
in longer or less stable runs, and they break bit-for-bit comparisons).
Within one process, and between processes with the same number of CPUs,
runs were identical. Each process of this harness pins itself to exactly ONE CPU
before the backend loads (`--workers N` runs N such processes, tasks split
between them), and torch / TensorFlow are limited to one thread
(TensorFlow also gets `enable_op_determinism`): reruns are then identical
bit for bit whatever the machine load or worker assignment (on the same
CPU model and library versions).

Outputs, under `--out` (default `benchmarks/results/evaluate`): `evaluate.md`
(the tables, also printed), `evaluate.json` (configuration; for each task
the tuning grid with every rate's validation curve, and the selected runs'
per-step training losses, validation curves, test loss, timings and
Muon's routing; the summary and performance profile; floats to 9
significant digits), `evaluate.png` (per-task validation
curves), `evaluate_train.png` (smoothed training curves),
`evaluate_profile.png` (performance profile) and, when Celo ran,
`evaluate_lr_mult.png`. With the JAX backend, compiled steps are cached in
`--jax-cache` (default `~/.cache/keras_lopt/jax_cache`), so reruns and
the rates of a grid skip XLA compilation.
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from typing import Callable

if not __package__:  # `python benchmarks/evaluate.py`: `benchmarks` is not importable
    sys.exit("Run from the repository root as a module: python -m benchmarks.evaluate "
             + shlex.join(sys.argv[1:]))


def _pin_to_one_cpu():
    """Pins this process to one CPU before any backend loads (see the docstring).

    `--pin-cpu K` chooses it; otherwise the first CPU this process may use.
    """
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--pin-cpu", type=int, default=None)
    early.add_argument("--no-pin", action="store_true")
    args = early.parse_known_args()[0]
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                "TF_NUM_INTEROP_THREADS"):
        os.environ.setdefault(var, "1")
    if not hasattr(os, "sched_setaffinity"):
        return None, [0]
    allowed = sorted(os.sched_getaffinity(0))
    if args.no_pin:
        return None, allowed
    cpu = args.pin_cpu if args.pin_cpu is not None else allowed[0]
    os.sched_setaffinity(0, {cpu})
    return cpu, allowed


# Only as a script: an importer (a test) keeps its own affinity.
PINNED_CPU, ALLOWED_CPUS = (_pin_to_one_cpu() if __name__ == "__main__"
                            else (None, sorted(getattr(os, "sched_getaffinity", lambda _: [0])(0))))

import keras  # noqa: E402  (after pinning)
import numpy as np  # noqa: E402

import keras_lopt  # noqa: E402
from benchmarks import stats  # noqa: E402
from benchmarks.eval_tasks import DEFAULT_TASKS  # noqa: E402
from benchmarks.eval_tasks import HEAD  # noqa: E402
from benchmarks.eval_tasks import TASKS  # noqa: E402
from benchmarks.matrix_muon import MatrixMuon  # noqa: E402
from keras_lopt.callbacks import FeedLossAndHorizon  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "evaluate")
DEFAULT_JAX_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "keras_lopt", "jax_cache")
REFERENCE = "adamw"
WARMUP_FRACTION = 0.05
EVALS_PER_RUN = 20
BOOTSTRAP_REPS = 2000
HALF_DECADE = 10 ** 0.5

# Default steps per task: more for cheap steps, fewer for the language
# models, so that a full run fits in ~35 min on 2 cores (see `estimate_seconds`).
TASK_STEPS = {
    "tabular_noisy": 1500, "teacher_regression": 2000, "cnn_digits_aug": 1500,
    "denoise_digits": 1000, "autoencoder_digits": 2000, "vit_digits": 800,
    "transformer_stdlib": 600, "gru_stdlib": 800, "mamba2_stdlib": 500,
    "mlp_breast_cancer": 500,
}
# ms per step on one core of the development machine (jax, `--quick` run of
# 2026-12-02), averaged over a default run's mix of runs (6 AdamW, 6 Muon,
# 8 Celo2), for the time estimate and for splitting tasks between workers.
TASK_MS = {
    "tabular_noisy": 14.8, "teacher_regression": 3.4, "cnn_digits_aug": 4.6,
    "denoise_digits": 9.5, "autoencoder_digits": 1.7, "vit_digits": 27.1,
    "transformer_stdlib": 45.6, "gru_stdlib": 21.4, "mamba2_stdlib": 46.7,
    "mlp_breast_cancer": 1.0,
}
# Seconds per run besides the steps: tracing (compilation is cached on jax)
# and the 21 validation passes.
RUN_OVERHEAD_S = 4.0
QUICK_TASK_STEPS = 60


def half_decades(low_exp, high_exp):
    """Rates 10^(k/2) for k from 2*low_exp to 2*high_exp, rounded to 3 digits."""
    return tuple(float(f"{10 ** (k / 2):.3g}") for k in range(int(2 * low_exp),
                                                                int(2 * high_exp) + 1))


def next_rate(rate, direction):
    """The half-decade neighbour of `rate` (direction -1 or +1), 3 digits.

    On the lattice 10^(k/2) (1e-3, 3.16e-3, ...) the neighbour is the next
    lattice point; elsewhere `rate` times 10^(+-1/2)."""
    k = 2 * math.log10(rate)
    if abs(k - round(k)) < 1e-2:
        return float(f"{10 ** ((round(k) + direction) / 2):.3g}")
    return float(f"{rate * HALF_DECADE ** direction:.3g}")


ADAM_GRID = half_decades(-3, -2)      # 1e-3, 3.16e-3, 1e-2
CELO2_GRID = half_decades(-3.5, -2.5)  # 3.16e-4, 1e-3, 3.16e-3
QUICK_GRID = (1e-3, 1e-2)


def warmup_steps(total_steps, warmup_fraction=WARMUP_FRACTION):
    """floor(warmup_fraction x total_steps), as `keras_lopt.optimizers.warmup_cosine`."""
    return int(math.floor(warmup_fraction * total_steps + 1e-9))


def warmup_cosine(peak, total_steps, warmup_fraction=WARMUP_FRACTION):
    """The harness's one schedule: linear warm-up from 0 to `peak` over the
    first `warmup_fraction` of `total_steps`, then cosine decay to 0.

    `keras_lopt.optimizers.warmup_cosine` when the library has it (same
    meaning), else Keras `CosineDecay` with `warmup_target`.
    """
    library = getattr(keras_lopt.optimizers, "warmup_cosine", None)
    if library is not None:
        return library(peak, total_steps, warmup_fraction=warmup_fraction)
    warmup = warmup_steps(total_steps, warmup_fraction)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=max(1, total_steps - warmup), alpha=0.0,
        warmup_target=peak, warmup_steps=warmup,
    )


_SCHEDULE_CACHE = {}


def _warmup_cosine_numpy(peak, total_steps, warmup_fraction=WARMUP_FRACTION):
    """`warmup_cosine`'s value at every step, in closed form (numpy, float64)."""
    warmup = warmup_steps(total_steps, warmup_fraction)
    decay = max(1, total_steps - warmup)
    t = np.arange(total_steps, dtype="float64")
    warm = peak * t / warmup if warmup else np.zeros_like(t)
    after = np.minimum(t, decay + warmup) - warmup
    return np.where(t < warmup, warm, peak * 0.5 * (1.0 + np.cos(np.pi * after / decay)))


def schedule_values(peak, total_steps, kind="warmup_cosine"):
    """The learning rate of each step 0 .. total_steps-1 (float64 array).

    For "warmup_cosine", the schedule object `warmup_cosine` returns,
    evaluated on all steps at once when it takes a vector of steps
    (`keras_lopt`'s does); otherwise (Keras `CosineDecay` branches with
    `ops.cond`) the closed form of `_warmup_cosine_numpy`, checked against
    the object at the steps around the warm-up's end, mid-way and at the
    end (the object costs milliseconds per step in eager mode); if they
    disagree, every step is evaluated with the object.
    """
    key = (peak, total_steps, kind)
    if key not in _SCHEDULE_CACHE:
        if kind == "constant":
            values = np.full(total_steps, float(peak))
        else:
            schedule = warmup_cosine(peak, total_steps)
            try:
                values = np.asarray(keras.ops.convert_to_numpy(
                    schedule(np.arange(total_steps, dtype="float32"))), dtype="float64")
                if values.shape != (total_steps,):
                    raise ValueError(values.shape)
                _SCHEDULE_CACHE[key] = values
                return values
            except Exception:  # noqa: BLE001 - not vectorised: closed form + probes
                pass
            values = _warmup_cosine_numpy(peak, total_steps)
            warmup = warmup_steps(total_steps)
            probe = sorted({0, 1, max(0, warmup - 1), warmup, min(total_steps - 1, warmup + 1),
                            total_steps // 2, total_steps - 1})

            def at(step):
                return float(keras.ops.convert_to_numpy(schedule(step)))

            expected = np.array([at(step) for step in probe])
            if not np.allclose(values[probe], expected, rtol=1e-5, atol=1e-7 * abs(peak)):
                log(f"warmup_cosine({peak}, {total_steps}) differs from its closed form; "
                    "evaluating it at every step")
                values = np.array([at(step) for step in range(total_steps)])
        _SCHEDULE_CACHE[key] = values
    return _SCHEDULE_CACHE[key]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluation's settings: the command line, parsed and frozen.

    Attributes:
        tasks: names in `TASKS`, in the order they run.
        optimizers: names in `OPTIMIZERS`, in report order.
        steps: steps per run for every task; None: `TASK_STEPS` (`--quick`:
            `QUICK_TASK_STEPS`).
        lrs: grid for every tuned optimizer; None: each optimizer's own.
        seeds: number of seeds of the selected rates (seed 0 selects).
        max_extend: grid extensions per side when an optimum is on an edge.
        schedule: "warmup_cosine" (default) or "constant" (for experiments).
        celo2_weights, celo2_base_weights, celo_weights: meta-weights files;
            None means the shipped defaults.
        celo2_options: `(name, value)` pairs of other `Celo2` arguments
            (e.g. `adam_lr_ratio`), for experiments on its defaults.
        weight_decay: the decoupled weight-decay coefficient of every
            optimizer (each scales it by its own step, as it documents);
            default Keras's AdamW / Muon default, 0.004.
        quick: the smoke-test budget.
        out: folder the reports are written to.
    """

    tasks: tuple
    optimizers: tuple
    steps: int | None = None
    lrs: tuple | None = None
    seeds: int = 3
    max_extend: int = 2
    schedule: str = "warmup_cosine"
    celo2_weights: str | None = None
    celo2_base_weights: str | None = None
    celo_weights: str | None = None
    weight_decay: float = 0.004
    celo2_options: tuple = ()
    quick: bool = False
    out: str = DEFAULT_OUT

    def task_steps(self, task_name):
        if self.steps:
            return self.steps
        return QUICK_TASK_STEPS if self.quick else TASK_STEPS.get(task_name, 500)

    @classmethod
    def from_args(cls, args):
        return cls(
            tasks=tuple(args.tasks), optimizers=tuple(args.optimizers), steps=args.steps,
            lrs=tuple(args.lrs) if args.lrs else None, seeds=args.seeds,
            max_extend=args.max_extend, schedule=args.schedule,
            celo2_weights=args.celo2_weights, celo2_base_weights=args.celo2_base_weights,
            celo_weights=args.celo_weights, weight_decay=args.weight_decay,
            celo2_options=tuple(_parse_options(args.celo2_option or [])),
            quick=args.quick, out=args.out,
        )


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """How to build one optimizer.

    Attributes:
        label: name shown in reports.
        make: `make(learning_rate, config, model)` returns a fresh optimizer
            for a run under `config` on `model` (built); `learning_rate` is
            the peak rate (the harness assigns each step's scheduled value).
        tuned: sweep a grid of peak rates and select on validation.
        grid: the default grid of a tuned optimizer.
        default_lr: the peak rate of an untuned one.
        loss_aware: Celo: gets `total_steps` and each batch's loss, and
            runs its learned schedule instead of the harness's.
        default: run when `--optimizers` is not given.
        family: optimizers of one family with the same rate and seed are
            the same run (e.g. `celo2` at 1e-3 is `celo2_tuned`'s 1e-3 run).
    """

    label: str
    make: Callable
    tuned: bool
    grid: tuple = ADAM_GRID
    default_lr: float | None = None
    loss_aware: bool = False
    default: bool = True
    family: str = ""


OPTIMIZERS = {}


def register_optimizer(name, label, make, tuned=False, grid=ADAM_GRID, default_lr=None,
                       loss_aware=False, default=True, family=None):
    """Adds an optimizer to the registry (and, if `default`, to the default selection).

    `make(learning_rate, config, model)` builds it (see `OptimizerSpec`).
    """
    OPTIMIZERS[name] = OptimizerSpec(label, make, tuned, tuple(grid), default_lr, loss_aware,
                                     default, family or name)


def _parse_options(items):
    """`["adam_lr_ratio=5", "adam_bias_correction=false"]` -> `[(name, value)]`."""
    out = []
    for item in items:
        name, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--celo2-option wants NAME=VALUE, got {item!r}")
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            value = lowered == "true"
        else:
            value = text
            for kind in (int, float):  # "5" -> 5, "1e-3" -> 0.001, else the text
                try:
                    value = kind(text)
                    break
                except ValueError:
                    pass
        out.append((name.strip(), value))
    return out


def _learned(class_name, weights):
    """`make` for `keras_lopt.optimizers.<class_name>`; `weights(config)` is its file."""

    def make(lr, config, model):
        options = dict(config.celo2_options) if class_name == "Celo2" else {}
        return getattr(keras_lopt.optimizers, class_name)(
            lr, weights=weights(config), weight_decay=config.weight_decay or None, **options,
        )

    return make


register_optimizer("adamw", "AdamW", lambda lr, config, model: keras.optimizers.AdamW(
    lr, weight_decay=config.weight_decay), tuned=True)
register_optimizer("muon", "Muon", lambda lr, config, model: MatrixMuon(
    lr, model=model, weight_decay=config.weight_decay, adam_weight_decay=config.weight_decay),
    tuned=True)
for _name, _class_name, _weights, _default in (
    ("celo2", "Celo2", lambda config: config.celo2_weights, True),
    ("celo2_base", "Celo2Base", lambda config: config.celo2_base_weights, False),
):
    register_optimizer(_name, _class_name, _learned(_class_name, _weights), default_lr=1e-3,
                       default=_default)
    register_optimizer(f"{_name}_tuned", f"{_class_name} (tuned)",
                       _learned(_class_name, _weights), tuned=True, grid=CELO2_GRID,
                       default=_default, family=_name)
# A diagnostic: Muon's direction (orthogonalised Nesterov momentum) with
# Celo2's step sizes, i.e. Celo2 with its learned MLP replaced by momentum:
# unit-RMS matrix steps (rms_rate 1), an Adam branch at 20x the rate with
# b2 = 0.95. Beside `celo2` at the same rate it separates what the learned
# direction contributes from what the rates do.
register_optimizer("muon_celo2_rates", "Muon (Celo2's rates)", lambda lr, config, model: MatrixMuon(
    lr, model=model, rms_rate=1.0, adam_lr_ratio=20.0, adam_beta_2=0.95,
    weight_decay=config.weight_decay, adam_weight_decay=config.weight_decay),
    default_lr=1e-3, default=False)
register_optimizer(
    "muon_keras", "Muon (Keras routing)",
    lambda lr, config, model: keras.optimizers.Muon(
        learning_rate=lr, exclude_layers=[HEAD], weight_decay=config.weight_decay,
        adam_weight_decay=config.weight_decay),
    tuned=True, default=False,
)
REFERENCE_DIR = os.environ.get(
    "KERAS_LOPT_REFERENCE_DIR", os.path.join(HERE, "..", "..", "shared", "reference")
)
RELEASED_CELO = os.path.join(REFERENCE_DIR, "celo_theta.state")
RELEASED_CELO2 = os.path.join(REFERENCE_DIR, "celo2_theta.state")
register_optimizer(
    "celo", "Celo",
    lambda lr, config, model: keras_lopt.optimizers.Celo(weights=config.celo_weights,
                                                         total_steps=config.run_steps),
    loss_aware=True, default=False,
)
if os.path.exists(RELEASED_CELO):
    register_optimizer(
        "celo_released", "Celo (released)",
        lambda lr, config, model: keras_lopt.optimizers.Celo(weights=RELEASED_CELO,
                                                             total_steps=config.run_steps),
        loss_aware=True, default=False,
    )
if os.path.exists(RELEASED_CELO2):
    register_optimizer(
        "celo2_released", "Celo2 (released)",
        lambda lr, config, model: keras_lopt.optimizers.Celo2(
            lr, weights=RELEASED_CELO2, weight_decay=config.weight_decay or None),
        default_lr=1e-3, default=False,
    )


# --- backend set-up ----------------------------------------------------------


def configure_backend(jax_cache=DEFAULT_JAX_CACHE):
    """Determinism and the JAX persistent compilation cache; returns a description."""
    backend = keras.backend.backend()
    notes = [f"pinned to CPU {PINNED_CPU}" if PINNED_CPU is not None else "not pinned"]
    if backend == "jax" and jax_cache:
        import jax

        os.makedirs(jax_cache, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", jax_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        notes.append(f"JAX compilation cache {jax_cache}")
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        notes.append("TensorFlow op determinism")
    elif backend == "torch":
        import torch

        torch.set_num_threads(1)
        notes.append("torch 1 thread")
    return "; ".join(notes)


# --- one run -----------------------------------------------------------------


class _RunConfig:
    """`EvalConfig` plus the run's length (what `make` sees as `config`)."""

    def __init__(self, config, steps):
        self._config, self.run_steps = config, steps

    def __getattr__(self, name):
        return getattr(self._config, name)


def eval_points(steps):
    """Steps after which validation is measured: 0, K, 2K, ..., steps."""
    k = max(1, steps // EVALS_PER_RUN)
    points = list(range(0, steps + 1, k))
    return points if points[-1] == steps else points + [steps]


def train(task, spec, learning_rate, seed, config, steps):
    """One seeded run; returns its curves, final losses and timings.

    A run whose training loss becomes non-finite stops there; its curves are
    padded with NaN. An exception is caught, printed and recorded as `error`.
    """
    points = eval_points(steps)
    run = {
        "learning_rate": learning_rate, "seed": seed, "steps": steps,
        "train_losses": [math.nan] * steps, "eval_steps": points,
        "val_losses": [math.nan] * len(points), "test_loss": math.nan,
        "first_step_s": math.nan, "step_s": math.nan, "wall_s": math.nan, "error": None,
    }
    start = time.perf_counter()
    try:
        keras.backend.clear_session()
        keras.utils.set_random_seed(seed)
        model = task.build_model()
        optimizer = spec.make(learning_rate, _RunConfig(config, steps), model)
        model.compile(optimizer=optimizer, loss=task.loss)
        lrs = None
        if spec.loss_aware:
            FeedLossAndHorizon.attach(model)
        else:
            lrs = schedule_values(learning_rate, steps, config.schedule)
        run.update(fit(model, task, steps, seed, lrs, points,
                       record_lr_mult=spec.loss_aware))
        if math.isfinite(run["val_losses"][-1]):
            run["test_loss"] = _evaluate(model, task.test)
        if hasattr(optimizer, "routing_table") and seed == 0:
            run["routing"] = [list(row) for row in optimizer.routing_table()]
    except Exception as error:  # noqa: BLE001 - a failing optimizer is a result
        traceback.print_exc()
        run["error"] = f"{type(error).__name__}: {error}"
    run["wall_s"] = time.perf_counter() - start
    window = stats_window(steps)
    run["smoothed_train"] = stats.smooth(run["train_losses"], window).tolist()
    run["final_train"] = run["smoothed_train"][-1]
    run["final_val"] = run["val_losses"][-1]
    return run


def stats_window(steps):
    """W = max(1, round(5% of the steps)): the training-curve smoothing window."""
    return max(1, int(round(0.05 * steps)))


def _evaluate(model, data):
    x, y = data
    return float(np.asarray(model.test_on_batch(x, y)).ravel()[0])


def fit(model, task, steps, seed, lrs, points, record_lr_mult=False):
    """`train_on_batch` over the task's batches with the scheduled rates.

    Validation is measured before the first step and after each step in
    `points`. With `record_lr_mult`, records Celo's learned multiplier.
    """
    losses, lr_mults = [], []
    val = {0: _evaluate(model, task.validation)}
    wanted = set(points)
    start = time.perf_counter()
    first_step_s, step_time = math.nan, 0.0
    for step, (x, y) in enumerate(task.batches(steps, seed)):
        if lrs is not None:
            model.optimizer.learning_rate = float(lrs[step])
        t0 = time.perf_counter()
        loss = model.train_on_batch(x, y)
        losses.append(float(np.asarray(loss).ravel()[0]))
        if step == 0:
            first_step_s = time.perf_counter() - start
        else:
            step_time += time.perf_counter() - t0
        if record_lr_mult:
            lr_mults.append(model.optimizer.lr_mult)
        if not math.isfinite(losses[-1]):
            break
        if step + 1 in wanted:
            val[step + 1] = _evaluate(model, task.validation)
    later = len(losses) - 1
    out = {
        "train_losses": losses + [math.nan] * (steps - len(losses)),
        "val_losses": [val.get(p, math.nan) for p in points],
        "first_step_s": first_step_s,
        "step_s": step_time / later if later else math.nan,
    }
    if record_lr_mult:
        out["lr_mult"] = lr_mults
    return out


# --- one task ----------------------------------------------------------------

# What must agree between an earlier report and this run for its runs to be
# reused: anything that changes a run of a given (optimizer, rate, seed).
_REUSE_KEYS = ("backend", "schedule", "weight_decay", "warmup_fraction", "evals_per_run")


def load_reused(path, config, names):
    """Runs of the optimizers `names` from an earlier `evaluate.json`, per task.

    Runs are deterministic (one CPU per process, see the module docstring),
    so a run of the same task, optimizer family, rate, seed and settings
    is the run this process would make: reusing the baselines lets a new
    candidate (other weights, another option) be compared with them without
    training them again. Every setting that changes a run must match
    (`_REUSE_KEYS`, each task's step count, and the meta-weights of a
    learned optimizer), else this raises. Returns
    `{task: {(family, lr, seed): run}}`; full runs (the selected rates'
    seeds) and the tuning grid's seed-0 summaries (enough to select a rate).
    """
    with open(path) as f:
        earlier = json.load(f)
    old = earlier["config"]
    new = {"backend": keras.backend.backend(), "schedule": config.schedule,
           "weight_decay": config.weight_decay, "warmup_fraction": WARMUP_FRACTION,
           "evals_per_run": EVALS_PER_RUN}
    wrong = [f"{k}: {old.get(k)!r} there, {new[k]!r} here" for k in _REUSE_KEYS
             if old.get(k) != new[k]]
    for name in names:
        if name not in old["optimizers"]:
            wrong.append(f"{name} did not run there")
        key = f"{OPTIMIZERS[name].family}_weights"
        if key in old and old[key] != (getattr(config, key, None) or "shipped"):
            wrong.append(f"{name}'s {key}: {old[key]!r} there")
        if OPTIMIZERS[name].family == "celo2" and \
                old.get("celo2_options", {}) != dict(config.celo2_options):
            wrong.append(f"celo2 options {old.get('celo2_options', {})} there")
    for task in config.tasks:
        if task in old["task_steps"] and old["task_steps"][task] != config.task_steps(task):
            wrong.append(f"{task} ran {old['task_steps'][task]} steps there, "
                         f"{config.task_steps(task)} here")
    if wrong:
        raise SystemExit(f"--reuse {path}: its runs differ from this evaluation's: "
                         + "; ".join(wrong))

    def restore(run, steps):
        run = {k: (math.nan if v is None and k != "error" and k != "lr_mult" else v)
               for k, v in run.items()}
        for k in ("train_losses", "val_losses"):
            if k in run:
                run[k] = [math.nan if v is None else v for v in run[k]]
        run.setdefault("error", None)
        if "train_losses" in run:
            # From the float32 losses, stored exactly: the same float64 curve
            # and target as the run had (the stored smoothed value is rounded).
            run["smoothed_train"] = stats.smooth(run["train_losses"], stats_window(steps)).tolist()
            run["final_train"] = run["smoothed_train"][-1]
        return run

    families = {OPTIMIZERS[n].family for n in names}
    out = {}
    for task, result in earlier["tasks"].items():
        if task not in config.tasks:
            continue
        steps = result["steps"]
        runs = {}
        for key, run in result.get("grid_runs", {}).items():
            family, lr, seed = key.split("|")
            if family in families:
                runs[(family, _lr_key(None if lr == "None" else float(lr)), int(seed))] = \
                    restore(run, steps)
        for name, selected in result["runs"].items():
            if name in names:
                for run in selected:  # full runs replace the grid's summaries
                    key = (OPTIMIZERS[name].family, _lr_key(run["learning_rate"]), run["seed"])
                    runs[key] = restore(run, steps)
        out[task] = runs
    return out


def _score(run):
    value = run["final_val"]
    return value if (run["error"] is None and math.isfinite(value)) else math.inf


def _lr_key(lr):
    # Rates as the JSON report stores them (9 significant digits), so that
    # runs read back by `--reuse` meet the same grid points.
    return None if lr is None else float(f"{lr:.9g}")


def evaluate_task(task, config, log=print, reused=None):
    """Tuning (seed 0), reruns of the selected rates, per-seed speedups.

    `reused`: runs of an earlier report, `{(family, lr, seed): run}` (see
    `load_reused`), taken instead of training them again.
    """
    steps = config.task_steps(task.name)
    cache = dict(reused or {})  # (family, lr, seed) -> run

    def run_once(name, lr, seed):
        spec = OPTIMIZERS[name]
        key = (spec.family, _lr_key(lr), seed)
        if key not in cache:
            cache[key] = train(task, spec, lr, seed, config, steps)
            r = cache[key]
            log(f"[{task.name}] {spec.label} lr={lr if lr is None else f'{lr:.3g}'} seed={seed}: "
                f"final val {r['final_val']:.4g}, train {r['final_train']:.4g}, "
                f"{1e3 * r['step_s']:.1f} ms/step, {r['wall_s']:.1f} s"
                + (f" ERROR {r['error']}" if r["error"] else ""))
        return cache[key]

    result = {"description": task.description, "why_not_zero": task.why_not_zero,
              "log_y": task.log_y, "steps": steps, "tuning": {}, "runs": {}}
    for name in config.optimizers:
        spec = OPTIMIZERS[name]
        if spec.tuned:
            grid = sorted(config.lrs or (QUICK_GRID if config.quick else spec.grid))
            extend = 0 if (config.quick or config.lrs) else config.max_extend
            extended = {"low": 0, "high": 0}
            while True:
                scores = [_score(run_once(name, lr, 0)) for lr in grid]
                best = int(np.argmin(scores))
                edge = stats.grid_edge(grid, best) if math.isfinite(scores[best]) else None
                if edge is None or extended[edge] >= extend:
                    break
                extended[edge] += 1
                grid = sorted(grid + [next_rate(grid[best], -1 if edge == "low" else 1)])
            lr = grid[best]
            result["tuning"][name] = {"grid": grid, "final_val": scores, "selected": lr,
                                      "edge": edge, "extended": extended}
        else:
            lr = spec.default_lr
        result["runs"][name] = [run_once(name, lr, seed) for seed in range(config.seeds)]
    result["grid_runs"] = {
        f"{family}|{lr}|{seed}": {k: r[k] for k in ("learning_rate", "seed", "final_val",
                                                    "final_train", "eval_steps", "val_losses")}
        for (family, lr, seed), r in cache.items() if seed == 0
    }
    result["speedup"] = task_speedups(result)
    return result


def speedup_of(reference, run, kind):
    """Speedup of `run` over `reference` (same seed); see the module docstring.

    Returns a dict with `value` (None if not reached) and the step counts,
    or None if either run failed.
    """
    if reference["error"] or run["error"]:
        return None
    if kind == "val":
        steps_ref, curve_ref = reference["eval_steps"], reference["val_losses"]
        steps_x, curve_x = run["eval_steps"], run["val_losses"]
        finite = [v for v in curve_ref if math.isfinite(v)]
        target = min(finite) if finite else math.nan
    else:
        steps_ref = steps_x = np.arange(1, reference["steps"] + 1)
        curve_ref, curve_x = reference["smoothed_train"], run["smoothed_train"]
        target = reference["final_train"]
    n_ref = stats.steps_to_reach(steps_ref, curve_ref, target)
    n_x = stats.steps_to_reach(steps_x, curve_x, target)
    if n_ref is None:
        return None
    value = None if n_x is None else n_ref / max(n_x, 1e-9)
    return {"value": value, "steps": n_x, "reference_steps": n_ref, "target": target}


def task_speedups(task_result):
    """Per optimizer (except the reference), per seed, both kinds."""
    if REFERENCE not in task_result["runs"]:
        return {}
    refs = task_result["runs"][REFERENCE]
    return {
        name: {kind: [speedup_of(ref, run, kind) for ref, run in zip(refs, runs)]
               for kind in ("val", "train")}
        for name, runs in task_result["runs"].items() if name != REFERENCE
    }


# --- summary -----------------------------------------------------------------


def _mean_final(runs, key="final_val"):
    values = [r[key] for r in runs if r["error"] is None and math.isfinite(r[key])]
    return float(np.mean(values)) if len(values) == len(runs) else math.nan


def summarize(results):
    """IQM speedups with intervals, did-not-reach fractions, tasks ahead of AdamW."""
    tasks = results["tasks"]
    names = results["config"]["optimizers"]
    summary = {}
    for name in names:
        entry = {}
        if name != REFERENCE and all(name in t["speedup"] for t in tasks.values()):
            for kind in ("val", "train"):
                rows = []
                for t in tasks.values():
                    rows.append([math.nan if s is None or s["value"] is None else s["value"]
                                 for s in t["speedup"][name][kind]])
                width = max(len(r) for r in rows)
                matrix = np.array([r + [math.nan] * (width - len(r)) for r in rows])
                failed = np.array([[s is None for s in t["speedup"][name][kind]]
                                   for t in tasks.values()], dtype=bool)
                reached = np.isfinite(matrix)
                zeroed = np.where(reached, matrix, 0.0)
                zeroed[failed] = math.nan
                entry[kind] = {
                    "iqm_reached": stats.iqm(matrix),
                    "ci_reached": stats.stratified_bootstrap_ci(matrix, reps=BOOTSTRAP_REPS),
                    "iqm_zero": stats.iqm(zeroed),
                    "ci_zero": stats.stratified_bootstrap_ci(zeroed, reps=BOOTSTRAP_REPS),
                    "not_reached": int((~reached & ~failed).sum()),
                    "runs": int((~failed).sum()),
                }
        if REFERENCE in names:
            ahead = [
                _mean_final(t["runs"][name]) < _mean_final(t["runs"][REFERENCE])
                for t in tasks.values()
            ]
            entry["ahead_of_adamw"] = int(sum(ahead))
        summary[name] = entry
    finals = {n: [_mean_final(t["runs"][n]) for t in tasks.values()] for n in names}
    taus = np.geomspace(1.0, 4.0, 61)
    profile = stats.performance_profile(finals, taus)
    results["profile"] = {"taus": taus.tolist(), **{n: v.tolist() for n, v in profile.items()}}
    return summary


def estimate_seconds(config, ms=None, factor=1.0, overhead_s=RUN_OVERHEAD_S):
    """Rough wall time of `config` on one core: per task, the runs it needs
    (grid points + extra seeds) x (steps x ms per step x `factor` for the
    costlier optimizers + `overhead_s` of tracing and validation)."""
    ms = ms or TASK_MS
    total = {}
    for task in config.tasks:
        runs = 0
        families = set()
        for name in config.optimizers:
            spec = OPTIMIZERS[name]
            if spec.tuned:
                grid = config.lrs or (QUICK_GRID if config.quick else spec.grid)
                runs += len(grid) + (0 if config.quick or config.lrs else 1)
            elif spec.family not in families:
                runs += 1
            runs += config.seeds - 1
            families.add(spec.family)
        steps = config.task_steps(task)
        total[task] = runs * (steps * ms.get(task, 10.0) * 1e-3 * factor + overhead_s)
    return total


# --- reports -----------------------------------------------------------------


def _fmt(value, digits=".4g"):
    return "n/a" if value is None or not math.isfinite(value) else format(value, digits)


def _fmt_lr(value):
    return "default" if value is None else f"{value:.3g}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _final_cell(runs, key="final_val"):
    values = np.array([r[key] if r["error"] is None else math.nan for r in runs])
    if not np.all(np.isfinite(values)):
        return "error" if any(r["error"] for r in runs) else "diverged"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{values.mean():.4g} ± {values.std(ddof=1):.2g}"


def _speedup_cell(entries):
    measured = [s["value"] for s in entries if s is not None and s["value"] is not None]
    missing = sum(1 for s in entries if s is not None and s["value"] is None)
    failed = sum(1 for s in entries if s is None)
    text = f"{np.median(measured):.2f}x" if measured else "-"
    if missing:
        text += f" ({missing}/{len(entries)} not reached)"
    if failed:
        text += f" ({failed} failed)"
    return text


def markdown(results):
    """The report: configuration, tables, notes."""
    config = results["config"]
    names = config["optimizers"]
    labels = [OPTIMIZERS[n].label for n in names]
    tasks = results["tasks"]
    summary = results["summary"]
    lines = [
        "# Optimizer evaluation on held-out tasks (harness v2)",
        "",
        f"Backend `{config['backend']}` ({config['backend_setup']}), Python {config['python']}, "
        f"Keras {config['keras']}, git `{config['git']}`. Schedule `{config['schedule']}` "
        f"(5% linear warm-up from 0, cosine to 0) for every optimizer but Celo; "
        f"{config['seeds']} seed(s) of each selected rate; selection on the final validation "
        f"loss of seed 0. Wall time {results['wall_s'] / 60:.1f} min. "
        f"Command: `{config['command']}`. Weights: Celo2 {config.get('celo2_weights')}, "
        f"Celo {config.get('celo_weights')}"
        + (f"; Celo2 options {config['celo2_options']}" if config.get("celo2_options") else "")
        + (f"; runs of {', '.join(config['reused']['optimizers'])} reused from "
           f"`{config['reused']['from']}`" if config.get("reused") else "") + ".",
        "",
        "## Tasks",
        "",
    ]
    lines += table(["task", "steps", "what", "why the training loss stays above 0"],
                   [[t, str(r["steps"]), r["description"], r["why_not_zero"]]
                    for t, r in tasks.items()])
    lines += ["", "## Final validation loss (mean ± sd over seeds; selected peak rate)", ""]
    rows = []
    for t, r in tasks.items():
        row = [t]
        for n in names:
            lr = r["runs"][n][0]["learning_rate"]
            row.append(_final_cell(r["runs"][n]) + (f" ({_fmt_lr(lr)})"
                                                    if OPTIMIZERS[n].tuned else ""))
        rows.append(row)
    if REFERENCE in names:
        rows.append(["**tasks ahead of tuned AdamW**"]
                    + [str(summary[n].get("ahead_of_adamw", "")) if n != REFERENCE else ""
                       for n in names])
    lines += table(["task"] + labels, rows)
    others = [n for n in names if n != REFERENCE]
    if REFERENCE in names and others:
        for kind, title in (("val", "tuned AdamW's best validation loss"),
                            ("train", "tuned AdamW's final (smoothed) training loss")):
            lines += ["", f"## Speedup to reach {title}", "",
                      "Per task: median over the seeds that reached it. IQM over tasks x seeds "
                      "with a 95% stratified-bootstrap interval.", ""]
            rows = [[t] + [_speedup_cell(r["speedup"][n][kind]) for n in others]
                    for t, r in tasks.items()]
            rows.append(["**IQM (reached)**"] + [_iqm_cell(summary[n].get(kind), "reached")
                                                 for n in others])
            rows.append(["**IQM (0 if not reached)**"] + [_iqm_cell(summary[n].get(kind), "zero")
                                                         for n in others])
            rows.append(["**did not reach**"] + [
                f"{summary[n][kind]['not_reached']}/{summary[n][kind]['runs']}"
                if kind in summary[n] else "n/a" for n in others])
            lines += table(["task"] + [OPTIMIZERS[n].label for n in others], rows)
    lines += ["", "## Test loss after training (mean over seeds)", ""]
    lines += table(["task"] + labels, [[t] + [_final_cell(r["runs"][n], "test_loss")
                                              for n in names] for t, r in tasks.items()])
    lines += ["", "## Final training loss (smoothed, mean over seeds)", ""]
    lines += table(["task"] + labels, [[t] + [_final_cell(r["runs"][n], "final_train")
                                              for n in names] for t, r in tasks.items()])
    lines += ["", "## Tuning (seed 0): final validation loss per peak rate", ""]
    edges = []
    for t, r in tasks.items():
        for n, tune in r["tuning"].items():
            cells = [f"**{_fmt_lr(lr)}: {_fmt(v)}**" if lr == tune["selected"]
                     else f"{_fmt_lr(lr)}: {_fmt(v)}"
                     for lr, v in zip(tune["grid"], tune["final_val"])]
            lines.append(f"- {t} / {OPTIMIZERS[n].label}: " + ", ".join(cells)
                         + (f" — **on the {tune['edge']} edge**" if tune["edge"] else ""))
            if tune["edge"]:
                edges.append(f"{t} / {OPTIMIZERS[n].label} ({tune['edge']})")
    lines += ["", "**Optima on a grid edge:** " + (", ".join(edges) if edges else "none") + "."]
    routing = []
    for t, r in tasks.items():
        for n, runs in r["runs"].items():
            table_rows = runs[0].get("routing")
            if table_rows:
                rule = [row for row in table_rows if row[1] == "rule"]
                viewed = [row for row in rule if list(row[2]) != list(row[3])]
                routing.append(f"- {t} / {OPTIMIZERS[n].label}: {len(rule)} tensors on the "
                               f"matrix rule ({len(viewed)} of them reshaped), "
                               f"{len(table_rows) - len(rule)} on Adam(W)")
    if routing:
        lines += ["", "## Routing (`routing_table()`; per variable in the JSON)", "",
                  *routing]
    lines += ["", "## Time per step, ms (first step incl. compilation, s), seed 0", ""]
    lines += table(["task"] + labels, [
        [t] + [f"{_fmt(1e3 * r['runs'][n][0]['step_s'], '.1f')} "
               f"({_fmt(r['runs'][n][0]['first_step_s'], '.1f')})" for n in names]
        for t, r in tasks.items()
    ])
    lines += ["", *notes(results)]
    return "\n".join(lines) + "\n"


def _iqm_cell(entry, which):
    if not entry:
        return "n/a"
    value, (low, high) = entry[f"iqm_{which}"], entry[f"ci_{which}"]
    if not math.isfinite(value):
        return "n/a"
    return f"**{value:.2f}x** [{_fmt(low, '.2f')}, {_fmt(high, '.2f')}]"


def notes(results):
    lines = [
        "Speedup: steps tuned AdamW (same seed) needs to reach its target divided by the steps "
        "the optimizer needs, interpolated between evaluation points (validation) or steps "
        "(smoothed training curve). Runs that never reach the target have no speedup: they are "
        "counted under \"did not reach\" and either left out (IQM reached) or counted as 0.",
        "",
        f"Estimated wall time of the default full run from the built-in per-step costs: "
        f"{sum(estimate_seconds(default_config()).values()) / 60:.0f} core-minutes.",
    ]
    for task_name, task_result in results["tasks"].items():
        for name, runs in task_result["runs"].items():
            for run in runs:
                if run["error"]:
                    lines.append(f"\n**Error** in {task_name} / {OPTIMIZERS[name].label} "
                                 f"(lr {run['learning_rate']}, seed {run['seed']}): "
                                 f"{run['error']}")
    return lines


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results, path, kind):
    """One panel per task: mean over seeds (band: min..max) of each selected run."""
    plt = _plt()
    tasks = results["tasks"]
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (task_name, task_result) in zip(axes.flat, tasks.items()):
        for name, runs in task_result["runs"].items():
            if kind == "val":
                x = np.array(runs[0]["eval_steps"])
                ys = np.array([r["val_losses"] for r in runs], dtype="float64")
            else:
                x = np.arange(1, runs[0]["steps"] + 1)
                ys = np.array([r["smoothed_train"] for r in runs], dtype="float64")
            spec = OPTIMIZERS[name]
            label = spec.label + (f" ({_fmt_lr(runs[0]['learning_rate'])})" if spec.tuned else "")
            with np.errstate(all="ignore"):
                line, = ax.plot(x, np.nanmean(ys, axis=0), label=label)
                if len(runs) > 1:
                    ax.fill_between(x, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0),
                                    color=line.get_color(), alpha=0.2)
        if task_result["log_y"]:
            ax.set_yscale("log")
        ax.set(title=task_name, xlabel="step",
               ylabel="validation loss" if kind == "val" else "training loss (smoothed)")
        ax.legend(fontsize="x-small")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_profile(results, path):
    plt = _plt()
    profile = results["profile"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name in results["config"]["optimizers"]:
        ax.step(profile["taus"], profile[name], where="post", label=OPTIMIZERS[name].label)
    ax.set_xscale("log")
    ax.set(xlabel="tau (final validation loss / best of any optimizer)",
           ylabel="fraction of tasks <= tau", ylim=(-0.02, 1.02),
           title="Performance profile")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lr_mult(results, path):
    """Celo's learned multiplier per step (seed 0); None if no run recorded one."""
    curves = {
        task_name: {OPTIMIZERS[n].label: runs[0]["lr_mult"]
                    for n, runs in task_result["runs"].items() if "lr_mult" in runs[0]}
        for task_name, task_result in results["tasks"].items()
    }
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (task_name, by_label) in zip(axes.flat, curves.items()):
        for label, values in by_label.items():
            ax.plot(np.arange(1, len(values) + 1), values, label=label)
        ax.set(title=task_name, xlabel="step", ylabel="learned lr_mult")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def jsonable(obj):
    """Non-finite floats -> None, numpy scalars -> Python, so the file is strict
    JSON; floats to 9 significant digits (exact for float32 losses)."""
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float):
        return float(f"{obj:.9g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def log(message):
    print(message, file=sys.stderr, flush=True)


def _git():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                              capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except Exception:  # noqa: BLE001
        return "?"


# --- command line ------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(DEFAULT_TASKS))
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS),
                        default=[name for name, spec in OPTIMIZERS.items() if spec.default],
                        help="default: adamw muon celo2 celo2_tuned")
    parser.add_argument("--steps", type=int,
                        help="steps per run for every task (default: per task, TASK_STEPS)")
    parser.add_argument("--lrs", type=float, nargs="+",
                        help="one peak-rate grid for every tuned optimizer, not extended "
                             "(default: each optimizer's half-decade grid, extended at edges)")
    parser.add_argument("--seeds", type=int, help="seeds of the selected rates (default 3, "
                                                  "--quick 2)")
    parser.add_argument("--max-extend", type=int, default=2,
                        help="grid extensions per side when an optimum is on an edge")
    parser.add_argument("--schedule", choices=["warmup_cosine", "constant"],
                        default="warmup_cosine")
    parser.add_argument("--celo2-weights", help="meta-weights file for Celo2 (default: shipped)")
    parser.add_argument("--celo2-base-weights",
                        help="meta-weights file for Celo2Base (default: shipped)")
    parser.add_argument("--celo-weights", help="meta-weights file for Celo (default: shipped)")
    parser.add_argument("--weight-decay", type=float, default=0.004,
                        help="decoupled weight decay of every optimizer (default 0.004, "
                             "Keras's AdamW / Muon default)")
    parser.add_argument("--celo2-option", action="append", metavar="NAME=VALUE",
                        help="another Celo2 argument for celo2 / celo2_tuned, e.g. "
                             "adam_lr_ratio=5 (repeatable; for experiments on its defaults)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {QUICK_TASK_STEPS} steps, grid {QUICK_GRID}, 2 seeds")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes, one CPU each, tasks split between them "
                             "(default: the number of CPUs this process may use, at most 2)")
    parser.add_argument("--pin-cpu", type=int, help="the CPU this process pins itself to")
    parser.add_argument("--no-pin", action="store_true", help="do not pin (not reproducible "
                                                              "across CPU counts)")
    parser.add_argument("--jax-cache", default=DEFAULT_JAX_CACHE,
                        help="JAX persistent compilation cache ('' to disable)")
    parser.add_argument("--estimate", action="store_true", help="print the time estimate, exit")
    parser.add_argument("--worker-json", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--reuse", metavar="EVALUATE_JSON",
                        help="take the runs of --reuse-optimizers from an earlier report "
                             "instead of training them again (settings must match)")
    parser.add_argument("--reuse-optimizers", nargs="+", choices=list(OPTIMIZERS),
                        default=["adamw", "muon"], help="default: adamw muon")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 2 if args.quick else 3
    return args


def default_config():
    return EvalConfig(tasks=DEFAULT_TASKS,
                      optimizers=tuple(n for n, s in OPTIMIZERS.items() if s.default))


def _split_tasks(tasks, costs, workers):
    """Greedy longest-first assignment of tasks to `workers` bins."""
    bins = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for task in sorted(tasks, key=lambda t: -costs[t]):
        i = int(np.argmin(loads))
        bins[i].append(task)
        loads[i] += costs[task]
    return [b for b in bins if b], loads


def _run_workers(argv, config, costs, workers):
    """Runs the tasks in `workers` child processes, one CPU each; returns their task results."""
    cpus = ALLOWED_CPUS
    groups, loads = _split_tasks(list(config.tasks), costs, workers)
    os.makedirs(config.out, exist_ok=True)
    procs = []
    strip = {"--tasks", "--workers", "--pin-cpu", "--worker-json"}
    base, skip = [], False
    for arg in argv:
        if arg.startswith("--"):
            skip = arg.split("=")[0] in strip
            if skip:
                continue
        elif skip:
            continue
        base.append(arg)
    for i, group in enumerate(groups):
        path = os.path.join(config.out, f"worker{i}.json")
        cmd = [sys.executable, "-m", "benchmarks.evaluate", *base, "--tasks", *group,
               "--workers", "1", "--pin-cpu", str(cpus[i % len(cpus)]), "--worker-json", path]
        log(f"worker {i} (CPU {cpus[i % len(cpus)]}, ~{loads[i] / 60:.0f} min): {' '.join(group)}")
        procs.append((subprocess.Popen(cmd, cwd=os.path.dirname(HERE)), path))
    tasks = {}
    for proc, path in procs:
        if proc.wait() != 0:
            raise SystemExit(f"a worker failed (exit {proc.returncode}); see its log above")
        with open(path) as f:
            tasks.update(json.load(f)["tasks"])  # NaN kept (Python's JSON dialect)
    return {t: tasks[t] for t in config.tasks}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    config = EvalConfig.from_args(args)
    costs = estimate_seconds(config)
    workers = args.workers or min(2, len(ALLOWED_CPUS))
    workers = max(1, min(workers, len(config.tasks)))
    log(f"estimated {sum(costs.values()) / 60:.1f} core-minutes "
        f"(~{sum(costs.values()) / 60 / workers:.1f} min on {workers} worker(s)); "
        f"per task: " + ", ".join(f"{t} {c / 60:.1f}" for t, c in costs.items()))
    if args.estimate:
        return
    setup = configure_backend(args.jax_cache)
    reused = load_reused(args.reuse, config, args.reuse_optimizers) if args.reuse else {}
    start = time.perf_counter()
    if workers > 1 and not args.worker_json:
        task_results = _run_workers(argv, config, costs, workers)
    else:
        task_results = {}
        for task_name in config.tasks:
            task = TASKS[task_name]()
            task_results[task_name] = evaluate_task(task, config, log=log,
                                                    reused=reused.get(task_name))
    results = {
        "config": {
            "backend": keras.backend.backend(), "backend_setup": setup, "seeds": config.seeds,
            "task_steps": {t: config.task_steps(t) for t in config.tasks},
            "lrs": list(config.lrs) if config.lrs else None, "optimizers": list(config.optimizers),
            "grids": {n: list(OPTIMIZERS[n].grid) for n in config.optimizers
                      if OPTIMIZERS[n].tuned},
            "reference": REFERENCE, "schedule": config.schedule, "quick": config.quick,
            "warmup_fraction": WARMUP_FRACTION, "evals_per_run": EVALS_PER_RUN,
            "celo2_weights": config.celo2_weights or "shipped",
            "celo2_base_weights": config.celo2_base_weights or "shipped",
            "celo_weights": config.celo_weights or "shipped",
            "weight_decay": config.weight_decay, "workers": workers,
            "celo2_options": dict(config.celo2_options),
            "python": platform.python_version(), "keras": keras.__version__, "git": _git(),
            "command": "python -m benchmarks.evaluate " + shlex.join(argv),
            "reused": ({"from": args.reuse, "optimizers": list(args.reuse_optimizers)}
                       if args.reuse else None),
        },
        "tasks": task_results,
        "wall_s": time.perf_counter() - start,
    }
    if args.worker_json:
        with open(args.worker_json, "w") as f:
            json.dump(results, f, default=lambda o: o.item())
        return
    results["summary"] = summarize(results)
    os.makedirs(config.out, exist_ok=True)
    report = markdown(results)
    print(report)
    with open(os.path.join(config.out, "evaluate.md"), "w") as f:
        f.write(report)
    plot_curves(results, os.path.join(config.out, "evaluate.png"), "val")
    plot_curves(results, os.path.join(config.out, "evaluate_train.png"), "train")
    plot_profile(results, os.path.join(config.out, "evaluate_profile.png"))
    plot_lr_mult(results, os.path.join(config.out, "evaluate_lr_mult.png"))
    for task_result in results["tasks"].values():  # recomputable: stats.smooth(train_losses, W)
        for runs in task_result["runs"].values():
            for run in runs:
                run.pop("smoothed_train", None)
    with open(os.path.join(config.out, "evaluate.json"), "w") as f:
        json.dump(jsonable(results), f)


if __name__ == "__main__":
    main()
