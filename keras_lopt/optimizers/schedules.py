"""The schedule learned optimizers are deployed with: warm-up, then cosine."""

from keras import ops
from keras import optimizers
from keras.saving import register_keras_serializable

from keras_lopt.rules import schedule as schedule_lib


@register_keras_serializable(package="keras_lopt")
class WarmupCosine(optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0, then cosine decay (`warmup_cosine`).

    The rate is `peak_learning_rate * keras_lopt.rules.schedule.warmup_cosine
    (step, total_steps, warmup_fraction, final_learning_rate / peak)`, the
    function the meta-trainer's inner runs use too.
    """

    def __init__(self, peak_learning_rate, total_steps, warmup_fraction=0.05,
                 final_learning_rate=0.0):
        total_steps = int(total_steps)
        if total_steps < 1:
            raise ValueError(f"`total_steps` must be a positive integer; received {total_steps!r}.")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"`warmup_fraction` must be in [0, 1); received {warmup_fraction!r}.")
        self.peak_learning_rate = float(peak_learning_rate)
        self.total_steps = total_steps
        self.warmup_fraction = float(warmup_fraction)
        self.final_learning_rate = float(final_learning_rate)

    def __call__(self, step):
        peak = self.peak_learning_rate
        final = self.final_learning_rate / peak if peak else 0.0
        multiplier = schedule_lib.warmup_cosine(step, self.total_steps, self.warmup_fraction, final)
        return ops.cast(multiplier * peak, "float32")

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "total_steps": self.total_steps,
            "warmup_fraction": self.warmup_fraction,
            "final_learning_rate": self.final_learning_rate,
        }


def warmup_cosine(peak_learning_rate, total_steps, warmup_fraction=0.05, final_learning_rate=0.0):
    """Linear warm-up from 0 over the first `warmup_fraction` of the run,
    then cosine decay to `final_learning_rate` at `total_steps`.

    This is the schedule the Celo2 authors deploy with (5% warm-up, cosine
    to 0), as a `WarmupCosine` schedule: it serialises like any Keras
    schedule, and works with any optimizer. Step 0 has rate 0; after
    `total_steps` the rate stays at `final_learning_rate`.

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
    return WarmupCosine(peak_learning_rate, total_steps, warmup_fraction, final_learning_rate)


def scheduled(learning_rate, total_steps):
    """`learning_rate` as the optimizers take it: a number with a known run
    length becomes `warmup_cosine(learning_rate, total_steps)`; anything else
    (a schedule, a callable, `total_steps=None`) is left as it is."""
    if total_steps is None or not isinstance(learning_rate, (int, float)):
        return learning_rate
    return warmup_cosine(learning_rate, total_steps)
