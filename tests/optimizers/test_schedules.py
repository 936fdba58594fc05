"""`warmup_cosine` and the optimizers' `total_steps`."""

import keras
import numpy as np
import pytest

from keras_lopt.optimizers import Celo2
from keras_lopt.optimizers import Celo2Base
from keras_lopt.optimizers import WarmupCosine
from keras_lopt.optimizers import warmup_cosine


def _rate(schedule, step):
    return float(keras.ops.convert_to_numpy(schedule(step)))


def test_warmup_then_cosine_to_zero():
    schedule = warmup_cosine(1e-3, total_steps=200)
    assert _rate(schedule, 0) == 0.0
    np.testing.assert_allclose(_rate(schedule, 5), 0.5e-3, rtol=1e-6)
    np.testing.assert_allclose(_rate(schedule, 10), 1e-3, rtol=1e-6)  # 5% of 200
    np.testing.assert_allclose(_rate(schedule, 105), 0.5e-3, rtol=1e-5)  # half-way down
    assert _rate(schedule, 200) == pytest.approx(0.0, abs=1e-12)
    assert _rate(schedule, 400) == pytest.approx(0.0, abs=1e-12)
    floor = warmup_cosine(1e-3, 100, warmup_fraction=0.0, final_learning_rate=1e-5)
    np.testing.assert_allclose(_rate(floor, 0), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(_rate(floor, 100), 1e-5, rtol=1e-4)
    # The same curve as Keras's own CosineDecay with a warm-up.
    keras_schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=190, alpha=0.0, warmup_target=1e-3, warmup_steps=10)
    for step in (0, 1, 7, 10, 11, 100, 199, 200, 250):
        np.testing.assert_allclose(_rate(schedule, step), _rate(keras_schedule, step),
                                   rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine(1e-3, 0)
    with pytest.raises(ValueError, match="warmup_fraction"):
        warmup_cosine(1e-3, 10, warmup_fraction=1.0)


@pytest.mark.parametrize("cls", [Celo2, Celo2Base])
def test_total_steps_gives_the_schedule_and_round_trips(cls):
    optimizer = cls(learning_rate=2e-3, total_steps=100)
    assert isinstance(optimizer._learning_rate, WarmupCosine)
    clone = cls.from_config(optimizer.get_config())
    assert clone.total_steps == 100
    for step in (0, 3, 50, 99):
        assert _rate(clone._learning_rate, step) == _rate(optimizer._learning_rate, step)
    np.testing.assert_allclose(_rate(clone._learning_rate, 5), 2e-3, rtol=1e-6)
    # A schedule of the user's own is kept as it is.
    own = keras.optimizers.schedules.ExponentialDecay(1e-3, 10, 0.5)
    assert cls(learning_rate=own, total_steps=100)._learning_rate is own
    assert not isinstance(cls()._learning_rate, keras.optimizers.schedules.LearningRateSchedule)


def test_fit_follows_the_schedule():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(4),
                              keras.layers.Dense(1)])
    model.compile(optimizer=Celo2(total_steps=40), loss="mse")
    kernel = model.layers[1].kernel
    before = keras.ops.convert_to_numpy(kernel)
    # First update: the warm-up starts from 0, so the hidden matrix stays put.
    model.train_on_batch(np.ones((4, 3), "float32"), np.ones((4, 1), "float32"))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(kernel), before)
    model.train_on_batch(np.ones((4, 3), "float32"), np.ones((4, 1), "float32"))
    assert not np.array_equal(keras.ops.convert_to_numpy(kernel), before)
