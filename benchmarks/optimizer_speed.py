"""Time one optimizer step of Celo2 / Celo2Base / Celo next to AdamW / Muon.

Every optimizer updates the same variables: the four matrices of a GPT-2-small
block, (768, 2304), (768, 768), (768, 3072), (3072, 768), and their biases
(2304,), (768,), (3072,), (768,), about 7.1M float32 parameters, with fixed
random gradients. All optimizers use their default arguments. They run in one
process, interleaved step by step (one step of each per round), so background
load hits them alike; each row is the median over `--repeats` rounds after
`--warmup` untimed steps.

How a step is timed on each backend:

* jax: `jax.jit(optimizer.stateless_apply)` (optimizer and model state
  donated, the outputs fed back as the next inputs), `block_until_ready`.
* tensorflow: `tf.function(optimizer.apply, jit_compile=False)`; with
  `--tf-xla` a second table with `jit_compile=True`.
* torch: `optimizer.apply` eagerly.

Columns: median and minimum ms per step, the median's ratio to AdamW and to
Muon, optimizer state bytes / parameter bytes (all `optimizer.variables` but
the `iterations` and `learning_rate` scalars), the first call's time (on jax
the trace + XLA compile, on tensorflow the trace, on torch one eager step), on
jax XLA's temporary buffer size, and the targets (set for jax): Celo2 <= 1.25x
Muon, Celo2Base <= 4x AdamW.

`--fit-lm` also times end-to-end `model.fit` steps of a small byte-level
Transformer LM (d_model 128, 2 layers, 4 heads, causal attention, seq len 128,
batch 32, trained on this repository's own text) with Celo2 and with AdamW:
the median time between consecutive `on_train_batch_end` calls (the loss is
read back each step, so asynchronous dispatch cannot hide work).

`--fit-block` times the path users run, `model.compile(optimizer=...)` with
Keras's default compile settings and `train_on_batch`, on a GPT-2-small MLP
block (768 -> 3072 -> 768, GELU) between an input and an output projection
(768 x 768, which the deployment routing gives to Adam), batch 8; every
optimizer at its defaults, interleaved rounds, medians.

`--first-step` times the first `train_on_batch` (trace + compile + one step)
of fresh tiny models, each optimizer at its defaults: a keras-hub
`GPT2Backbone` (2 layers, width 64, 38 variables; skipped without
keras-hub) and `keras_lopt.models.TransformerLM` (2 layers, width 64), with
the issue's target: Celo2 <= 2x AdamW + 5 s.

The markdown tables go to stdout and are appended to
`benchmarks/results/optimizer_speed_<backend>.md` (`--no-save` to skip).

Commands (from the repository root, as a module of the `benchmarks` package):

    KERAS_BACKEND=jax        .venv/bin/python -m benchmarks.optimizer_speed --fit-lm
    KERAS_BACKEND=tensorflow .venv/bin/python -m benchmarks.optimizer_speed --fit-lm --tf-xla
    KERAS_BACKEND=torch      .venv/bin/python -m benchmarks.optimizer_speed --fit-lm
    # On a machine busy with other jobs, add `--threads 1`: with their default
    # thread pools the backends' timings swing by 10x or more (torch worst).
    KERAS_BACKEND=jax        .venv/bin/python -m benchmarks.optimizer_speed --fit-lm --threads 1
    # Celo's scheduler overhead with 10 vs 200 variables
    KERAS_BACKEND=jax        .venv/bin/python -m benchmarks.optimizer_speed --only-variable-count --variable-count 10 200
    # smoke test: matrices 4x smaller, 3 rounds, nothing saved
    KERAS_BACKEND=jax        .venv/bin/python -m benchmarks.optimizer_speed --quick --fit-lm --no-save
    # what a user's fit step and first step cost, every backend
    KERAS_BACKEND=torch      .venv/bin/python -m benchmarks.optimizer_speed --only-fit --fit-block --first-step
"""

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # `python benchmarks/optimizer_speed.py`: `benchmarks` is not importable
    sys.exit("Run from the repository root as a module: python -m benchmarks.optimizer_speed "
             + shlex.join(sys.argv[1:]))

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _limit_threads():
    """`--threads N`: set before any backend is imported, or it is too late."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--threads", type=int, default=None)
    n = early.parse_known_args()[0].threads
    if n:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                    "TF_NUM_INTEROP_THREADS"):
            os.environ[var] = str(n)
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_cpu_multi_thread_eigen={'true' if n > 1 else 'false'}"
            + f" intra_op_parallelism_threads={n}"
        ).strip()
    return n


THREADS = _limit_threads()

import keras  # noqa: E402  (after `_limit_threads`, which must precede the backend)

import keras_lopt  # noqa: E402
from benchmarks.eval_tasks import TokenAndPositionEmbedding  # noqa: E402

BACKEND = keras.backend.backend()
if THREADS and BACKEND == "torch":
    import torch

    torch.set_num_threads(THREADS)

# (name, shape) of one GPT-2-small block: attention qkv / output projection,
# MLP up / down projection, and their biases.
GPT2_BLOCK = [
    ("attn_qkv_kernel", (768, 2304)),
    ("attn_proj_kernel", (768, 768)),
    ("mlp_up_kernel", (768, 3072)),
    ("mlp_down_kernel", (3072, 768)),
    ("attn_qkv_bias", (2304,)),
    ("attn_proj_bias", (768,)),
    ("mlp_up_bias", (3072,)),
    ("mlp_down_bias", (768,)),
]

# Celo's speed does not depend on its weights' values; a fresh init avoids
# needing any weights file. Every Celo step is handed a constant loss.
CELO_THETA = keras_lopt.rules.theta.init_theta("celo", 0)

# Celo2 on bare variables (no model) with routing "reference": every matrix
# takes the learned rule, as when these tables were first measured. Under the
# default deployment routing the first and last matrices of a list without a
# model would stand for io layers and take Adam, a different mix.
OPTIMIZERS = {
    "Celo2": lambda: keras_lopt.optimizers.Celo2(routing="reference"),
    "Celo2Base": lambda: keras_lopt.optimizers.Celo2Base(),
    "Celo": lambda: keras_lopt.optimizers.Celo(weights=CELO_THETA, total_steps=10_000),
    "AdamW": lambda: keras.optimizers.AdamW(),
    "Muon": lambda: keras.optimizers.Muon(),
}

TARGETS = {"Celo2": ("Muon", 1.25), "Celo2Base": ("AdamW", 4.0)}


# --------------------------------------------------------------------------
# One optimizer step
# --------------------------------------------------------------------------


def make_problem(scale):
    """Initial parameter values and fixed gradients, as NumPy arrays."""
    rng = np.random.default_rng(0)
    specs = [(n, tuple(max(1, d // scale) for d in s)) for n, s in GPT2_BLOCK]
    params = [(0.02 * rng.standard_normal(s)).astype("float32") for _, s in specs]
    grads = [(1e-2 * rng.standard_normal(s)).astype("float32") for _, s in specs]
    return specs, params, grads


def make_variables(specs, params):
    return [keras.Variable(p, name=n) for (n, _), p in zip(specs, params)]


def state_bytes(optimizer):
    skip = {id(optimizer.iterations), id(getattr(optimizer, "_learning_rate", None))}
    total = 0
    for v in optimizer.variables:
        if id(v) in skip:
            continue
        itemsize = np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
        total += int(np.prod(v.shape)) * itemsize
    return total


def _feed_loss(optimizer):
    if hasattr(optimizer, "feed_loss"):
        optimizer.feed_loss(1.0)


class JaxStepper:
    def __init__(self, optimizer, variables, grads):
        import jax

        self.jax = jax
        optimizer.build(variables)
        self.opt_vars = [jax.numpy.array(v.value) for v in optimizer.variables]
        self.train_vars = [jax.numpy.array(v.value) for v in variables]
        self.grads = [jax.numpy.asarray(g) for g in grads]
        def apply(opt_vars, grads, train_vars):
            _feed_loss(optimizer)
            return optimizer.stateless_apply(opt_vars, grads, train_vars)

        jitted = jax.jit(apply, donate_argnums=(0, 2))
        start = time.perf_counter()
        compiled = jitted.lower(self.opt_vars, self.grads, self.train_vars).compile()
        self.compile_s = time.perf_counter() - start
        self.step_fn = compiled
        try:
            self.temp_bytes = compiled.memory_analysis().temp_size_in_bytes
        except Exception:  # memory_analysis is not available on every platform
            self.temp_bytes = None

    def step(self):
        self.train_vars, self.opt_vars = self.step_fn(
            self.opt_vars, self.grads, self.train_vars
        )
        self.jax.block_until_ready((self.train_vars, self.opt_vars))


class TfStepper:
    def __init__(self, optimizer, variables, grads, jit_compile):
        import tensorflow as tf

        optimizer.build(variables)
        self.optimizer = optimizer
        grads = [tf.constant(g) for g in grads]
        def apply():
            _feed_loss(optimizer)
            optimizer.apply(grads, variables)

        self.fn = tf.function(apply, jit_compile=jit_compile)
        start = time.perf_counter()
        self.step()  # traces (and with XLA compiles) the function
        self.compile_s = time.perf_counter() - start
        self.temp_bytes = None

    def step(self):
        self.fn()
        self.optimizer.iterations.numpy()  # wait for the step to finish


class TorchStepper:
    def __init__(self, optimizer, variables, grads):
        import torch

        self.sync = torch.cuda.synchronize if torch.cuda.is_available() else None
        optimizer.build(variables)
        self.optimizer, self.variables = optimizer, variables
        self.grads = [keras.ops.convert_to_tensor(g) for g in grads]
        start = time.perf_counter()
        self.step()
        self.compile_s = time.perf_counter() - start
        self.temp_bytes = None

    def step(self):
        _feed_loss(self.optimizer)
        self.optimizer.apply(self.grads, self.variables)
        if self.sync:
            self.sync()


def make_stepper(optimizer, variables, grads, mode):
    if BACKEND == "jax":
        return JaxStepper(optimizer, variables, grads)
    if BACKEND == "tensorflow":
        return TfStepper(optimizer, variables, grads, jit_compile=(mode == "xla"))
    if BACKEND == "torch":
        return TorchStepper(optimizer, variables, grads)
    raise SystemExit(f"Unsupported KERAS_BACKEND={BACKEND!r}")


def bench_steps(mode, scale, repeats, warmup):
    specs, params, grads = make_problem(scale)
    param_bytes = sum(p.nbytes for p in params)
    steppers, rows = {}, {}
    for name, factory in OPTIMIZERS.items():
        optimizer = factory()
        try:
            stepper = make_stepper(optimizer, make_variables(specs, params), grads, mode)
            for _ in range(warmup):
                stepper.step()
        except Exception as e:  # report and keep benchmarking the others
            rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            print(f"  {name}: FAILED ({rows[name]['error']})", file=sys.stderr)
            continue
        steppers[name] = stepper
        rows[name] = {
            "state_ratio": state_bytes(optimizer) / param_bytes,
            "compile_s": stepper.compile_s,
            "temp_bytes": stepper.temp_bytes,
            "times": [],
        }
        print(f"  {name}: ready (first call {stepper.compile_s:.1f}s)", file=sys.stderr)
    for _ in range(repeats):  # interleaved: one step of each optimizer per round
        for name, stepper in steppers.items():
            start = time.perf_counter()
            stepper.step()
            rows[name]["times"].append(time.perf_counter() - start)
    for row in rows.values():
        if "times" in row:
            row["ms"] = 1e3 * statistics.median(row["times"])
    return specs, param_bytes, rows


def bench_variable_count(counts, mode, repeats, warmup):
    """Celo's step with and without its scheduler, for `counts` variables.

    The scheduler runs once per step over all variables as one batched LSTM;
    its cost should not grow with the number of variables. Variables are
    (64, 64) matrices; AdamW on the same variables is the yardstick.
    """
    rng = np.random.default_rng(1)
    factories = {
        "Celo": OPTIMIZERS["Celo"],
        "Celo, no scheduler": lambda: keras_lopt.optimizers.Celo(
            weights=CELO_THETA, total_steps=10_000, use_scheduler=False
        ),
        "AdamW": OPTIMIZERS["AdamW"],
    }
    table = {}
    for n in counts:
        params = [(0.05 * rng.standard_normal((64, 64))).astype("float32") for _ in range(n)]
        grads = [(1e-2 * rng.standard_normal((64, 64))).astype("float32") for _ in range(n)]
        specs = [(f"w{i}", (64, 64)) for i in range(n)]
        steppers = {}
        for name, factory in factories.items():
            stepper = make_stepper(factory(), make_variables(specs, params), grads, mode)
            for _ in range(warmup):
                stepper.step()
            steppers[name] = stepper
        times = {name: [] for name in steppers}
        for _ in range(repeats):
            for name, stepper in steppers.items():
                start = time.perf_counter()
                stepper.step()
                times[name].append(time.perf_counter() - start)
        table[n] = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        print(f"  {n} variables: " + ", ".join(f"{k} {v:.2f} ms" for k, v in table[n].items()),
              file=sys.stderr)
    lines = [
        "| variables | Celo ms | Celo, no scheduler ms | scheduler ms | scheduler ms / variable "
        "| AdamW ms | Celo x AdamW |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, row in table.items():
        extra = row["Celo"] - row["Celo, no scheduler"]
        lines.append(
            f"| {n} | {row['Celo']:.2f} | {row['Celo, no scheduler']:.2f} | {extra:.2f} "
            f"| {extra / n:.4f} | {row['AdamW']:.2f} | {row['Celo'] / row['AdamW']:.2f} |"
        )
    return "\n".join(lines)


def _fmt(value):
    return "" if value is None else f"{value:.2f}"


def format_step_table(rows):
    def ratio(name, ref):
        if "ms" in rows[name] and "ms" in rows.get(ref, {}):
            return rows[name]["ms"] / rows[ref]["ms"]
        return None

    lines = [
        "| optimizer | ms/step (median) | ms/step (min) | x AdamW | x Muon "
        "| state bytes / param bytes | first call (s) | XLA temp (MB) | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | FAILED: {row['error']} | | | | | | | |")
            continue
        x_adamw, x_muon = ratio(name, "AdamW"), ratio(name, "Muon")
        target = ""
        if name in TARGETS:
            ref, limit = TARGETS[name]
            value = ratio(name, ref)
            if value is not None:
                verdict = "met" if value <= limit else "MISSED"
                target = f"<= {limit:g}x {ref}: {verdict} ({value:.2f}x)"
        temp = "" if row["temp_bytes"] is None else f"{row['temp_bytes'] / 2**20:.0f}"
        lines.append(
            f"| {name} | {row['ms']:.1f} | {1e3 * min(row['times']):.1f} "
            f"| {_fmt(x_adamw)} | {_fmt(x_muon)} "
            f"| {row['state_ratio']:.2f} | {row['compile_s']:.1f} | {temp} | {target} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# End-to-end model.fit of a small byte-level Transformer LM
# --------------------------------------------------------------------------

SEQ_LEN, BATCH, D_MODEL, LAYERS, HEADS = 128, 32, 128, 2, 4


def byte_lm():
    tokens = keras.Input((SEQ_LEN,), dtype="int32")
    x = TokenAndPositionEmbedding(256, SEQ_LEN, D_MODEL)(tokens)
    for _ in range(LAYERS):
        h = keras.layers.LayerNormalization()(x)
        h = keras.layers.MultiHeadAttention(HEADS, D_MODEL // HEADS)(
            h, h, use_causal_mask=True
        )
        x = x + h
        h = keras.layers.LayerNormalization()(x)
        h = keras.layers.Dense(4 * D_MODEL, activation="gelu")(h)
        x = x + keras.layers.Dense(D_MODEL)(h)
    logits = keras.layers.Dense(256)(keras.layers.LayerNormalization()(x))
    return keras.Model(tokens, logits)


def byte_windows(n, seed):
    """`n` (input, next-byte target) windows cut from this repository's text."""
    files = sorted(ROOT.glob("keras_lopt/**/*.py")) + sorted(ROOT.glob("*.md"))
    text = b"".join(f.read_bytes() for f in files)
    data = np.frombuffer(text, dtype=np.uint8).astype("int32")
    if len(data) < 4 * (SEQ_LEN + 1):
        data = np.random.default_rng(seed).integers(0, 256, 1 << 16).astype("int32")
    starts = np.random.default_rng(seed).integers(0, len(data) - SEQ_LEN - 1, n)
    windows = np.stack([data[s : s + SEQ_LEN + 1] for s in starts])
    return windows[:, :-1], windows[:, 1:]


class StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.intervals = []

    def on_train_begin(self, logs=None):
        self.last = None

    def on_train_batch_end(self, batch, logs=None):
        if logs and "loss" in logs:
            float(logs["loss"])  # synchronise: the step really finished
        now = time.perf_counter()
        if self.last is not None:
            self.intervals.append(now - self.last)
        self.last = now


def bench_fit_lm(rounds, steps, warmup):
    keras.utils.set_random_seed(0)
    x, y = byte_windows(BATCH * max(steps, warmup), seed=0)
    runs = {}
    for name, factory in [
        ("Celo2", lambda: keras_lopt.optimizers.Celo2()),
        ("AdamW", lambda: keras.optimizers.AdamW()),
    ]:
        keras.utils.set_random_seed(0)
        model = byte_lm()
        model.compile(
            optimizer=factory(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        timer = StepTimer()
        start = time.perf_counter()
        try:
            model.fit(
                x[: BATCH * warmup], y[: BATCH * warmup], batch_size=BATCH,
                epochs=1, shuffle=False, verbose=0,
            )
        except Exception as e:
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            print(f"  fit-lm {name}: FAILED ({msg})", file=sys.stderr)
            runs[name] = {"error": msg}
            continue
        runs[name] = {
            "model": model, "timer": timer, "warmup_s": time.perf_counter() - start,
            "params": model.count_params(), "jit_compile": model.jit_compile,
        }
        print(f"  fit-lm {name}: warm ({runs[name]['warmup_s']:.1f}s)", file=sys.stderr)
    for _ in range(rounds):  # alternate the two models so load drift hits both
        for name, run in runs.items():
            if "error" in run:
                continue
            run["model"].fit(
                x[: BATCH * steps], y[: BATCH * steps], batch_size=BATCH, epochs=1,
                shuffle=False, verbose=0, callbacks=[run["timer"]],
            )
    for run in runs.values():
        if "timer" in run:
            run["ms"] = 1e3 * statistics.median(run["timer"].intervals)
            run["n"] = len(run["timer"].intervals)
    return runs


def format_fit_table(runs):
    lines = [
        "| optimizer | ms/train step (median) | x AdamW | steps timed | warm-up fit incl. compile (s) | params | jit_compile |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    ref = runs.get("AdamW", {}).get("ms")
    for name, run in runs.items():
        if "error" in run:
            lines.append(f"| {name} | FAILED: {run['error']} | | | | | |")
            continue
        ratio = f"{run['ms'] / ref:.2f}" if ref else ""
        lines.append(
            f"| {name} | {run['ms']:.1f} | {ratio} | {run['n']} | {run['warmup_s']:.1f} "
            f"| {run['params']:,} | {run['jit_compile']} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# What users run: compile + train_on_batch
# --------------------------------------------------------------------------

FIT_OPTIMIZERS = {
    "AdamW": lambda: keras.optimizers.AdamW(),
    "Muon": lambda: keras.optimizers.Muon(),
    "Celo2": lambda: keras_lopt.optimizers.Celo2(),
    "Celo2Base": lambda: keras_lopt.optimizers.Celo2Base(),
}
FIT_TARGETS = {"Celo2": ("Muon", 1.25), "Celo2Base": ("AdamW", 3.0)}


def mlp_block_model():
    return keras.Sequential([
        keras.Input((768,)),
        keras.layers.Dense(768, name="input_projection"),
        keras.layers.Dense(3072, activation="gelu", name="mlp_up"),
        keras.layers.Dense(768, name="mlp_down"),
        keras.layers.Dense(768, name="output_projection"),
    ])


def bench_fit_block(repeats, warmup, batch=8):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 768)).astype("float32")
    y = rng.standard_normal((batch, 768)).astype("float32")
    models, times, first = {}, {}, {}
    for name, factory in FIT_OPTIMIZERS.items():
        keras.utils.set_random_seed(0)
        model = mlp_block_model()
        model.compile(optimizer=factory(), loss="mse")
        start = time.perf_counter()
        model.train_on_batch(x, y)
        first[name] = time.perf_counter() - start
        for _ in range(warmup):
            model.train_on_batch(x, y)
        models[name], times[name] = model, []
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            float(model.train_on_batch(x, y))  # the loss read back: the step finished
            times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    lines = ["| optimizer | ms/step (median) | x AdamW | x Muon | target | first step (s) |",
             "|---|---:|---:|---:|---|---:|"]
    for name in FIT_OPTIMIZERS:
        target = ""
        if name in FIT_TARGETS:
            ref, limit = FIT_TARGETS[name]
            met = ms[name] / ms[ref] <= limit
            target = f"<= {limit}x {ref}: {'met' if met else 'NOT met'}"
        lines.append(f"| {name} | {ms[name]:.1f} | {ms[name] / ms['AdamW']:.2f} "
                     f"| {ms[name] / ms['Muon']:.2f} | {target} | {first[name]:.1f} |")
    return "\n".join(lines)


def _first_step_models():
    models = []
    try:
        import keras_hub
    except ImportError:
        keras_hub = None
    if keras_hub is not None:
        def gpt2():
            backbone = keras_hub.models.GPT2Backbone(
                vocabulary_size=256, num_layers=2, num_heads=2, hidden_dim=64,
                intermediate_dim=128, max_sequence_length=32)
            inputs = {"token_ids": keras.Input((None,), dtype="int32", name="token_ids"),
                      "padding_mask": keras.Input((None,), dtype="int32", name="padding_mask")}
            return keras.Model(inputs, keras.layers.Dense(256)(backbone(inputs)))

        def gpt2_data(ids):
            return {"token_ids": ids, "padding_mask": np.ones_like(ids)}

        models.append(("keras-hub GPT2Backbone (tiny)", gpt2, gpt2_data))
    models.append(("keras_lopt.models.TransformerLM (tiny)",
                   lambda: keras_lopt.models.TransformerLM(
                       256, 2, 64, mixer_config={"num_heads": 2, "key_dim": 32}),
                   lambda ids: ids))
    return models


def bench_first_step():
    ids = np.random.default_rng(0).integers(0, 256, (8, 32)).astype("int32")
    lines = ["| model | variables | " + " | ".join(f"{n} (s)" for n in FIT_OPTIMIZERS)
             + " | Celo2 target: <= 2x AdamW + 5 s |",
             "|---|---:|" + "---:|" * len(FIT_OPTIMIZERS) + "---|"]
    for title, build, data in _first_step_models():
        seconds = {}
        for name, factory in FIT_OPTIMIZERS.items():
            keras.utils.set_random_seed(0)
            model = build()
            model.compile(optimizer=factory(),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            start = time.perf_counter()
            model.train_on_batch(data(ids), ids)
            seconds[name] = time.perf_counter() - start
            count = len(model.trainable_variables)
            print(f"  first step {title} {name}: {seconds[name]:.1f}s", file=sys.stderr)
        limit = 2 * seconds["AdamW"] + 5
        met = "met" if seconds["Celo2"] <= limit else "NOT met"
        lines.append(f"| {title} | {count} | "
                     + " | ".join(f"{seconds[n]:.1f}" for n in FIT_OPTIMIZERS)
                     + f" | {limit:.1f} s: {met} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------


def code_version():
    """Where keras_lopt came from, and its git commit when that is this checkout."""
    import subprocess

    location = Path(keras_lopt.__file__).resolve().parent
    text = f"keras_lopt from {location}"
    try:
        location.relative_to(ROOT)
    except ValueError:
        return text
    try:
        git = ["git", "-C", str(ROOT)]
        commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "keras_lopt"],
                               capture_output=True, text=True, check=True).stdout.strip()
        text += f", git {commit}" + (" + uncommitted changes in keras_lopt/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return text


def main():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.optimizer_speed",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: matrices 4x smaller, 3 rounds, 1 warm-up")
    parser.add_argument("--tf-xla", action="store_true",
                        help="tensorflow: also time tf.function(jit_compile=True)")
    parser.add_argument("--fit-lm", action="store_true",
                        help="also time model.fit steps of a small Transformer LM")
    parser.add_argument("--variable-count", type=int, nargs="*", default=None,
                        help="also time Celo with and without its scheduler on N (64, 64) "
                             "variables for each N given (e.g. 10 200)")
    parser.add_argument("--only-variable-count", action="store_true",
                        help="skip the GPT-2 block table")
    parser.add_argument("--fit-block", action="store_true",
                        help="also time compile + train_on_batch on a GPT-2-small MLP block")
    parser.add_argument("--first-step", action="store_true",
                        help="also time the first train_on_batch of tiny GPT-2 / TransformerLM")
    parser.add_argument("--only-fit", action="store_true",
                        help="skip the isolated optimizer-step table")
    parser.add_argument("--fit-rounds", type=int, default=3)
    parser.add_argument("--fit-steps", type=int, default=8,
                        help="train steps per round and model (first one untimed)")
    parser.add_argument("--threads", type=int, default=None,
                        help="limit the backend to N CPU threads (steadier timings "
                             "on a loaded machine)")
    parser.add_argument("--no-save", action="store_true", help="do not write results")
    parser.add_argument("--out", default=None, help="results file (markdown, appended)")
    args = parser.parse_args()
    scale = 1
    if args.quick:
        scale, args.repeats, args.warmup = 4, 3, 1
        args.fit_rounds, args.fit_steps = 1, 4

    modes = ["default"]
    if BACKEND == "tensorflow":
        modes = ["tf.function"] + (["xla"] if args.tf_xla else [])
    mode_titles = {
        "default": {"jax": "jax.jit(stateless_apply)", "torch": "eager optimizer.apply"}.get(BACKEND, BACKEND),
        "tf.function": "tf.function(optimizer.apply, jit_compile=False)",
        "xla": "tf.function(optimizer.apply, jit_compile=True)",
    }

    load = os.getloadavg()
    header = [
        f"## {BACKEND}: {datetime.datetime.now().isoformat(timespec='seconds')}"
        + (" (QUICK smoke test, matrices 4x smaller)" if args.quick else ""),
        "",
        f"keras {keras.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, threads {THREADS or 'backend default'}, "
        f"load average at start {load[0]:.1f}; "
        f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up steps.",
        "",
        code_version() + ".",
    ]
    sections = []
    for mode in [] if (args.only_variable_count or args.only_fit) else modes:
        print(f"[{BACKEND}] optimizer step, {mode_titles[mode]} ...", file=sys.stderr)
        specs, param_bytes, rows = bench_steps(mode, scale, args.repeats, args.warmup)
        shapes = ", ".join(str(s) for _, s in specs[:4])
        sections += [
            "",
            f"### One optimizer step, {mode_titles[mode]}",
            "",
            f"Matrices {shapes} + biases: {param_bytes // 4:,} float32 parameters.",
            "",
            format_step_table(rows),
        ]
        print("\n".join(sections[-6:]) + "\n", flush=True)
    if args.variable_count:
        mode = modes[0]
        print(f"[{BACKEND}] Celo scheduler vs number of variables ...", file=sys.stderr)
        sections += [
            "",
            f"### Celo's scheduler vs the number of variables, {mode_titles[mode]}",
            "",
            bench_variable_count(args.variable_count, mode, args.repeats, args.warmup),
        ]
        print("\n".join(sections[-4:]) + "\n", flush=True)
    if args.fit_lm:
        print(f"[{BACKEND}] model.fit of the byte-level LM ...", file=sys.stderr)
        runs = bench_fit_lm(args.fit_rounds, args.fit_steps, args.warmup + 1)
        sections += [
            "",
            f"### model.fit train step: byte-level Transformer LM (d_model {D_MODEL}, "
            f"{LAYERS} layers, seq {SEQ_LEN}, batch {BATCH})",
            "",
            format_fit_table(runs),
        ]
        print("\n".join(sections[-4:]) + "\n", flush=True)
    if args.fit_block:
        print(f"[{BACKEND}] compile + train_on_batch, MLP block ...", file=sys.stderr)
        sections += [
            "",
            "### model.compile(optimizer) + train_on_batch: GPT-2-small MLP block "
            "(768 -> 3072 -> 768) between 768 x 768 input and output projections, batch 8",
            "",
            bench_fit_block(args.repeats, args.warmup),
        ]
        print("\n".join(sections[-4:]) + "\n", flush=True)
    if args.first_step:
        print(f"[{BACKEND}] first train_on_batch ...", file=sys.stderr)
        sections += [
            "",
            "### First train_on_batch (trace + compile + one step), fresh tiny models",
            "",
            bench_first_step(),
        ]
        print("\n".join(sections[-4:]) + "\n", flush=True)
    load = os.getloadavg()
    footer = ["", f"Load average at end {load[0]:.1f}.", ""]
    if not args.no_save:
        out = Path(args.out) if args.out else (
            ROOT / "benchmarks" / "results" / f"optimizer_speed_{BACKEND}.md"
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write("\n".join(header + sections + footer) + "\n")
        print(f"Appended to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
