"""Held-out evaluation tasks for `benchmarks/evaluate.py`.

None of these tasks is from the meta-training distribution (MLP classifiers
on sklearn digits, MNIST-1D and random-teacher Gaussian data): they change
the architecture (convolutions, attention), the data (Python source bytes,
breast-cancer measurements) or the objective (language modelling, binary
cross-entropy, reconstruction MSE). All data is offline: it ships inside
scikit-learn or the Python standard library.

Every task is an `EvalTask`; `TASKS` maps a task name to a function that
builds it (data is loaded only for the tasks that are run).
"""

import dataclasses
import glob
import os
from typing import Callable

import keras
import numpy as np
from keras import ops

# Output layers are named "head" so that Muon can exclude them, as its
# documentation recommends.
HEAD = "head"


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """A model, a loss and a deterministic stream of training batches.

    Attributes:
        name: short identifier (the `--tasks` value).
        description: one line for reports.
        build_model: returns a fresh, uncompiled Keras model; call it after
            seeding for a reproducible initialisation.
        loss: the Keras loss to compile the model with.
        batches: `batches(steps, seed)` yields `steps` `(x, y)` pairs; the same
            arguments give the same sequence.
        heldout: `(x, y)` arrays never trained on.
        log_y: plot the loss on a log axis.
    """

    name: str
    description: str
    build_model: Callable[[], keras.Model]
    loss: keras.losses.Loss
    batches: Callable
    heldout: tuple
    log_y: bool = True


def array_batches(x, y, batch_size):
    """A `batches(steps, seed)` function over in-memory arrays.

    Each epoch is a fresh permutation drawn from `seed`; the remainder that
    does not fill a batch is dropped so every batch has the same shape.
    """

    def batches(steps, seed):
        rng = np.random.default_rng(seed)
        per_epoch = len(x) // batch_size
        for step in range(steps):
            if step % per_epoch == 0:
                order = rng.permutation(len(x))
            b = step % per_epoch
            index = order[b * batch_size : (b + 1) * batch_size]
            yield x[index], y[index]

    return batches


def split(x, y, heldout_fraction=0.2, seed=0):
    """A fixed shuffled train/held-out split."""
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(round(len(x) * (1.0 - heldout_fraction)))
    train, test = order[:cut], order[cut:]
    return (x[train], y[train]), (x[test], y[test])


def cnn_digits(batch_size=64):
    """A 3-layer CNN classifying sklearn's 8x8 digits as images."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    (x_train, y_train), heldout = split(x, data.target.astype("int32"))

    def build_model():
        return keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
                keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
                keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
                keras.layers.Flatten(),
                keras.layers.Dense(10, name=HEAD),
            ]
        )

    return EvalTask(
        name="cnn_digits",
        description="Conv2D 16-32-32 + dense on sklearn digits as 8x8x1 images",
        build_model=build_model,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        batches=array_batches(x_train, y_train, batch_size),
        heldout=heldout,
    )


def mlp_breast_cancer(batch_size=64):
    """A 30-64-64-1 MLP on sklearn's Wisconsin breast-cancer data.

    Chosen over `load_wine` (178 samples, too few for 64-sample batches) and
    `load_diabetes` (a noisy regression whose loss plateaus at the noise
    level, which makes steps-to-target meaningless): it is real tabular data
    with a new input width (30) and a new loss (binary cross-entropy).
    """
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = data.data.astype("float32")
    y = data.target.astype("float32")[:, None]
    (x_train, y_train), (x_test, y_test) = split(x, y)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    def build_model():
        return keras.Sequential(
            [
                keras.Input((x.shape[1],)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(1, name=HEAD),
            ]
        )

    return EvalTask(
        name="mlp_breast_cancer",
        description="MLP 30-64-64-1, binary cross-entropy, sklearn breast cancer",
        build_model=build_model,
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        batches=array_batches(x_train, y_train, batch_size),
        heldout=(x_test, y_test),
    )


def autoencoder_digits(batch_size=64):
    """A 64-32-8-32-64 MLP autoencoder on sklearn digits, MSE loss."""
    from sklearn.datasets import load_digits

    x = (load_digits().data / 16.0).astype("float32")
    (x_train, _), (x_test, _) = split(x, x)

    def build_model():
        return keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(8),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(64, name=HEAD),
            ]
        )

    return EvalTask(
        name="autoencoder_digits",
        description="MLP autoencoder 64-32-8-32-64, MSE, sklearn digits",
        build_model=build_model,
        loss=keras.losses.MeanSquaredError(),
        batches=array_batches(x_train, x_train, batch_size),
        heldout=(x_test, x_test),
    )


def stdlib_source_bytes(heldout_every=10):
    """Train and held-out byte streams from the standard library's sources.

    Reads the top-level `.py` files of the directory holding the `os` module,
    sorted by name; every `heldout_every`-th file (index % n == n - 1) is
    held out. The corpus depends on the Python version, which evaluate.py
    records.
    """
    paths = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    streams = {"train": [], "heldout": []}
    for i, path in enumerate(paths):
        with open(path, "rb") as f:
            key = "heldout" if i % heldout_every == heldout_every - 1 else "train"
            streams[key].append(f.read())
    return tuple(
        np.frombuffer(b"\n".join(streams[k]), dtype=np.uint8).astype("int32")
        for k in ("train", "heldout")
    )


def window_batches(stream, seq_len, batch_size):
    """A `batches(steps, seed)` function of random next-byte windows."""

    def batches(steps, seed):
        rng = np.random.default_rng(seed)
        for _ in range(steps):
            starts = rng.integers(0, len(stream) - seq_len - 1, batch_size)
            yield windows(stream, starts, seq_len)

    return batches


def windows(stream, starts, seq_len):
    """Inputs `stream[s:s+T]` and next-byte targets `stream[s+1:s+T+1]`."""
    index = np.asarray(starts)[:, None] + np.arange(seq_len + 1)[None, :]
    chunk = stream[index]
    return chunk[:, :-1], chunk[:, 1:]


class TokenAndPositionEmbedding(keras.layers.Layer):
    """Sum of a learned token embedding and a learned position embedding."""

    def __init__(self, vocab_size, seq_len, dim, **kwargs):
        super().__init__(**kwargs)
        self.token = keras.layers.Embedding(vocab_size, dim, name="token_embedding")
        self.position = keras.layers.Embedding(seq_len, dim, name="position_embedding")

    def call(self, ids):
        return self.token(ids) + self.position(ops.arange(ops.shape(ids)[-1]))


def transformer_block(x, dim, heads, name):
    """Pre-LayerNorm block: causal self-attention, then a GELU MLP."""
    h = keras.layers.LayerNormalization(name=f"{name}_ln1")(x)
    h = keras.layers.MultiHeadAttention(
        heads, dim // heads, name=f"{name}_attention"
    )(h, h, use_causal_mask=True)
    x = x + h
    h = keras.layers.LayerNormalization(name=f"{name}_ln2")(x)
    h = keras.layers.Dense(4 * dim, activation="gelu", name=f"{name}_mlp_in")(h)
    return x + keras.layers.Dense(dim, name=f"{name}_mlp_out")(h)


def transformer_stdlib(seq_len=64, dim=64, heads=4, layers=2, batch_size=32,
                       heldout_windows=256):
    """A 2-layer byte-level causal Transformer LM on stdlib Python sources."""
    train, heldout = stdlib_source_bytes()
    starts = np.random.default_rng(0).integers(
        0, len(heldout) - seq_len - 1, heldout_windows
    )
    heldout = windows(heldout, starts, seq_len)

    def build_model():
        ids = keras.Input((seq_len,), dtype="int32")
        x = TokenAndPositionEmbedding(256, seq_len, dim, name="embeddings")(ids)
        for i in range(layers):
            x = transformer_block(x, dim, heads, name=f"block{i}")
        x = keras.layers.LayerNormalization(name="final_ln")(x)
        return keras.Model(ids, keras.layers.Dense(256, name=HEAD)(x))

    return EvalTask(
        name="transformer_stdlib",
        description=(
            f"byte-level causal Transformer LM ({layers} layers, d={dim}, "
            f"T={seq_len}) on the stdlib's .py files"
        ),
        build_model=build_model,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        batches=window_batches(train, seq_len, batch_size),
        heldout=heldout,
        log_y=False,
    )


TASKS = {
    "cnn_digits": cnn_digits,
    "transformer_stdlib": transformer_stdlib,
    "mlp_breast_cancer": mlp_breast_cancer,
    "autoencoder_digits": autoencoder_digits,
}
