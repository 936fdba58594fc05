"""The learning-rate schedule learned optimizers are deployed with.

`warmup_cosine` is the one definition: the Keras schedule
`keras_lopt.optimizers.WarmupCosine` and the meta-trainer's inner runs both
compute their rate with it.
"""

import math

from keras import ops


def warmup_steps(total_steps, warmup_fraction):
    """The number of warm-up updates: `floor(warmup_fraction * total_steps)`."""
    return ops.floor(ops.cast(total_steps, "float32") * warmup_fraction)


def warmup_cosine(step, total_steps, warmup_fraction=0.05, final_fraction=0.0):
    """The rate multiplier at update `step` (0-based) of a `total_steps` run.

    Linear warm-up from 0 over the first `warmup_fraction` of the run, then
    cosine decay from 1 to `final_fraction` at `total_steps`; after it,
    `final_fraction`. At `step = 0` with a warm-up the multiplier is 0.
    """
    step = ops.cast(step, "float32")
    total = ops.cast(total_steps, "float32")
    warmup = warmup_steps(total_steps, warmup_fraction)
    rising = step / ops.maximum(warmup, 1.0)
    progress = ops.clip((step - warmup) / ops.maximum(total - warmup, 1.0), 0.0, 1.0)
    cosine = 0.5 * (1.0 + ops.cos(math.pi * progress))
    decaying = final_fraction + (1.0 - final_fraction) * cosine
    return ops.where(step < warmup, rising, decaying)
