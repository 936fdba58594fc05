"""Stage 1 of the distillation recipe, one factor at a time (issue 16, item 4).

Stage 1 (attention transfer, then end-to-end linear attention) leaves the
linear-attention model of `examples/distill_stdlib.py` at ~1.34x the
teacher's perplexity, where the paper's Hedgehog stage is 1.07x. This trains
the same teacher once (the example's configuration and data), then stage 1
alone under variants that each change one thing against the default recipe:
the token budget, the split between attention transfer and end-to-end
training, each phase's learning rate, the attention-transfer loss, the
feature map and the decay. The held-out split is cut in two halves:
validation (its first half, to choose by) and test (its second half, to
report), each scored whole. Every variant is saved in `results.json` as it finishes; running
again skips those done.

    KERAS_BACKEND=torch taskset -c 1 python -m benchmarks.distill_stage1 \\
        --out runs/distill/stage1_study [--only default tokens_x2 ...]

`--score DIR ...` instead scores whole `examples/distill_stdlib.py` runs
made on this teacher (their `stage1.keras` and `student.keras`) on the same
halves, to see what a better stage 1 does to the Mamba-2 student.
"""

import argparse
import json
import os
import sys
import time

import keras

from benchmarks.eval_tasks import stdlib_source_bytes
from examples.distill_stdlib import FULL
from examples.distill_stdlib import batches
from examples.distill_stdlib import cosine_adamw
from examples.distill_stdlib import perplexity
from keras_lopt.distillation import Distiller
from keras_lopt.models import TransformerLM

DEFAULT = dict(tokens=FULL["stage1_tokens"], fraction=0.5, transfer_lr=1e-2, linear_lr=3e-4,
               attention_loss="mse", feature_map="hedgehog", decay=True)
# Each changes one setting of DEFAULT.
VARIANTS = {
    "default": {},
    "transfer_only": dict(fraction=1.0),
    "end_to_end_only": dict(fraction=0.0),
    "linear_lr_1e-3": dict(linear_lr=1e-3),
    "linear_lr_1e-4": dict(linear_lr=1e-4),
    "linear_lr_3e-3": dict(linear_lr=3e-3),
    "linear_lr_1e-2": dict(linear_lr=1e-2),
    "transfer_lr_3e-3": dict(transfer_lr=3e-3),
    "transfer_lr_3e-2": dict(transfer_lr=3e-2),
    "transfer_lr_1e-1": dict(transfer_lr=1e-1),
    "transfer_lr_3e-1": dict(transfer_lr=3e-1),
    "cosine_loss": dict(attention_loss="cosine"),
    "elu_feature_map": dict(feature_map="elu"),
    "tokens_x2": dict(tokens=2 * FULL["stage1_tokens"]),
    "tokens_x4": dict(tokens=4 * FULL["stage1_tokens"]),
    # The budget again, at a better end-to-end rate than the default's.
    "tokens_x4_linear_lr_3e-3": dict(tokens=4 * FULL["stage1_tokens"], linear_lr=3e-3),
}


def train_teacher(train, cfg, seed):
    tokens_per_batch = cfg["batch"] * cfg["seq_len"]
    steps = cfg["teacher_tokens"] // tokens_per_batch
    model = TransformerLM(256, cfg["layers"], cfg["width"], mixer_config=dict(
        num_heads=cfg["heads"], key_dim=cfg["width"] // cfg["heads"], rotary=True))
    model.compile(cosine_adamw(1e-3, steps),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(batches(train, cfg["seq_len"], cfg["batch"], seed), steps_per_epoch=steps,
              epochs=1, verbose=2)
    return model


def run_variant(teacher, train, cfg, settings, seed):
    distiller = Distiller(teacher, student="linear_attention",
                          feature_map=settings["feature_map"],
                          attention_loss=settings["attention_loss"], decay=settings["decay"],
                          chunk_size=64)
    rates = {"attention_transfer": settings["transfer_lr"],
             "linear_attention": settings["linear_lr"]}
    histories = distiller.fit(
        batches(train, cfg["seq_len"], cfg["batch"], seed + 1),
        stage_tokens=(settings["tokens"], 0), attention_transfer_fraction=settings["fraction"],
        optimizer=lambda stage, steps: cosine_adamw(rates[stage], steps), verbose=2)
    last = {stage: {k: float(v[-1]) for k, v in h.history.items()}
            for stage, h in histories.items()}
    return distiller.linear_attention_student, last


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/distill/stage1_study")
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS),
                        help="run these variants (default: all, in the listed order)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score", nargs="+", metavar="DIR",
                        help="score these distill_stdlib runs' stage1.keras and student.keras")
    args = parser.parse_args(argv)
    cfg = dict(FULL)
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    results = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    train, heldout = stdlib_source_bytes()
    half = len(heldout) // 2
    splits = {"validation": heldout[:half], "test": heldout[half:]}

    def score(model):
        return {name: perplexity(model, stream, cfg["seq_len"], len(stream) // cfg["seq_len"])
                for name, stream in splits.items()}

    def save():
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)

    keras.utils.set_random_seed(args.seed)
    teacher_path = os.path.join(args.out, "teacher.keras")
    if os.path.exists(teacher_path):
        teacher = keras.models.load_model(teacher_path)
    else:
        start = time.time()
        teacher = train_teacher(train, cfg, args.seed)
        teacher.save(teacher_path)
        results["teacher"] = {"train_s": round(time.time() - start, 1)}
    if "perplexity" not in results.get("teacher", {}):
        results.setdefault("teacher", {})["perplexity"] = score(teacher)
        save()
    results["meta"] = {"backend": keras.backend.backend(), "python": sys.version.split()[0],
                       "held_out_bytes": {k: len(v) for k, v in splits.items()},
                       "config": cfg, "default": DEFAULT, "seed": args.seed}
    save()
    teacher_ppl = results["teacher"]["perplexity"]
    print(f"teacher: perplexity {teacher_ppl}", flush=True)
    if args.score:
        for run in args.score:
            entry = {}
            for name in ("stage1", "student"):
                ppl = score(keras.models.load_model(os.path.join(run, f"{name}.keras")))
                entry[name] = {"perplexity": ppl,
                               "over_teacher": {k: ppl[k] / teacher_ppl[k] for k in ppl}}
                print(f"{run} {name}: validation {ppl['validation']:.4f} "
                      f"({entry[name]['over_teacher']['validation']:.3f}x), test "
                      f"{ppl['test']:.4f} ({entry[name]['over_teacher']['test']:.3f}x)",
                      flush=True)
            results.setdefault("recipes", {})[os.path.normpath(run)] = entry
            save()
        return
    for name in args.only or list(VARIANTS):
        if name in results.get("variants", {}):
            continue
        settings = dict(DEFAULT, **VARIANTS[name])
        keras.utils.set_random_seed(args.seed)
        start = time.time()
        model, last = run_variant(teacher, train, cfg, settings, args.seed)
        ppl = score(model)
        ratio = {k: ppl[k] / teacher_ppl[k] for k in ppl}
        results.setdefault("variants", {})[name] = {
            "settings": settings, "perplexity": ppl, "over_teacher": ratio,
            "final_losses": last, "train_s": round(time.time() - start, 1)}
        save()
        print(f"{name}: validation {ppl['validation']:.4f} ({ratio['validation']:.3f}x), "
              f"test {ppl['test']:.4f} ({ratio['test']:.3f}x) in {time.time() - start:.0f} s",
              flush=True)
    rows = sorted(results.get("variants", {}).items(),
                  key=lambda kv: kv[1]["perplexity"]["validation"])
    print("\n| variant | validation ppl | / teacher | test ppl | / teacher |\n|---|---:|---:|---:|---:|")
    for name, r in rows:
        p, o = r["perplexity"], r["over_teacher"]
        print(f"| {name} | {p['validation']:.3f} | {o['validation']:.3f} | {p['test']:.3f} | "
              f"{o['test']:.3f} |")


if __name__ == "__main__":
    main()
