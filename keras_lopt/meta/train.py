"""The meta-training loop: checkpoints, exact resume, progress, CSV, plot."""

import csv
import dataclasses
import json
import math
import os
import time
import warnings

import numpy as np

from keras_lopt.meta.config import MetaTrainConfig
from keras_lopt.meta.pes import PESMetaTrainer
from keras_lopt.rules.theta import save_theta

CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.csv"
THETA = "theta.npz"
VALIDATION = "validation.csv"
BEST = "theta_best.npz"


def save_checkpoint(path, trainer, state):
    """Saves everything needed for an exact resume, atomically."""
    import jax

    leaves = jax.tree_util.tree_leaves(state)
    arrays = {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
    arrays["config"] = np.array(json.dumps(dataclasses.asdict(trainer.config)))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_checkpoint(path, families=None):
    """Rebuilds `(trainer, state)` from a checkpoint written by `save_checkpoint`."""
    import jax

    with np.load(path, allow_pickle=False) as archive:
        config = MetaTrainConfig.from_dict(json.loads(str(archive["config"])))
        leaves = [archive[f"leaf_{i:05d}"] for i in range(len(archive.files) - 1)]
    if families is not None and tuple(f.name for f in families) != tuple(config.families):
        # Named families are rebuilt from the record; objects cannot be, and
        # other ones would silently change the run.
        raise ValueError(
            f"{path!r} was meta-trained on the families {tuple(config.families)}; "
            f"received {tuple(f.name for f in families)}. Pass the same families to "
            f"resume, or start a new run (another directory or resume=False)."
        )
    trainer = PESMetaTrainer(config, families=families)
    template = trainer.init()
    treedef = jax.tree_util.tree_structure(template)
    if treedef.num_leaves != len(leaves):
        raise ValueError(
            f"{path!r} does not match this trainer ({len(leaves)} arrays, "
            f"expected {treedef.num_leaves})."
        )
    state = jax.tree_util.tree_unflatten(
        treedef,
        [np.asarray(x).astype(t.dtype) for x, t in zip(leaves, jax.tree_util.tree_leaves(template))],
    )
    return trainer, trainer.shard(state)


def _trim_metrics(path, iteration):
    rows = _read_rows(path)
    if not rows:
        return
    fields = list(rows[0].keys())
    def complete(row):
        try:
            return all(v not in (None, "") for v in row.values()) and (
                int(row["iteration"]) <= iteration
            )
        except ValueError:
            return False

    rows = [r for r in rows if complete(r)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot_metrics(out_dir, smooth=50):
    """Writes `meta_loss.png` from `metrics.csv` (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_rows(os.path.join(out_dir, METRICS))
    if not rows:
        return None
    it = np.array([int(r["iteration"]) for r in rows])
    val_rows = _read_rows(os.path.join(out_dir, VALIDATION))
    fig, axes = plt.subplots(1, 2 if val_rows else 1, figsize=(13 if val_rows else 7, 4),
                             squeeze=False)
    ax = axes[0, 0]
    for key in [k for k in rows[0] if k.startswith("loss_") or k == "meta_loss"]:
        y = np.array([float(r[key]) for r in rows])
        w = min(smooth, len(y))
        ys = np.convolve(y, np.ones(w) / w, mode="valid")
        ax.plot(it[w - 1:], ys, label=key, lw=2 if key == "meta_loss" else 1)
    ax.set_xlabel("outer iteration")
    ax.set_ylabel(f"normalised truncation loss (moving mean of {smooth})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if val_rows:
        ax = axes[0, 1]
        vit = [int(r["iteration"]) for r in val_rows]
        for key in [k for k in val_rows[0] if k.startswith("val_")]:
            ax.plot(vit, [float(r[key]) for r in val_rows], marker=".", label=key,
                    lw=2 if key == "val_loss" else 1)
        ax.set_xlabel("outer iteration")
        ax.set_ylabel("fixed validation runs: mean normalised loss")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    path = os.path.join(out_dir, "meta_loss.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _append_row(path, row):
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _last_wall_time(path):
    rows = _read_rows(path)
    return float(rows[-1]["wall_s"]) if rows else 0.0


def run_provenance(config, out_dir, iteration, wall_s):
    """What a meta-training run's `theta.npz` records about where it comes from.

    Enough to find and rerun the run: its directory, the configuration it
    ran with, the command line of the process that wrote it, the iteration
    and the cumulative wall time; shipping the file (as a new version) adds
    `version` and notes (see `keras_lopt/rules/weights/README.md`).
    """
    import shlex
    import sys

    return {
        "rule": config.rule,
        "run": os.path.relpath(os.path.abspath(out_dir)),
        "config": dataclasses.asdict(config),
        "command": shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "iteration": int(iteration),
        "wall_s": round(float(wall_s), 1),
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _changed_settings(recorded, passed):
    """`"name: recorded -> passed"` for every setting that differs."""
    if passed is None:
        return ""
    return "; ".join(
        f"{f.name}: {getattr(recorded, f.name)!r} -> {getattr(passed, f.name)!r}"
        for f in dataclasses.fields(recorded)
        if _plain(getattr(recorded, f.name)) != _plain(getattr(passed, f.name))
    )


def _plain(value):
    # A config read back from JSON holds lists where the dataclass has tuples.
    return tuple(value) if isinstance(value, list) else value


def meta_train(config, out_dir, iterations, checkpoint_every=100, families=None,
               resume=True, verbose=1, max_minutes=None):
    """Runs (or resumes) meta-training until `iterations` outer iterations.

    Writes to `out_dir`: `checkpoint.npz` (every `checkpoint_every`
    iterations and at the end), `metrics.csv` (one row per iteration),
    `theta.npz` (the latest meta-weights, keras-lopt format, with
    `run_provenance` inside) and `meta_loss.png`. With
    `config.validate_every > 0`, also `validation.csv` (the fixed
    validation runs' scores at iteration 0 and every `validate_every`
    iterations, `PESMetaTrainer.validate`) and `theta_best.npz` (the
    meta-weights with the lowest `val_loss` so far, its scores in the
    provenance; the starting weights when nothing beat them).

    Args:
        config: a `MetaTrainConfig`; ignored when resuming (the checkpoint's
            config is used, so a resumed run continues exactly).
        out_dir: output directory.
        iterations: total outer iterations to reach.
        checkpoint_every: checkpoint period in iterations.
        families: task families (default: `tasks.default_families()`).
        resume: continue from `out_dir/checkpoint.npz` if present.
        verbose: 0 silent, 1 progress bar.
        max_minutes: stop (after checkpointing) once this much wall time has
            passed in this call; a later call resumes.

    Returns:
        The final meta-weights as a dict of NumPy arrays.
    """
    import jax

    os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(out_dir, CHECKPOINT)
    metrics_path = os.path.join(out_dir, METRICS)
    validation_path = os.path.join(out_dir, VALIDATION)
    if resume and os.path.exists(ckpt):
        trainer, state = load_checkpoint(ckpt, families=families)
        if config is not None and families is not None:
            # Family objects passed directly name the families, as in
            # `PESMetaTrainer`.
            config = dataclasses.replace(config, families=tuple(f.name for f in families))
        changed = _changed_settings(trainer.config, config)
        if changed:
            warnings.warn(
                f"Resuming {ckpt} with the settings it was started with; these "
                f"settings passed now differ and are ignored: {changed}. Use "
                f"another output directory (or --no-resume) to run them.",
                stacklevel=2,
            )
        start = int(state["iteration"])
        _trim_metrics(metrics_path, start)
        _trim_metrics(validation_path, start)
    else:
        trainer = PESMetaTrainer(config, families=families)
        state = trainer.init()
        start = 0
        for path in (metrics_path, validation_path, os.path.join(out_dir, BEST)):
            if os.path.exists(path):
                os.remove(path)
    rule = trainer.config.rule
    every = trainer.config.validate_every
    best = min((float(r["val_loss"]) for r in _read_rows(validation_path)), default=math.inf)

    def validate(iteration):
        nonlocal best
        scores = trainer.validate(state["theta"])
        _append_row(validation_path, {"iteration": iteration,
                                      "wall_s": round(time.time() - t_start, 3), **scores})
        if scores["val_loss"] < best:
            best = scores["val_loss"]
            provenance = run_provenance(trainer.config, out_dir, iteration,
                                        time.time() - t_start)
            provenance["validation"] = scores
            save_theta(os.path.join(out_dir, BEST), trainer.theta_numpy(state), rule,
                       provenance=provenance)
        return scores

    bar = None
    if verbose:
        from tqdm.auto import tqdm

        bar = tqdm(total=iterations, initial=start, desc=f"meta-train {rule}",
                   unit="it", dynamic_ncols=True, mininterval=5.0)
    # Line-buffered, so that a kill leaves whole rows only.
    csv_file = open(metrics_path, "a", newline="", buffering=1)
    writer = None
    # wall_s is cumulative over resumed sessions.
    t_start = time.time() - _last_wall_time(metrics_path)
    t_call = time.time()
    try:
        if every and start == 0 and not _read_rows(validation_path):
            # Where the run starts from: the bar every later theta must beat.
            validate(0)
        for it in range(start, iterations):
            state, metrics = trainer.outer_step(state)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            row = {"iteration": it + 1, "wall_s": round(time.time() - t_start, 3), **metrics}
            if writer is None:
                writer = csv.DictWriter(csv_file, fieldnames=list(row))
                if csv_file.tell() == 0:
                    writer.writeheader()
            writer.writerow(row)
            if bar is not None:
                bar.set_postfix(meta_loss=f"{metrics['meta_loss']:.4f}", refresh=False)
                bar.update(1)
            if not math.isfinite(metrics["meta_loss"]):
                raise FloatingPointError(f"Meta-loss became {metrics['meta_loss']} at {it + 1}.")
            if every and (it + 1) % every == 0:
                scores = validate(it + 1)
                if bar is not None:
                    bar.write(f"iteration {it + 1}: validation loss {scores['val_loss']:.4f} "
                              f"(final {scores['val_final']:.4f}; best {best:.4f})")
            out_of_time = max_minutes is not None and time.time() - t_call > 60 * max_minutes
            if (it + 1) % checkpoint_every == 0 or it + 1 == iterations or out_of_time:
                csv_file.flush()
                save_checkpoint(ckpt, trainer, state)
                save_theta(os.path.join(out_dir, THETA), trainer.theta_numpy(state), rule,
                           provenance=run_provenance(trainer.config, out_dir, it + 1,
                                                     time.time() - t_start))
            if out_of_time:
                break
    finally:
        csv_file.close()
        if bar is not None:
            bar.close()
    try:
        plot_metrics(out_dir)
    except ImportError:
        pass
    return trainer.theta_numpy(state)
