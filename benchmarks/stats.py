"""The statistics of `benchmarks.evaluate`, in plain numpy (no Keras).

* `iqm`: interquartile mean (25% trimmed at each end, as rliable and
  `scipy.stats.trim_mean(x, 0.25)`).
* `stratified_bootstrap_ci`: rliable-style percentile interval of a
  statistic of a (tasks x seeds) score matrix, resampling seeds with
  replacement independently within each task.
* `steps_to_reach`: the first step at which a curve sampled at given steps
  reaches a target, linearly interpolated between the samples around the
  crossing.
* `grid_edge`: whether a selected grid point is the lowest / highest.
* `performance_profile`: fraction of tasks on which an optimizer's loss is
  within a factor tau of the best optimizer's.
"""

import math

import numpy as np


def iqm(values):
    """Interquartile mean of the finite entries of `values` (NaN if none).

    Sorts the values and averages those left after cutting
    `floor(0.25 * n)` from each end (`scipy.stats.trim_mean(x, 0.25)`).
    """
    x = np.sort(np.asarray(values, dtype="float64").ravel())
    x = x[np.isfinite(x)]
    if not x.size:
        return math.nan
    cut = int(0.25 * x.size)
    return float(np.mean(x[cut:x.size - cut]))


def stratified_bootstrap_ci(scores, statistic=iqm, reps=2000, alpha=0.05, seed=0):
    """Percentile `1 - alpha` interval of `statistic` over a stratified bootstrap.

    Args:
        scores: array (tasks, seeds); NaN entries are kept and resampled like
            any other, `statistic` decides what they mean.
        statistic: function of a flat array of scores.
        reps: bootstrap replicates.
        alpha: 0.05 gives the 95% interval.
        seed: seed of the resampling.

    Each replicate draws, for every task independently, `seeds` runs of that
    task with replacement (rliable's `StratifiedBootstrap`), then applies
    `statistic` to the whole resampled matrix. Returns `(low, high)`, NaN if
    `scores` is empty or every replicate is NaN.
    """
    scores = np.asarray(scores, dtype="float64")
    if scores.ndim != 2 or not scores.size:
        return (math.nan, math.nan)
    tasks, seeds = scores.shape
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, seeds, size=(reps, tasks, seeds))
    rows = np.arange(tasks)[None, :, None]
    stats = np.array([statistic(scores[rows[0], p]) for p in picks])
    stats = stats[np.isfinite(stats)]
    if not stats.size:
        return (math.nan, math.nan)
    return (float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2)))


def steps_to_reach(steps, values, target):
    """First (fractional) step at which the curve `values` is <= `target`, or None.

    `values[i]` is the curve at step `steps[i]` (increasing). The crossing
    is interpolated linearly between the last sample above the target and
    the first at or below it; a curve at or below the target at its first
    sample reaches it at `steps[0]`. A non-finite sample (a diverged run)
    ends the curve there: nothing after it counts.
    """
    steps = np.asarray(steps, dtype="float64")
    values = np.asarray(values, dtype="float64")
    if not math.isfinite(target):
        return None
    for i, value in enumerate(values):
        if not math.isfinite(value):
            return None
        if value <= target:
            if i == 0:
                return float(steps[0])
            previous = values[i - 1]
            fraction = (previous - target) / (previous - value) if previous > value else 1.0
            return float(steps[i - 1] + fraction * (steps[i] - steps[i - 1]))
    return None


def grid_edge(grid, index):
    """`"low"` / `"high"` if `grid[index]` is the smallest / largest of a grid
    of at least two values, else None."""
    grid = list(grid)
    if len(grid) < 2 or index is None:
        return None
    if grid[index] == min(grid):
        return "low"
    if grid[index] == max(grid):
        return "high"
    return None


def performance_profile(losses, taus):
    """Fraction of tasks on which each optimizer's loss is <= tau x the best.

    Args:
        losses: dict optimizer -> array over tasks (lower is better, > 0;
            non-finite: the optimizer failed there, never within any tau).
        taus: ratios >= 1.

    Returns dict optimizer -> array over `taus`. The best loss of a task is
    the smallest finite loss of any optimizer on it.
    """
    names = list(losses)
    matrix = np.array([np.asarray(losses[n], dtype="float64") for n in names])
    finite = np.where(np.isfinite(matrix), matrix, np.inf)
    best = finite.min(axis=0)
    ratio = finite / best
    taus = np.asarray(taus, dtype="float64")
    return {n: (ratio[i][None, :] <= taus[:, None]).mean(axis=1) for i, n in enumerate(names)}


def smooth(losses, window):
    """Trailing moving average over `window` samples (shorter at the start)."""
    losses = np.asarray(losses, dtype="float64")
    total = np.cumsum(losses)
    total[window:] = total[window:] - total[:-window]
    return total / np.minimum(np.arange(1, len(losses) + 1), window)
