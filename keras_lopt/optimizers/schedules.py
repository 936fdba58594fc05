"""The schedule learned optimizers are deployed with: warm-up, then cosine."""

import math

from keras import optimizers


def warmup_cosine(peak_learning_rate, total_steps, warmup_fraction=0.05, final_learning_rate=0.0):
    """Linear warm-up from 0 over the first `warmup_fraction` of the run,
    then cosine decay to `final_learning_rate` at `total_steps`.

    This is the schedule the Celo2 authors deploy with (5% warm-up, cosine
    to 0). It is Keras's own `CosineDecay`, so it serialises like any Keras
    schedule. After `total_steps` the rate stays at `final_learning_rate`.

    Args:
        peak_learning_rate: the rate at the end of the warm-up.
        total_steps: the number of updates of the run (for `fit`: epochs x
            steps per epoch).
        warmup_fraction: the share of the run spent warming up, in [0, 1).
        final_learning_rate: the rate at `total_steps`.

    Example:

    >>> schedule = keras_lopt.optimizers.warmup_cosine(1e-3, total_steps=1000)
    >>> optimizer = keras.optimizers.AdamW(schedule)  # the same for AdamW
    """
    total_steps = int(total_steps)
    if total_steps < 1:
        raise ValueError(f"`total_steps` must be a positive integer; received {total_steps!r}.")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"`warmup_fraction` must be in [0, 1); received {warmup_fraction!r}.")
    peak = float(peak_learning_rate)
    warmup = int(math.floor(warmup_fraction * total_steps))
    return optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else peak,
        decay_steps=max(total_steps - warmup, 1),
        alpha=float(final_learning_rate) / peak if peak else 0.0,
        warmup_target=peak if warmup else None,
        warmup_steps=warmup,
    )


def scheduled(learning_rate, total_steps):
    """`learning_rate` as the optimizers take it: a number with a known run
    length becomes `warmup_cosine(learning_rate, total_steps)`; anything else
    (a schedule, a callable, `total_steps=None`) is left as it is."""
    if total_steps is None or not isinstance(learning_rate, (int, float)):
        return learning_rate
    return warmup_cosine(learning_rate, total_steps)
