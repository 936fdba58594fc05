"""Compare optimizers on held-out tasks outside the meta-training distribution.

Run from the repository root as a module of the `benchmarks` package, on any
Keras backend:

    KERAS_BACKEND=jax .venv/bin/python -m benchmarks.evaluate            # full run
    KERAS_BACKEND=torch .venv/bin/python -m benchmarks.evaluate --quick  # smoke test
    .venv/bin/python -m benchmarks.evaluate --tasks cnn_digits --optimizers celo2 adamw

Tasks (`benchmarks/eval_tasks.py`): a CNN on sklearn digits images, a
byte-level causal Transformer LM on the standard library's Python sources, an
MLP on sklearn's breast-cancer data and an MLP autoencoder on sklearn digits.

Optimizers (`OPTIMIZERS`; add more with `register_optimizer`, before
`main` runs): the learned
`Celo2` and `Celo2Base` run once at their defaults (learning rate 1e-3, the
shipped meta-weights, no tuning); `AdamW` and `Muon` (output layer excluded,
as Muon's documentation recommends) are swept over `--lrs` and the learning
rate with the lowest final training loss is kept, per task. Keras' Muon
orthogonalises 2-D kernels only: conv (4-D) and attention (3-D) kernels take
its AdamW branch, so on `cnn_digits` Muon trains exactly like AdamW.
The opt-in `celo2_tuned` and `celo2_base_tuned` sweep the learned optimizers
over the same grid, to separate the rule from its default learning rate.

Every run of a task starts from the same seeded initialisation and sees the
same batches in the same order, for `--steps` steps of
`model.train_on_batch`, whose returned per-batch loss (computed before the
update) is recorded at every step.

What the numbers mean:

* smoothed curve: trailing moving average of the per-step training loss over
  a window of W = max(1, round(5% of the steps)) steps (shorter at the start).
* final loss: the last value of the smoothed curve, i.e. the mean training
  loss over the last W steps.
* speedup of optimizer X: with T the final loss of the tuned AdamW run,
  n_ref the first step at which AdamW's smoothed curve is <= T and n_X the
  first step at which X's smoothed curve is <= T, speedup = n_ref / n_X.
  Above 1, X reaches AdamW's final loss in fewer steps. If X never reaches T
  the speedup is reported as "<" n_ref / steps: an upper bound, below 1,
  since X would need more than `steps` steps.
* IQM: interquartile mean of the per-task speedups (`scipy.stats.trim_mean`
  with 25% cut at each end; with 4 tasks, the mean of the middle two).
  Upper-bound speedups enter with their bound.
* held-out loss: the loss on data never trained on, after the last step.

Outputs, under `--out` (default `benchmarks/results`): `evaluate.md` (the
tables, also printed), `evaluate.json` (configuration, every run's per-step
loss curve, timings), `evaluate.png` (smoothed curves, one panel per task)
and, when Celo ran, `evaluate_lr_mult.png` (its learned multiplier per step).

Celo (`celo`: keras-lopt's weights; `celo_released`: the authors' released
`celo_theta.state`, registered when `../shared/reference` holds it) is
untuned like Celo2: it gets `total_steps = --steps` and each batch's loss
through `FeedLossAndHorizon.attach`, and runs with its learned schedule
whatever `--schedule` says. `celo2_released` runs `Celo2` with the authors'
`celo2_theta.state` (registered when present), to separate what our
meta-training reaches from what the suite allows.
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
import traceback
from typing import Callable

if not __package__:  # `python benchmarks/evaluate.py`: `benchmarks` is not importable
    sys.exit("Run from the repository root as a module: python -m benchmarks.evaluate "
             + shlex.join(sys.argv[1:]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import trim_mean  # noqa: E402

import keras_lopt  # noqa: E402
from keras_lopt.callbacks import FeedLossAndHorizon  # noqa: E402
from benchmarks.eval_tasks import HEAD  # noqa: E402
from benchmarks.eval_tasks import TASKS  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
QUICK_LR_GRID = (1e-3, 1e-2)
QUICK_STEPS = 20
REFERENCE = "adamw"
DEFAULT_OUT = os.path.join(HERE, "results")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluation's settings: the command line, parsed and frozen.

    Built once by `main` (`EvalConfig.from_args`) and passed to whatever
    builds optimizers or runs tasks, so nothing reads settings from module
    state.

    Attributes:
        tasks: names in `TASKS`, in the order they run.
        optimizers: names in `OPTIMIZERS`, in report order.
        steps: training steps per run.
        lrs: learning rates tuned optimizers are swept over.
        seed: seed of every run's initialisation and batches.
        schedule: "constant", or "cosine" decay to 0 over `steps`.
        celo2_weights, celo2_base_weights, celo_weights: meta-weights files
            of Celo2 / Celo2Base / Celo; None means the shipped defaults.
        learned_weight_decay: weight decay of Celo2 / Celo2Base; None: none.
        out: folder the reports are written to.
    """

    tasks: tuple
    optimizers: tuple
    steps: int
    lrs: tuple
    seed: int = 0
    schedule: str = "constant"
    celo2_weights: str | None = None
    celo2_base_weights: str | None = None
    celo_weights: str | None = None
    learned_weight_decay: float | None = None
    out: str = DEFAULT_OUT

    @classmethod
    def from_args(cls, args):
        """The config of `parse_args`' namespace (`steps` and `lrs` resolved)."""
        return cls(
            tasks=tuple(args.tasks), optimizers=tuple(args.optimizers), steps=args.steps,
            lrs=tuple(args.lrs), seed=args.seed, schedule=args.schedule,
            celo2_weights=args.celo2_weights, celo2_base_weights=args.celo2_base_weights,
            celo_weights=args.celo_weights, learned_weight_decay=args.learned_weight_decay,
            out=args.out,
        )


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """How to build one optimizer.

    Attributes:
        label: name shown in reports.
        make: `make(learning_rate, config)` returns a fresh optimizer for a
            run under `config` (an `EvalConfig`); untuned optimizers get
            `learning_rate=None` and use their own default.
        tuned: sweep the `--lrs` grid and keep the best final loss.
        loss_aware: built with `make(None, config)` for a run of
            `config.steps` updates, and handed each batch's loss (Celo).
        default: run when `--optimizers` is not given.
    """

    label: str
    make: Callable
    tuned: bool
    loss_aware: bool = False
    default: bool = True


OPTIMIZERS = {}


def register_optimizer(name, label, make, tuned=False, loss_aware=False, default=True):
    """Adds an optimizer to the registry (and, if `default`, to the default selection).

    `make(learning_rate, config)` builds it (see `OptimizerSpec`).
    """
    OPTIMIZERS[name] = OptimizerSpec(label, make, tuned, loss_aware, default)


# The learned optimizers are untuned: `lr` is None, or a schedule that starts
# at their default 1e-3 (`--schedule cosine`). `--celo2-weights` /
# `--celo2-base-weights` (`config.celo2_weights` / `.celo2_base_weights`)
# evaluate candidate meta-weights instead of the shipped defaults,
# `--learned-weight-decay` sets their weight decay.
def _learned(class_name, weights):
    """`make` for `keras_lopt.optimizers.<class_name>`; `weights(config)` is its file."""

    def make(lr, config):
        return getattr(keras_lopt.optimizers, class_name)(
            lr or 1e-3,
            weights=weights(config),
            weight_decay=config.learned_weight_decay,
        )

    return make


# Each also swept over `--lrs` like AdamW (opt-in `*_tuned`): how much of
# the gap to tuned AdamW is the untuned default learning rate.
for _name, _class_name, _weights in (
    ("celo2", "Celo2", lambda config: config.celo2_weights),
    ("celo2_base", "Celo2Base", lambda config: config.celo2_base_weights),
):
    register_optimizer(_name, _class_name, _learned(_class_name, _weights))
    register_optimizer(
        f"{_name}_tuned",
        f"{_class_name} (tuned)",
        _learned(_class_name, _weights),
        tuned=True,
        default=False,
    )
register_optimizer(
    "adamw", "AdamW", lambda lr, config: keras.optimizers.AdamW(learning_rate=lr), tuned=True
)
register_optimizer(
    "muon",
    "Muon",
    lambda lr, config: keras.optimizers.Muon(learning_rate=lr, exclude_layers=[HEAD]),
    tuned=True,
)
# Celo needs the run's length: `train` builds it for `total_steps =
# config.steps` and hands it each batch's loss (`FeedLossAndHorizon.attach`).
# It runs at its default multiplier 1 whatever `--schedule`: its schedule is
# the learned one.
REFERENCE_DIR = os.environ.get(
    "KERAS_LOPT_REFERENCE_DIR", os.path.join(HERE, "..", "..", "shared", "reference")
)
RELEASED_CELO = os.path.join(REFERENCE_DIR, "celo_theta.state")
RELEASED_CELO2 = os.path.join(REFERENCE_DIR, "celo2_theta.state")
register_optimizer(
    "celo",
    "Celo",
    lambda lr, config: keras_lopt.optimizers.Celo(weights=config.celo_weights,
                                                   total_steps=config.steps),
    loss_aware=True,
)
if os.path.exists(RELEASED_CELO):
    register_optimizer(
        "celo_released",
        "Celo (released)",
        lambda lr, config: keras_lopt.optimizers.Celo(weights=RELEASED_CELO,
                                                      total_steps=config.steps),
        loss_aware=True,
    )
# The authors' Celo2 weights, to tell our meta-training apart from the suite.
if os.path.exists(RELEASED_CELO2):
    register_optimizer(
        "celo2_released",
        "Celo2 (released)",
        lambda lr, config: keras_lopt.optimizers.Celo2(lr or 1e-3, weights=RELEASED_CELO2),
    )


# --- metrics ---------------------------------------------------------------


def smoothing_window(steps):
    """W = max(1, round(5% of the steps))."""
    return max(1, int(round(0.05 * steps)))


def smooth(losses):
    """Trailing moving average over `smoothing_window(len(losses))` steps."""
    losses = np.asarray(losses, dtype="float64")
    window = smoothing_window(len(losses))
    total = np.cumsum(losses)
    total[window:] = total[window:] - total[:-window]
    return total / np.minimum(np.arange(1, len(losses) + 1), window)


def final_loss(losses):
    """Mean loss over the last W steps (NaN if the run diverged)."""
    return float(smooth(losses)[-1])


def steps_to_reach(losses, target):
    """First 1-based step at which the smoothed curve is <= target, or None."""
    hits = np.flatnonzero(smooth(losses) <= target)
    return int(hits[0]) + 1 if hits.size else None


def speedup(reference, candidate):
    """Steps-to-target ratio against the reference's own final loss.

    Returns a dict with `value`, `reached` (False: `value` is the upper bound
    n_ref / steps) and the step counts, or None if the reference diverged.
    """
    target = final_loss(reference)
    if not math.isfinite(target):
        return None
    n_ref = steps_to_reach(reference, target)
    n = steps_to_reach(candidate, target)
    value = n_ref / (n if n is not None else len(candidate))
    return {"value": value, "reached": n is not None, "steps": n, "reference_steps": n_ref}


def iqm(values):
    """Interquartile mean (25% trimmed at each end)."""
    return float(trim_mean(np.asarray(values, dtype="float64"), 0.25))


# --- training --------------------------------------------------------------


UNTUNED_LR = 1e-3


def train(task, spec, learning_rate, config):
    """One seeded run of `config.steps` steps; returns its per-step losses and timings.

    A run whose loss becomes non-finite stops there and its curve is padded
    with NaN. An exception is caught, printed and recorded as `error`.
    """
    steps = config.steps
    run = {
        "learning_rate": learning_rate or math.nan,
        "losses": [math.nan] * steps,
        "heldout_loss": math.nan,
        "first_step_s": math.nan,
        "step_s": math.nan,
        "error": None,
    }
    try:
        keras.backend.clear_session()
        keras.utils.set_random_seed(config.seed)
        model = task.build_model()
        lr = learning_rate
        if config.schedule == "cosine":
            lr = keras.optimizers.schedules.CosineDecay(learning_rate or UNTUNED_LR, steps)
        loss_aware = spec.loss_aware
        optimizer = spec.make(None, config) if loss_aware else spec.make(lr, config)
        model.compile(optimizer=optimizer, loss=task.loss)
        if loss_aware:
            FeedLossAndHorizon.attach(model)
        run["learning_rate"] = float(f"{keras.ops.convert_to_numpy(optimizer.learning_rate):.6g}")
        run.update(fit(model, task, steps, config.seed, record_lr_mult=loss_aware))
        if math.isfinite(run["losses"][-1]):
            x, y = task.heldout
            logs = model.evaluate(x, y, batch_size=256, verbose=0, return_dict=True)
            run["heldout_loss"] = float(logs["loss"])
    except Exception as error:  # noqa: BLE001 - a failing optimizer is a result
        traceback.print_exc()
        run["error"] = f"{type(error).__name__}: {error}"
    run["final_loss"] = final_loss(run["losses"])
    return run


def fit(model, task, steps, seed, record_lr_mult=False):
    """Runs `train_on_batch` over the task's batches, timing each phase.

    With `record_lr_mult`, also records Celo's learned multiplier per step.
    """
    losses, lr_mults = [], []
    start = time.perf_counter()
    first_step_s = math.nan
    for x, y in task.batches(steps, seed):
        logs = model.train_on_batch(x, y, return_dict=True)
        losses.append(float(logs["loss"]))
        if record_lr_mult:
            lr_mults.append(model.optimizer.lr_mult)
        if len(losses) == 1:
            first_step_s = time.perf_counter() - start
            start = time.perf_counter()
        if not math.isfinite(losses[-1]):
            break
    later = len(losses) - 1
    step_s = (time.perf_counter() - start) / later if later else math.nan
    losses += [math.nan] * (steps - len(losses))
    out = {"losses": losses, "first_step_s": first_step_s, "step_s": step_s}
    if record_lr_mult:
        out["lr_mult"] = lr_mults
    return out


def evaluate_task(task, config):
    """All runs of one task, the best run per optimizer and the speedups."""
    result = {"description": task.description, "log_y": task.log_y, "runs": {}, "best": {}}
    for name in config.optimizers:
        spec = OPTIMIZERS[name]
        runs = []
        for lr in config.lrs if spec.tuned else [None]:
            runs.append(train(task, spec, lr, config))
            log(f"[{task.name}] {spec.label} lr={runs[-1]['learning_rate']:.0e}: final loss "
                f"{runs[-1]['final_loss']:.4g}, {1e3 * runs[-1]['step_s']:.1f} ms/step")
        finals = [r["final_loss"] if math.isfinite(r["final_loss"]) else math.inf for r in runs]
        result["runs"][name] = runs
        result["best"][name] = int(np.argmin(finals))
    result["speedup"] = task_speedups(result)
    return result


def best_run(task_result, name):
    return task_result["runs"][name][task_result["best"][name]]


def task_speedups(task_result):
    """Speedup of every optimizer except the reference, if it was run."""
    if REFERENCE not in task_result["runs"]:
        return {}
    reference = best_run(task_result, REFERENCE)["losses"]
    speedups = {}
    for name in task_result["runs"]:
        if name != REFERENCE:
            run = best_run(task_result, name)
            speedups[name] = None if run["error"] else speedup(reference, run["losses"])
    return speedups


def summarize(results):
    """IQM of the speedups over tasks, per optimizer."""
    per_optimizer = {}
    for task_result in results["tasks"].values():
        for name, value in task_result["speedup"].items():
            if value is not None:
                per_optimizer.setdefault(name, []).append(value["value"])
    return {name: iqm(values) for name, values in per_optimizer.items()}


def estimate_seconds(results, steps=1000, grid_size=len(LR_GRID)):
    """Wall time of a run with `steps` steps and a `grid_size`-value sweep.

    Per task and optimizer: the mean over its runs of (first step + (steps - 1)
    x time per later step), times `grid_size` for tuned optimizers.
    """
    total = 0.0
    for task_result in results["tasks"].values():
        for name, runs in task_result["runs"].items():
            times = [r["first_step_s"] + (steps - 1) * r["step_s"] for r in runs]
            times = [t for t in times if math.isfinite(t)]
            if times:
                total += np.mean(times) * (grid_size if OPTIMIZERS[name].tuned else 1)
    return total


# --- reports ---------------------------------------------------------------


def fmt_value(run, key, scale=1.0, digits=".4g"):
    """A run's number for a table, or "error" if the run raised."""
    return "error" if run["error"] else format(scale * run[key], digits)


def fmt_lr(spec, run):
    return f" (lr {run['learning_rate']:.0e})" if spec.tuned else ""


def fmt_speedup(value):
    if value is None:
        return "n/a"
    return f"{value['value']:.2f}x" if value["reached"] else f"<{value['value']:.2f}x"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(results):
    """The report: configuration, loss/speedup/held-out/timing tables, notes."""
    config = results["config"]
    names = config["optimizers"]
    labels = [OPTIMIZERS[n].label for n in names]
    tasks = results["tasks"]
    lines = [
        "# Optimizer evaluation on held-out tasks",
        "",
        f"Backend `{config['backend']}`, {config['steps']} steps per run, seed "
        f"{config['seed']}, Python {config['python']}, Keras {config['keras']}. "
        f"Tuned optimizers swept over learning rates {config['lrs']}; "
        f"schedule: {config.get('schedule', 'constant')}"
        + (f"; Celo2 / Celo2Base weight decay {config['learned_weight_decay']}."
           if config.get("learned_weight_decay") else "."),
        "",
        f"## Final training loss (mean of the last {smoothing_window(config['steps'])} steps)",
        "",
    ]
    lines += table(["task"] + labels, [
        [t] + [fmt_value(best_run(r, n), "final_loss") + fmt_lr(OPTIMIZERS[n], best_run(r, n))
               for n in names]
        for t, r in tasks.items()
    ])
    others = [n for n in names if n != REFERENCE]
    if REFERENCE in names and others:
        lines += ["", f"## Speedup over tuned {OPTIMIZERS[REFERENCE].label}", ""]
        rows = [[t] + [fmt_speedup(r["speedup"][n]) for n in others] for t, r in tasks.items()]
        rows.append(["**IQM**"] + [f"**{results['iqm'].get(n, math.nan):.2f}x**" for n in others])
        lines += table(["task"] + [OPTIMIZERS[n].label for n in others], rows)
    lines += ["", "## Held-out loss after training (selected run)", ""]
    lines += table(["task"] + labels, [
        [t] + [fmt_value(best_run(r, n), "heldout_loss") for n in names] for t, r in tasks.items()
    ])
    lines += ["", "## Time per step, ms (first step incl. compilation, s)", ""]
    lines += table(["task"] + labels, [
        [t] + [f"{fmt_value(best_run(r, n), 'step_s', 1e3, '.1f')} "
               f"({fmt_value(best_run(r, n), 'first_step_s', 1.0, '.1f')})" for n in names]
        for t, r in tasks.items()
    ])
    lines += ["", *notes(results)]
    return "\n".join(lines) + "\n"


def notes(results):
    """Definitions, errors and the time estimate, as markdown lines."""
    lines = [
        "Speedup: steps tuned AdamW needs to reach its own final loss divided by "
        "the steps the optimizer needs to reach that loss (both on the smoothed "
        "curves); `<` marks an upper bound (the loss was never reached: AdamW's "
        "steps / total steps). IQM: interquartile mean over tasks.",
        "",
        f"Total wall time {results['wall_s']:.0f} s. Estimated wall time of the "
        f"default run (1000 steps, {len(LR_GRID)} learning rates) from these "
        f"timings: {estimate_seconds(results) / 60:.0f} min.",
    ]
    for task_name, task_result in results["tasks"].items():
        for name, runs in task_result["runs"].items():
            for run in runs:
                if run["error"]:
                    lines.append(f"\n**Error** in {task_name} / {OPTIMIZERS[name].label} "
                                 f"(lr {run['learning_rate']}): {run['error']}")
    return lines


def plot(results, path):
    """One panel per task with the smoothed curve of each selected run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    cols = min(2, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax, (task_name, task_result) in zip(axes.flat, tasks.items()):
        for name in task_result["runs"]:
            run = best_run(task_result, name)
            spec = OPTIMIZERS[name]
            ax.plot(np.arange(1, len(run["losses"]) + 1), smooth(run["losses"]),
                    label=spec.label + fmt_lr(spec, run))
        if task_result["log_y"]:
            ax.set_yscale("log")
        ax.set(title=task_name, xlabel="step", ylabel="training loss (smoothed)")
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lr_mult(results, path):
    """Celo's learned multiplier per step, one panel per task; `None` if no
    run recorded one."""
    curves = {
        task_name: {
            OPTIMIZERS[name].label: best_run(task_result, name)["lr_mult"]
            for name in task_result["runs"]
            if "lr_mult" in best_run(task_result, name)
        }
        for task_name, task_result in results["tasks"].items()
    }
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (task_name, by_label) in zip(axes.flat, curves.items()):
        for label, values in by_label.items():
            ax.plot(np.arange(1, len(values) + 1), values, label=label)
        ax.set(title=task_name, xlabel="step", ylabel="learned lr_mult")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def jsonable(obj):
    """Replaces non-finite floats by None so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def log(message):
    print(message, file=sys.stderr, flush=True)


# --- command line ----------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS),
                        default=[name for name, spec in OPTIMIZERS.items() if spec.default],
                        help="default: all but the opt-in *_tuned variants")
    parser.add_argument("--steps", type=int, help="steps per run (default 1000, --quick 20)")
    parser.add_argument("--lrs", type=float, nargs="+",
                        help=f"learning rates for tuned optimizers (default {LR_GRID}, "
                             f"--quick {QUICK_LR_GRID})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                        help="learning-rate schedule for every optimizer: constant, or "
                             "cosine decay to 0 over --steps from the (tuned or default) rate")
    parser.add_argument("--celo2-weights", help="meta-weights file for Celo2 (default: shipped)")
    parser.add_argument("--celo2-base-weights",
                        help="meta-weights file for Celo2Base (default: shipped)")
    parser.add_argument("--celo-weights", help="meta-weights file for Celo (default: shipped)")
    parser.add_argument("--learned-weight-decay", type=float,
                        help="weight decay of Celo2 / Celo2Base (default: none)")
    parser.add_argument("--quick", action="store_true", help="tiny budget for smoke tests")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.steps = args.steps or (QUICK_STEPS if args.quick else 1000)
    args.lrs = tuple(args.lrs or (QUICK_LR_GRID if args.quick else LR_GRID))
    return args


def main(argv=None):
    config = EvalConfig.from_args(parse_args(argv))
    start = time.perf_counter()
    results = {
        "config": {
            "backend": keras.backend.backend(), "steps": config.steps, "seed": config.seed,
            "lrs": list(config.lrs), "optimizers": list(config.optimizers),
            "reference": REFERENCE, "schedule": config.schedule,
            "celo2_weights": config.celo2_weights or "shipped",
            "celo2_base_weights": config.celo2_base_weights or "shipped",
            "celo_weights": config.celo_weights or "shipped",
            "learned_weight_decay": config.learned_weight_decay,
            "smoothing_window": smoothing_window(config.steps),
            "python": platform.python_version(), "keras": keras.__version__,
        },
        "tasks": {},
    }
    for task_name in config.tasks:
        task = TASKS[task_name]()
        results["tasks"][task_name] = evaluate_task(task, config)
    results["iqm"] = summarize(results)
    results["wall_s"] = time.perf_counter() - start
    os.makedirs(config.out, exist_ok=True)
    report = markdown(results)
    print(report)
    with open(os.path.join(config.out, "evaluate.md"), "w") as f:
        f.write(report)
    with open(os.path.join(config.out, "evaluate.json"), "w") as f:
        json.dump(jsonable(results), f)
    plot(results, os.path.join(config.out, "evaluate.png"))
    plot_lr_mult(results, os.path.join(config.out, "evaluate_lr_mult.png"))


if __name__ == "__main__":
    main()
