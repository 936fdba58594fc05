"""Celo2 next to AdamW: train the same model on real data with both.

An MLP classifies scikit-learn's handwritten digits (1,797 8x8 images, shipped
with scikit-learn, so no download), split 80/20 into train and validation
sets. Two copies of the model, with the same initial weights and the same
batches in the same order, are trained side by side, one with
`keras_lopt.optimizers.Celo2(total_steps=T)` (its defaults: peak rate 1e-3,
the authors' deployment routing) and one with `keras.optimizers.AdamW`, both
on the same schedule (`keras_lopt.optimizers.warmup_cosine`: 5% linear
warm-up from 0, then cosine decay to 0 at the last of the T updates).
AdamW's peak rate is `--adamw-lr` (default 1e-3, Keras's default rate).
The routing Celo2 chose is printed first. A table is printed after every
epoch, and the loss curves are saved to `<out-dir>/demo_celo2_vs_adamw.png`.

Run it on any Keras backend (`make demo` runs the first line):

    KERAS_BACKEND=jax        python examples/demo.py
    KERAS_BACKEND=tensorflow python examples/demo.py
    KERAS_BACKEND=torch      python examples/demo.py --epochs 5 --out-dir /tmp/demo

On a CPU shared with other busy jobs, `OMP_NUM_THREADS=1` keeps torch from
stalling on its thread pool (here it cut the torch run from 8 to 0.6 minutes).
"""

import argparse
import time
from pathlib import Path

import numpy as np

import keras_lopt  # installed: `pip install -e .` (`make install`)

import keras
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def make_model(seed):
    keras.utils.set_random_seed(seed)  # same initial weights for both runs
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def main():
    parser = argparse.ArgumentParser(description="Celo2 vs AdamW on the digits data set.")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adamw-lr", type=float, default=1e-3, help="AdamW's peak rate")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "output"))
    args = parser.parse_args()

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")  # pixels 0..16 -> 0..1
    y = digits.target.astype("int32")
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=args.seed
    )

    total_steps = args.epochs * -(-len(x_train) // args.batch_size)
    optimizers = {
        "Celo2": keras_lopt.optimizers.Celo2(total_steps=total_steps),
        "AdamW": keras.optimizers.AdamW(
            learning_rate=keras_lopt.optimizers.warmup_cosine(args.adamw_lr, total_steps)
        ),
    }
    models, history, seconds = {}, {}, {}
    for name, optimizer in optimizers.items():
        models[name] = make_model(args.seed)
        models[name].compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        history[name] = {"loss": [], "val_loss": [], "val_accuracy": []}
        seconds[name] = 0.0
    optimizers["Celo2"].routing_summary(models["Celo2"])

    print(
        f"backend {keras.backend.backend()}: {len(x_train)} train / {len(x_val)} "
        f"validation digits, batch {args.batch_size}, {args.epochs} epochs "
        f"({total_steps} updates, warm-up + cosine schedule)\n"
    )
    print("epoch | Celo2: train loss  val loss  val acc | AdamW: train loss  val loss  val acc")
    rng = np.random.default_rng(args.seed)
    for epoch in range(args.epochs):
        order = rng.permutation(len(x_train))  # one shuffle, shared by both
        for name, model in models.items():
            start = time.perf_counter()
            logs = model.fit(
                x_train[order], y_train[order], batch_size=args.batch_size,
                shuffle=False, validation_data=(x_val, y_val), verbose=0,
            ).history
            seconds[name] += time.perf_counter() - start
            for key in history[name]:
                history[name][key].append(logs[key][-1])
        row = " | ".join(
            f"{name}: {h['loss'][-1]:10.4f} {h['val_loss'][-1]:9.4f} {h['val_accuracy'][-1]:8.2%}"
            for name, h in history.items()
        )
        print(f"{epoch + 1:5d} | {row}", flush=True)

    print("\nfinal       train loss  val loss  val acc  time (s, incl. compile)")
    for name, h in history.items():
        print(
            f"{name:10s} {h['loss'][-1]:10.4f} {h['val_loss'][-1]:9.4f} "
            f"{h['val_accuracy'][-1]:8.2%} {seconds[name]:8.1f}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, args.epochs + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, h), color in zip(history.items(), ["tab:red", "tab:blue"]):
        ax.plot(epochs, h["loss"], color=color, label=f"{name} train")
        ax.plot(epochs, h["val_loss"], color=color, linestyle="--", label=f"{name} validation")
    ax.set(xlabel="epoch", ylabel="cross-entropy loss", yscale="log",
           title=f"Digits MLP: Celo2 vs AdamW ({keras.backend.backend()})")
    ax.legend()
    fig.tight_layout()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / "demo_celo2_vs_adamw.png", dpi=120)
    print(f"\nSaved {out_dir / 'demo_celo2_vs_adamw.png'}")


if __name__ == "__main__":
    main()
