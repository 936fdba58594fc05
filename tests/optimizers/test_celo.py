"""Celo: fidelity to the released weights, `fit` integration, bad input."""

import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_lopt
from keras_lopt.callbacks import FeedLossAndHorizon
from keras_lopt.optimizers import Celo
from keras_lopt.rules import celo
from keras_lopt.rules.theta import init_theta
from keras_lopt.optimizers import load_theta

def _active_theta():
    """Fresh weights whose scheduler reacts to its inputs (the init's
    `lr_mult` is a constant 1, which would hide wrong inputs)."""
    theta = init_theta("celo", 0)
    rng = np.random.default_rng(0)
    theta["rnn_params/step_size/w"] = rng.normal(0, 0.3, (64, 1)).astype("float32")
    return theta


THETA = _active_theta()


def _np(x):
    return ops.convert_to_numpy(x)


# --------------------------------------------------------------- fidelity


def test_released_checkpoint_loads_with_every_entry(celo_reference):
    theta = load_theta(celo_reference["theta_path"], module=None)
    assert {k: v.shape for k, v in theta.items()} == celo.THETA_SHAPES
    assert sum(v.size for v in theta.values()) == 37089
    cases = celo_reference["cases"]
    for name, value in theta.items():
        np.testing.assert_array_equal(value, cases[f"theta/{name}"])


def test_public_optimizer_reproduces_reference_trajectory(celo_reference):
    cases = celo_reference["cases"]
    order = [str(s) for s in cases["meta/leaf_order_jax"]]
    variables = [
        keras.Variable(cases[f"params0/{leaf}"], name=leaf.replace("/", "_"))
        for leaf in order
    ]
    optimizer = Celo(
        weights=celo_reference["theta_path"], total_steps=int(cases["celo/num_steps"]),
        routing="reference",
    )
    previous = [cases[f"params0/{leaf}"] for leaf in order]
    for t in range(len(cases["celo/losses"])):
        grads = [ops.convert_to_tensor(cases[f"celo/grads/{t}/{leaf}"]) for leaf in order]
        optimizer.apply(grads, variables, loss=cases["celo/losses"][t])
        lr_mult = cases[f"celo/lr_mult/{t}"]
        np.testing.assert_allclose(optimizer.lr_mult, lr_mult[0], rtol=1e-5, atol=0)
        for leaf, var, before in zip(order, variables, previous):
            value = _np(var.value)
            np.testing.assert_allclose(
                value, cases[f"celo/params/{t}/{leaf}"], rtol=0, atol=1e-6,
                err_msg=f"params of {leaf} at step {t}",
            )
            step = cases[f"celo/step/{t}/{leaf}"]
            np.testing.assert_allclose(
                before - value, step, rtol=0, atol=1e-4 * np.abs(step).max() + 1e-7,
                err_msg=f"step of {leaf} at step {t}",
            )
        previous = [_np(v.value) for v in variables]
    # The loss buffer and the LSTM state match the reference after the run.
    last = len(cases["celo/losses"]) - 1
    np.testing.assert_allclose(
        _np(optimizer._scheduler_state["means"].value), cases[f"celo/loss_buffer/means/{last}"], rtol=1e-6
    )
    np.testing.assert_allclose(
        _np(optimizer._scheduler_state["hidden"].value), cases[f"celo/lstm_hidden/{last}"], atol=1e-5
    )


def test_loss_buffer_and_progress_features_match_reference(celo_reference):
    cases = celo_reference["cases"]
    total = int(cases["celo/num_steps"])
    decays = celo.loss_decays(total)
    np.testing.assert_array_equal(decays, cases["celo/loss_buffer/decays"])
    buffer = celo.init_loss_buffer()
    for t, loss in enumerate(cases["celo/losses"]):
        features, buffer = celo.update_loss_buffer(buffer, loss, decays)
        np.testing.assert_allclose(_np(features), cases[f"celo/loss_features/{t}"], atol=5e-5)
        np.testing.assert_allclose(
            _np(buffer["minimum"]), cases[f"celo/loss_buffer/running_min/{t}"], rtol=1e-5
        )
        inputs = _np(celo.scheduler_inputs(t, total, features, 8))
        np.testing.assert_allclose(inputs, cases[f"celo/lstm_input/{t}"], atol=5e-5)


def test_shipped_weights_are_the_default_and_complete():
    optimizer = Celo(total_steps=10)
    assert {k: v.shape for k, v in optimizer.theta.items()} == celo.THETA_SHAPES
    assert all(np.isfinite(v).all() for v in optimizer.theta.values())


# ---------------------------------------------------------- fit integration


class RecordingCelo(Celo):
    """Records the loss each update sees, by update index."""

    def build(self, var_list):
        super().build(var_list)
        self.seen = self.add_variable((64,), initializer="zeros", name="seen")

    def _backend_update_step(self, grads, variables, learning_rate):
        t = ops.floor_divide(
            ops.cast(self._iterations, "int32"), self.gradient_accumulation_steps or 1
        )
        hit = ops.equal(ops.arange(64, dtype="int32"), t)
        self.seen.assign(ops.where(hit, self._step_loss, self.seen.value))
        super()._backend_update_step(grads, variables, learning_rate)


class BatchLosses(keras.callbacks.Callback):
    """Recovers each batch's loss from the running means `fit` logs."""

    def on_epoch_begin(self, epoch, logs=None):
        self.means = []

    def on_train_batch_end(self, batch, logs=None):
        self.means.append(float(logs["loss"]))

    def batch_losses(self):
        k = np.arange(1, len(self.means) + 1)
        totals = k * np.asarray(self.means, "float64")
        return np.diff(totals, prepend=0.0)


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 2))).astype("float32")
    return x, y


def _sequential():
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)]
    )


def _functional():
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2)(h))


class SubclassedModel(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="tanh")
        self.out = keras.layers.Dense(2)

    def call(self, x):
        return self.out(self.hidden(x))


@pytest.mark.parametrize("make_model", [_sequential, _functional, SubclassedModel])
def test_fit_feeds_each_batch_its_own_loss(make_model):
    keras.utils.set_random_seed(1)
    x, y = _data()
    model = make_model()
    optimizer = RecordingCelo(weights=THETA)
    model.compile(optimizer=optimizer, loss="mse")
    record = BatchLosses()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[FeedLossAndHorizon(), record])
    seen = _np(optimizer.seen.value)[:8]
    expected = record.batch_losses()
    np.testing.assert_allclose(seen, expected, rtol=2e-4)
    # ...and not the epoch's running mean that `logs["loss"]` reports.
    assert np.abs(seen[1:] - np.asarray(record.means[1:])).max() > 1e-3
    assert optimizer.horizon == 8
    assert int(_np(optimizer.iterations)) == 8
    lr_mults = []

    def read_lr_mult(batch, logs):
        if hasattr(model, "jax_state_sync"):
            model.jax_state_sync()
        lr_mults.append(optimizer.lr_mult)

    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[FeedLossAndHorizon(),
                         keras.callbacks.LambdaCallback(on_train_batch_end=read_lr_mult)])
    assert len(set(np.round(lr_mults, 6))) == len(lr_mults)  # the schedule moves


def test_horizon_from_fit_counts_epochs_accumulation_and_earlier_updates():
    x, y = _data()
    model = _sequential()
    optimizer = Celo(weights=THETA, gradient_accumulation_steps=2)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[FeedLossAndHorizon()])
    assert optimizer.horizon == 12  # 3 epochs x 8 batches / 2
    # A second fit keeps T (the learned schedule is not stretched) and says so.
    with pytest.warns(UserWarning, match="past the horizon T = 12"):
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[FeedLossAndHorizon()])
    assert optimizer.horizon == 12
    optimizer.set_total_steps(40)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[FeedLossAndHorizon()])
    assert optimizer.horizon == 40
    fixed = Celo(weights=THETA, total_steps=1000)
    model = _sequential()
    model.compile(optimizer=fixed, loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[FeedLossAndHorizon()])
    assert fixed.horizon == 1000
    fixed.set_total_steps(77)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[FeedLossAndHorizon()])
    assert fixed.horizon == 77


def test_repeated_fits_compile_the_train_step_once():
    x, y = _data()
    model = _sequential()
    optimizer = Celo(weights=THETA, total_steps=100)
    model.compile(optimizer=optimizer, loss="mse")
    traced, feed = [], optimizer.feed_loss
    optimizer.feed_loss = lambda loss: (traced.append(1), feed(loss))[1]
    fit = dict(batch_size=8, verbose=0, callbacks=[FeedLossAndHorizon()])
    model.fit(x, y, epochs=1, **fit)
    first = vars(model)["_keras_lopt_feeding_train_function"][2]
    after_first = len(traced)
    model.fit(x, y, epochs=1, **fit)
    assert vars(model)["_keras_lopt_feeding_train_function"][2] is first
    if keras.backend.backend() == "jax":
        # The Python step runs only while JAX traces it: not again.
        assert len(traced) == after_first
    # Outside fit the model is left as it was, and a recompiled model does
    # not reuse the step compiled for its old loss.
    assert "train_step" not in vars(model)
    model.compile(optimizer=model.optimizer, loss="mae")
    model.fit(x, y, epochs=1, **fit)
    assert vars(model)["_keras_lopt_feeding_train_function"][2] is not first


def test_a_failed_fit_leaves_no_patch_behind():
    x, y = _data()

    def batches():
        while True:
            yield x[:8], y[:8]

    model = _sequential()
    model.compile(optimizer=Celo(weights=THETA), loss="mse")
    with pytest.raises(ValueError, match="steps per epoch"):
        model.fit(batches(), epochs=1, verbose=0, callbacks=[FeedLossAndHorizon()])
    assert "scale_loss" not in vars(model.optimizer) and "train_step" not in vars(model)
    # An interrupted fit (on_train_end never ran) is cleaned up by the next.
    callback = FeedLossAndHorizon.attach(model)
    model.optimizer.set_total_steps(20)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[FeedLossAndHorizon()])
    assert "scale_loss" not in vars(model.optimizer) and "train_step" not in vars(model)
    callback.detach()


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX-only restriction")
def test_custom_train_step_on_jax_is_refused_with_instructions():
    class Custom(keras.Sequential):
        def train_step(self, state, data):
            return super().train_step(state, data)

    x, y = _data()
    model = Custom([keras.Input((6,)), keras.layers.Dense(2)])
    model.compile(optimizer=Celo(weights=THETA, total_steps=8), loss="mse")
    with pytest.raises(TypeError, match="feed_loss"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[FeedLossAndHorizon()])


def test_gradient_accumulation_updates_with_the_mean_loss():
    keras.utils.set_random_seed(2)
    x, y = _data()
    model = _sequential()
    optimizer = RecordingCelo(weights=THETA, gradient_accumulation_steps=2)
    model.compile(optimizer=optimizer, loss="mse")
    record = BatchLosses()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[FeedLossAndHorizon(), record])
    losses = record.batch_losses()
    np.testing.assert_allclose(
        _np(optimizer.seen.value)[:4], losses.reshape(4, 2).mean(axis=1), rtol=2e-4
    )
    assert float(_np(optimizer._scheduler_state["count"].value)) == 4.0


def test_fit_without_the_callback_or_horizon_says_what_to_do():
    x, y = _data()
    model = _sequential()
    model.compile(optimizer=Celo(weights=THETA, total_steps=10), loss="mse")
    with pytest.raises(ValueError, match="FeedLossAndHorizon"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model = _sequential()
    optimizer = Celo(weights=THETA)
    variables = model.trainable_variables
    grads = [ops.zeros(v.shape) for v in variables]
    with pytest.raises(ValueError, match="total number of updates"):
        optimizer.apply(grads, variables, loss=1.0)
    # A generator without a length: see test_a_failed_fit_leaves_no_patch_behind.
    model = _sequential()
    model.compile(optimizer="adam", loss="mse")
    with pytest.raises(TypeError, match="Celo"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[FeedLossAndHorizon()])


def test_save_and_load_resumes_the_identical_trajectory(tmp_path):
    x, y = _data()
    keras.utils.set_random_seed(3)
    model = _sequential()
    model.compile(optimizer=Celo(weights=THETA, total_steps=16), loss="mse")
    initial = [_np(v.value) for v in model.weights]
    fit = dict(batch_size=8, shuffle=False, verbose=0, callbacks=[FeedLossAndHorizon()])
    model.fit(x, y, epochs=2, **fit)
    straight = [_np(v.value) for v in model.weights]

    keras.utils.set_random_seed(3)
    model = _sequential()
    model.set_weights(initial)
    model.compile(optimizer=Celo(weights=THETA, total_steps=16), loss="mse")
    model.fit(x, y, epochs=1, **fit)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    opt = loaded.optimizer
    for name, var in opt._scheduler_state.items():
        np.testing.assert_array_equal(
            _np(var.value), _np(model.optimizer._scheduler_state[name].value)
        )
    assert opt.horizon == 16 and isinstance(opt, Celo)
    loaded.fit(x, y, epochs=2, initial_epoch=1, **fit)
    for a, b in zip(straight, loaded.weights):
        np.testing.assert_allclose(a, _np(b.value), rtol=0, atol=1e-6)

    # A horizon that `fit` derived (no total_steps) is restored as well.
    model = _sequential()
    model.compile(optimizer=Celo(weights=THETA), loss="mse")
    model.fit(x, y, epochs=3, **fit)
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.optimizer.horizon == 24 and not loaded.optimizer.horizon_fixed


def test_loss_scale_factor_and_loss_scale_optimizer():
    x, y = _data()
    results, means, seen = [], [], []
    for factor in (None, 64.0, "lso"):
        keras.utils.set_random_seed(4)
        model = _sequential()
        if factor == "lso":
            inner = RecordingCelo(weights=THETA, total_steps=8)
            optimizer = keras.optimizers.LossScaleOptimizer(inner)
        else:
            inner = optimizer = RecordingCelo(
                weights=THETA, total_steps=8, loss_scale_factor=factor
            )
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[FeedLossAndHorizon()])
        results.append([_np(v.value) for v in model.weights])
        means.append(_np(inner._scheduler_state["means"].value))
        seen.append(_np(inner.seen.value)[:8])
    # The optimizer sees the unscaled loss, so the loss EMAs and the
    # trajectory do not depend on loss scaling.
    for run in (1, 2):
        np.testing.assert_allclose(seen[run], seen[0], rtol=1e-5)
        np.testing.assert_allclose(means[run], means[0], rtol=1e-5)
        for a, b in zip(results[0], results[run]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_config_round_trip():
    optimizer = Celo(weights=THETA, total_steps=50, use_scheduler=False, learning_rate=0.5)
    clone = Celo.from_config(optimizer.get_config())
    assert clone.total_steps == 50 and clone.use_scheduler is False
    for k, v in optimizer.theta.items():
        np.testing.assert_array_equal(clone.theta[k], v)
    assert keras.optimizers.deserialize(keras.optimizers.serialize(optimizer)).horizon == 50


# -------------------------------------------------------------- bad input


def _two_variables():
    rng = np.random.default_rng(5)
    return [
        keras.Variable(rng.normal(size=(4, 3)).astype("float32"), name="w"),
        keras.Variable(rng.normal(size=(3,)).astype("float32"), name="b"),
    ]


def _snapshot(optimizer, variables):
    return [_np(v.value) for v in list(variables) + list(optimizer.variables)]


def test_non_finite_loss_skips_the_whole_update():
    variables = _two_variables()
    optimizer = Celo(weights=THETA, total_steps=10)
    grads = [ops.ones((4, 3)), ops.ones((3,))]
    optimizer.apply(grads, variables, loss=1.0)
    before = _snapshot(optimizer, variables)
    for bad in (float("nan"), float("inf")):
        optimizer.apply(grads, variables, loss=bad)
    after = _snapshot(optimizer, variables)
    iterations = optimizer.variables.index(optimizer.iterations) + len(variables)
    for i, (a, b) in enumerate(zip(before, after)):
        if i == iterations:
            assert int(b) == int(a) + 2
        else:
            np.testing.assert_array_equal(a, b)
    optimizer.apply(grads, variables, loss=0.9)
    assert all(np.isfinite(_np(v.value)).all() for v in variables)


def test_non_finite_gradient_leaves_that_variable_alone():
    variables = _two_variables()
    optimizer = Celo(weights=THETA, total_steps=10)
    w0, b0 = (_np(v.value) for v in variables)
    bad = np.ones((4, 3), "float32")
    bad[1, 2] = np.nan
    optimizer.apply([ops.convert_to_tensor(bad), ops.ones((3,))], variables, loss=1.0)
    np.testing.assert_array_equal(_np(variables[0].value), w0)
    assert not np.array_equal(_np(variables[1].value), b0)
    for slot in optimizer._states[0].values():
        np.testing.assert_array_equal(_np(slot.value), 0.0)


def test_training_past_the_horizon_stays_finite():
    variables = _two_variables()
    optimizer = Celo(weights=THETA, total_steps=3)
    rng = np.random.default_rng(6)
    for t in range(20):
        grads = [ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32")) for v in variables]
        optimizer.apply(grads, variables, loss=2.0 / (t + 1))
    assert all(np.isfinite(_np(v.value)).all() for v in variables)
    assert np.isfinite(optimizer.lr_mult)
    # Past T the progress features saturate: the schedule keeps a finite,
    # nearly constant multiplier rather than blowing up or going negative.
    late = []
    for _ in range(3):
        optimizer.apply([ops.zeros(v.shape) for v in variables], variables, loss=0.1)
        late.append(optimizer.lr_mult)
    assert 0 < min(late) and max(late) < 10


@pytest.mark.parametrize("steps", [0, -5, 2.5, True])
def test_bad_total_steps_are_rejected(steps):
    with pytest.raises(ValueError, match="total_steps"):
        Celo(weights=THETA, total_steps=steps)
    with pytest.raises(ValueError, match="total_steps"):
        Celo(weights=THETA).set_total_steps(steps)


def test_wrong_weights_name_what_is_missing(tmp_path):
    from keras_lopt.rules import celo2
    from keras_lopt.rules.theta import init_theta

    with pytest.raises(ValueError, match="missing entries"):
        Celo(weights=init_theta("celo2", 0))
    theta = dict(THETA)
    theta["rnn_params/step_size/w"] = np.zeros((32, 1), "float32")
    with pytest.raises(ValueError, match="step_size/w"):
        Celo(weights=theta)


def test_non_scalar_loss_and_integer_variables_are_rejected():
    variables = _two_variables()
    optimizer = Celo(weights=THETA, total_steps=5)
    with pytest.raises(ValueError, match="scalar"):
        optimizer.apply([ops.ones((4, 3)), ops.ones((3,))], variables, loss=np.ones(3))
    counter = keras.Variable(np.zeros((2,), "int32"), trainable=False, name="count")
    with pytest.raises(TypeError, match="floating-point"):
        Celo(weights=THETA, total_steps=5).build([counter])


def test_bfloat16_and_rank_four_variables_update_in_their_dtype():
    rng = np.random.default_rng(7)
    variables = [
        keras.Variable(rng.normal(size=(3, 3, 2, 4)).astype("float32"), name="conv"),
        keras.Variable(np.float32(0.3), name="scalar"),
        keras.Variable(rng.normal(size=(5, 2)), dtype="bfloat16", name="half"),
    ]
    # A learning-rate multiplier of 10 makes the relative step (1e-3 x 10)
    # larger than bfloat16's resolution (2^-8).
    optimizer = Celo(weights=THETA, total_steps=5, learning_rate=10.0)
    grads = [ops.cast(ops.ones(v.shape), v.dtype) for v in variables]
    before = [_np(ops.cast(v.value, "float32")) for v in variables]
    optimizer.apply(grads, variables, loss=1.0)
    for v, b in zip(variables, before):
        after = _np(ops.cast(v.value, "float32"))
        assert np.isfinite(after).all() and not np.array_equal(after, b)
    assert "bfloat16" in str(variables[2].dtype)


def test_weight_decay_adds_its_term_to_the_step_of_decayed_variables_only():
    grads = [ops.ones((4, 3)), ops.ones((3,))]
    runs = {}
    for decay in (0.0, 0.1):
        variables = _two_variables()
        optimizer = Celo(weights=THETA, total_steps=10, weight_decay=decay or None)
        optimizer.exclude_from_weight_decay(var_names=["b"])
        start = [_np(v.value) for v in variables]
        optimizer.apply(grads, variables, loss=1.0)
        runs[decay] = (start, [_np(v.value) for v in variables], optimizer)
    (start, plain, _), (_, decayed, optimizer) = runs[0.0], runs[0.1]
    scale = float(_np(optimizer.learning_rate)) * optimizer.lr_mult
    np.testing.assert_allclose(
        plain[0] - decayed[0], scale * celo.STEP_MULT * 0.1 * start[0], rtol=1e-4, atol=1e-7
    )
    np.testing.assert_array_equal(plain[1], decayed[1])
