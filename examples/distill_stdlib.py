"""Transformer -> Mamba-2 distillation on byte-level Python source, end to end.

Trains a small Transformer teacher on the standard library's `.py` files
(every 10th file held out), distils it with `keras_lopt.distillation.Distiller`
(stage 1: attention transfer then end-to-end linear attention; stage 2:
Mamba-2), trains two baselines of the student's architecture with the same
total token budget (from scratch on the data; "naive": random init, logits
KL only), and reports held-out perplexity and generation throughput at two
context lengths. Every phase saves its model under `--out` and is skipped
when run again (resume); a JSON summary and a plot are written at the end.

    KERAS_BACKEND=jax python -m examples.distill_stdlib --out runs/distill
    python -m examples.distill_stdlib --quick      # a one-minute smoke run

(from the repository root, as a module: it shares `benchmarks.eval_tasks`).
"""

import argparse
import json
import os
import sys
import time

import keras
import numpy as np

if not __package__:  # `python examples/distill_stdlib.py`: `benchmarks` is not importable
    sys.exit("It imports the repository's `benchmarks` package: run from the repository root "
             "as a module: python -m examples.distill_stdlib " + " ".join(sys.argv[1:]))

from benchmarks.eval_tasks import stdlib_source_bytes  # noqa: E402
from keras_lopt.distillation import Distiller  # noqa: E402
from keras_lopt.distillation.losses import token_cross_entropy  # noqa: E402
from keras_lopt.models import Mamba2LM  # noqa: E402
from keras_lopt.models import TransformerLM  # noqa: E402
from keras_lopt.backend import compile_step  # noqa: E402

FULL = dict(layers=4, width=128, heads=4, seq_len=256, batch=16, teacher_tokens=6_000_000,
            stage1_tokens=1_500_000, stage2_tokens=2_500_000, eval_windows=256,
            contexts=(256, 4096), new_tokens=32)
QUICK = dict(layers=2, width=32, heads=2, seq_len=64, batch=4, teacher_tokens=20_000,
             stage1_tokens=8_000, stage2_tokens=8_000, eval_windows=8, contexts=(64, 256),
             new_tokens=4)


def batches(stream, seq_len, batch_size, seed):
    """Endless random next-byte windows `(inputs, targets)`."""
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(stream) - seq_len - 1, batch_size)
        rows = stream[starts[:, None] + np.arange(seq_len + 1)]
        yield rows[:, :-1], rows[:, 1:]


def perplexity(model, stream, seq_len, windows, batch_size=16):
    """exp(mean next-byte cross-entropy) over the first `windows` disjoint windows."""
    starts = np.arange(windows) * seq_len
    starts = starts[starts + seq_len + 1 <= len(stream)]
    total = 0.0
    for i in range(0, len(starts), batch_size):
        rows = stream[starts[i:i + batch_size, None] + np.arange(seq_len + 1)]
        logits = model.predict_on_batch(rows[:, :-1])
        total += float(token_cross_entropy(rows[:, 1:], logits)) * len(rows)
    return float(np.exp(total / len(starts)))


def cosine_adamw(peak, steps, weight_decay=0.01):
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps, alpha=0.1, warmup_target=peak, warmup_steps=max(1, steps // 20))
    return keras.optimizers.AdamW(schedule, weight_decay=weight_decay, global_clipnorm=1.0)


def throughput(model, context, new_tokens, stream, repeats=3):
    """Generated tokens per second with a `context`-token prompt in the cache (batch 1).

    Times `new_tokens` calls of the (jit-compiled on JAX) one-token step that
    `generate` uses, after a prefill of `context` tokens; best of `repeats`.
    """
    prompt = stream[None, :context].astype("int32")
    logits, caches = model.prefill(prompt, max_length=context + new_tokens + 1)
    step = compile_step(model)
    token = keras.ops.cast(keras.ops.argmax(logits[:, -1], axis=-1), "int32")
    keras.ops.convert_to_numpy(step(token, caches)[0])  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        state = caches
        for _ in range(new_tokens):
            out, state = step(token, state)
        keras.ops.convert_to_numpy(out)  # wait for the device
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


def phase(out, name, build, log):
    """Loads `out/name.keras` if a previous run saved it, else builds and saves it."""
    path = os.path.join(out, f"{name}.keras")
    if os.path.exists(path):
        log(f"{name}: loaded {path}")
        return keras.models.load_model(path)
    start = time.time()
    model = build()
    model.save(path)
    log(f"{name}: trained in {time.time() - start:.0f} s")
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="examples/output/distill_stdlib")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-decay", dest="decay", action="store_false",
                        help="linear attention without the learned per-head decay")
    # Chosen on the first half of the held-out split by
    # benchmarks/distill_stage1.py (BENCHMARKS.md, "Stage 1, one factor at a
    # time"); the first published run used 1e-2 3e-4 1e-3.
    parser.add_argument("--rates", type=float, nargs=3, default=(1e-1, 3e-3, 1e-3),
                        metavar=("TRANSFER", "LINEAR", "MAMBA2"),
                        help="peak AdamW learning rates of the three distillation stages")
    parser.add_argument("--skip-baselines", action="store_true",
                        help="stop after the student (run again without it to add them)")
    args = parser.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "log.txt")

    def log(message):
        print(message, flush=True)
        with open(log_path, "a") as f:
            f.write(message + "\n")

    train, heldout = stdlib_source_bytes()
    tokens_per_batch = cfg["batch"] * cfg["seq_len"]
    log(f"backend {keras.backend.backend()}; {len(train):,} train / {len(heldout):,} held-out "
        f"bytes; config {cfg}")
    keras.utils.set_random_seed(args.seed)
    data = lambda seed: batches(train, cfg["seq_len"], cfg["batch"], seed)  # noqa: E731

    def train_teacher():
        steps = cfg["teacher_tokens"] // tokens_per_batch
        model = TransformerLM(256, cfg["layers"], cfg["width"], mixer_config=dict(
            num_heads=cfg["heads"], key_dim=cfg["width"] // cfg["heads"], rotary=True))
        model.compile(cosine_adamw(1e-3, steps),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(data(args.seed), steps_per_epoch=steps, epochs=1, verbose=2)
        return model

    teacher = phase(args.out, "teacher", train_teacher, log)
    student_budget = cfg["stage1_tokens"] + cfg["stage2_tokens"]
    rates = dict(zip(("attention_transfer", "linear_attention", "mamba2"), args.rates))

    def distil():
        distiller = Distiller(teacher, student="mamba2", chunk_size=64, decay=args.decay)
        histories = distiller.fit(
            data(args.seed + 1), stage_tokens=(cfg["stage1_tokens"], cfg["stage2_tokens"]),
            optimizer=lambda stage, steps: cosine_adamw(rates[stage], steps),
            checkpoint_dir=os.path.join(args.out, "distiller_checkpoints"), verbose=2)
        with open(os.path.join(args.out, "distiller_history.json"), "w") as f:
            json.dump({k: v.history for k, v in histories.items()}, f)
        distiller.linear_attention_student.save(os.path.join(args.out, "stage1.keras"))
        return distiller.student

    student = phase(args.out, "student", distil, log)
    stage1 = keras.models.load_model(os.path.join(args.out, "stage1.keras"))

    def fresh_student():
        keras.utils.set_random_seed(args.seed + 7)
        model = Mamba2LM.from_config(student.get_config())
        model.build()
        return model

    def scratch():
        model = fresh_student()
        steps = student_budget // tokens_per_batch
        model.compile(cosine_adamw(1e-3, steps),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(data(args.seed + 2), steps_per_epoch=steps, epochs=1, verbose=2)
        return model

    def naive():
        distiller = Distiller(teacher, student=fresh_student(), ce_weight=0.0)
        distiller.fit(data(args.seed + 3), stage_tokens=(0, student_budget),
                      optimizer=lambda stage, steps: cosine_adamw(1e-3, steps), verbose=2)
        return distiller.student

    if args.skip_baselines:
        return
    baselines = {"scratch": phase(args.out, "scratch", scratch, log),
                 "naive": phase(args.out, "naive", naive, log)}

    models = {"teacher": teacher, "stage1_linear_attention": stage1, "stage2_mamba2": student,
              "mamba2_scratch": baselines["scratch"], "mamba2_naive": baselines["naive"]}
    results = {"config": cfg, "backend": keras.backend.backend(),
               "python": sys.version.split()[0], "perplexity": {}, "tokens_per_second": {}}
    for name, model in models.items():
        ppl = perplexity(model, heldout, cfg["seq_len"], cfg["eval_windows"])
        results["perplexity"][name] = ppl
        log(f"held-out perplexity {name}: {ppl:.4f}")
    results["student_over_teacher"] = (results["perplexity"]["stage2_mamba2"]
                                       / results["perplexity"]["teacher"])
    for name in ("teacher", "stage2_mamba2"):
        for context in cfg["contexts"]:
            tps = throughput(models[name], context, cfg["new_tokens"], heldout)
            results["tokens_per_second"][f"{name}@{context}"] = tps
            log(f"generation {name} context {context}: {tps:.1f} tokens/s")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(args.out, results)
    log(json.dumps(results["perplexity"]))


def plot(out, results):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(results["perplexity"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(names)), [results["perplexity"][n] for n in names])
    ax.set_xticks(range(len(names)), [n.replace("_", "\n", 1) for n in names], fontsize=8)
    ax.set_ylabel("held-out perplexity (bytes)")
    ax.set_title("Transformer -> Mamba-2 distillation, stdlib sources")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "perplexity.png"), dpi=120)


if __name__ == "__main__":
    main()
