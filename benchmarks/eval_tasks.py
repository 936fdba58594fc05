"""Held-out evaluation tasks for `benchmarks/evaluate.py` (harness v2).

None of these tasks is from the meta-training distribution (MLP classifiers
on sklearn digits, MNIST-1D and random-teacher Gaussian data without
noise): they change the architecture (convolutions, attention, a GRU,
Mamba-2 from `keras_lopt.models`), the data (noisy labels, Python source
bytes, augmented images) or the objective (language modelling,
reconstruction, denoising, regression). All data is offline: it ships
inside scikit-learn or the Python standard library, or is generated from a
fixed seed; nothing downloads.

Every task of the default suite (`DEFAULT_TASKS`) is built so that its
training loss cannot fall to zero by memorising the training set, which
would make "steps to reach AdamW's final training loss" meaningless:

* label noise (`tabular_noisy`: 20% of labels are random), observation
  noise (`teacher_regression`: the target is a teacher plus Gaussian noise),
  fresh noise every batch (`denoise_digits`), random augmentation
  (`cnn_digits_aug`, `vit_digits`: shifts and pixel noise drawn per batch),
  a bottleneck (`autoencoder_digits`: 8 units for 64 pixels), or a corpus
  far larger than what the run sees (the three language models: a few
  hundred thousand windows of several MB of bytes).

Every task has three splits: training data (batches drawn from it), a
fixed validation subset (evaluated every few steps; selection uses it) and
a fixed test subset of the same size (evaluated once at the end). Both are
evaluated in one batch with `test_on_batch`, so each compiles once.

`TASKS` maps a task name to a function that builds it (data is loaded only
for the tasks that are run); `mlp_breast_cancer` is kept, outside the
default suite, for the smoke test (it memorises to ~0).
"""

import dataclasses
import glob
import os
from typing import Callable

import keras
import numpy as np
from keras import ops

# Output layers are named "head" (Keras Muon's `exclude_layers`, and easy to find).
HEAD = "head"


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """A model, a loss, a deterministic stream of training batches, two fixed subsets.

    Attributes:
        name: short identifier (the `--tasks` value).
        description: one line for reports.
        build_model: returns a fresh, uncompiled Keras model; call it after
            seeding for a reproducible initialisation.
        loss: the Keras loss to compile the model with.
        batches: `batches(steps, seed)` yields `steps` `(x, y)` pairs (with
            any augmentation already applied); the same arguments give the
            same sequence.
        validation: `(x, y)`, the fixed validation subset.
        test: `(x, y)`, the fixed test subset (same size as `validation`).
        log_y: plot the loss on a log axis.
        why_not_zero: why the training loss cannot be memorised to zero.
    """

    name: str
    description: str
    build_model: Callable[[], keras.Model]
    loss: keras.losses.Loss
    batches: Callable
    validation: tuple
    test: tuple
    log_y: bool = True
    why_not_zero: str = ""

    @property
    def heldout(self):  # the v1 name of the test split
        return self.test


# --- data helpers ------------------------------------------------------------


def array_batches(x, y, batch_size, augment=None):
    """A `batches(steps, seed)` function over in-memory arrays.

    Each epoch is a fresh permutation drawn from `seed`; the remainder that
    does not fill a batch is dropped so every batch has the same shape.
    `augment(x, y, rng)` (optional) transforms each batch with the same
    generator, so augmentation is as reproducible as the order.
    """

    def batches(steps, seed):
        rng = np.random.default_rng(seed)
        per_epoch = len(x) // batch_size
        for step in range(steps):
            if step % per_epoch == 0:
                order = rng.permutation(len(x))
            b = step % per_epoch
            index = order[b * batch_size : (b + 1) * batch_size]
            xb, yb = x[index], y[index]
            if augment is not None:
                xb, yb = augment(xb, yb, rng)
            yield xb, yb

    return batches


def split(x, y, heldout_fraction=0.2, seed=0):
    """A fixed shuffled train/held-out split (v1; kept for other scripts)."""
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(round(len(x) * (1.0 - heldout_fraction)))
    train, test = order[:cut], order[cut:]
    return (x[train], y[train]), (x[test], y[test])


def split3(x, y, validation, test, seed=0):
    """Fixed shuffled (train, validation, test) splits of `validation` and
    `test` samples each, the rest for training."""
    order = np.random.default_rng(seed).permutation(len(x))
    v, t, rest = order[:validation], order[validation:validation + test], order[validation + test:]
    return (x[rest], y[rest]), (x[v], y[v]), (x[t], y[t])


def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype("float32"), data.target.astype("int32")


def shift_and_noise(max_shift=1, noise=0.15):
    """Image augmentation: a random shift of up to `max_shift` pixels in each
    direction (zero fill) and Gaussian pixel noise, per sample."""

    def augment(x, y, rng):
        n, h, w = x.shape[:3]
        pad = np.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
        dy = rng.integers(0, 2 * max_shift + 1, n)
        dx = rng.integers(0, 2 * max_shift + 1, n)
        rows = dy[:, None] + np.arange(h)[None, :]
        cols = dx[:, None] + np.arange(w)[None, :]
        out = pad[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
        out = out + noise * rng.standard_normal(out.shape).astype("float32")
        return out.astype("float32"), y

    return augment


# --- tabular -----------------------------------------------------------------


def tabular_noisy(batch_size=128):
    """MLP on sklearn `make_classification` with 20% of labels randomised.

    60k training samples: with 20k, AdamW at 1e-2 fitted the noisy labels
    (training loss 0.44 against 0.92 on validation after 1500 steps)."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=62000, n_features=32, n_informative=16,
                               n_redundant=8, n_classes=5, n_clusters_per_class=2,
                               flip_y=0.2, class_sep=1.0, random_state=0)
    train, val, test = split3(x.astype("float32"), y.astype("int32"), 1000, 1000)
    mean, std = train[0].mean(0), train[0].std(0) + 1e-6
    train, val, test = [((a - mean) / std, b) for a, b in (train, val, test)]

    def build_model():
        return keras.Sequential([
            keras.Input((32,)),
            keras.layers.Dense(256, activation="relu", name="dense_in"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(5, name=HEAD),
        ])

    return EvalTask(
        name="tabular_noisy",
        description="MLP 32-256-256-256-5 on make_classification (60k samples, flip_y=0.2)",
        build_model=build_model,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        batches=array_batches(*train, batch_size),
        validation=val, test=test, log_y=False,
        why_not_zero="20% random labels on 60k samples; a run sees each about 3 times",
    )


def teacher_regression(batch_size=128, noise=0.5):
    """MLP regression on a random tanh-MLP teacher plus Gaussian noise (60k samples)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((62000, 16)).astype("float32")
    w1 = rng.standard_normal((16, 64)) / 4.0
    w2 = rng.standard_normal((64, 1)) / 8.0
    clean = np.tanh(x @ w1) @ w2
    clean = (clean - clean.mean()) / clean.std()
    y = (clean + noise * rng.standard_normal(clean.shape)).astype("float32")
    train, val, test = split3(x, y, 1000, 1000)

    def build_model():
        return keras.Sequential([
            keras.Input((16,)),
            keras.layers.Dense(128, activation="gelu", name="dense_in"),
            keras.layers.Dense(128, activation="gelu"),
            keras.layers.Dense(1, name=HEAD),
        ])

    return EvalTask(
        name="teacher_regression",
        description=f"MLP 16-128-128-1 regressing a tanh-MLP teacher + N(0, {noise}^2) noise",
        build_model=build_model,
        loss=keras.losses.MeanSquaredError(),
        batches=array_batches(*train, batch_size),
        validation=val, test=test,
        why_not_zero=f"irreducible noise: the best possible MSE is {noise ** 2:g}",
    )


def mlp_breast_cancer(batch_size=64):
    """A 30-64-64-1 MLP on sklearn's breast-cancer data (v1 task; memorises to ~0)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = data.data.astype("float32")
    y = data.target.astype("float32")[:, None]
    train, val, test = split3(x, y, 57, 57)
    mean, std = train[0].mean(0), train[0].std(0) + 1e-6
    train, val, test = [((a - mean) / std, b) for a, b in (train, val, test)]

    def build_model():
        return keras.Sequential([
            keras.Input((x.shape[1],)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(1, name=HEAD),
        ])

    return EvalTask(
        name="mlp_breast_cancer",
        description="MLP 30-64-64-1, binary cross-entropy, sklearn breast cancer (not default)",
        build_model=build_model,
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        batches=array_batches(*train, batch_size),
        validation=val, test=test,
        why_not_zero="(it does memorise: 455 samples; kept only for the smoke test)",
    )


# --- images (sklearn digits, 1797 8x8 images) -------------------------------


def cnn_digits_aug(batch_size=64):
    """A CNN on sklearn digits with random shifts and pixel noise."""
    images, labels = _digits()
    train, val, test = split3(images[..., None], labels, 270, 270)

    def build_model():
        return keras.Sequential([
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_in"),
            keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, name=HEAD),
        ])

    return EvalTask(
        name="cnn_digits_aug",
        description="Conv2D 16-32-32 + dense on sklearn digits, random +-1 px shifts and "
                    "N(0, 0.15^2) pixel noise",
        build_model=build_model,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        batches=array_batches(*train, batch_size, augment=shift_and_noise()),
        validation=val, test=test,
        why_not_zero="fresh shifts and noise every batch; shifted 8x8 digits are ambiguous",
    )


def denoise_digits(batch_size=64, noise=0.4):
    """A conv denoiser: noisy digit in, clean digit out (MSE)."""
    images, labels = _digits()
    x = images[..., None]
    train, val, test = split3(x, x, 270, 270)
    fixed = np.random.default_rng(1)
    val = (val[0] + noise * fixed.standard_normal(val[0].shape).astype("float32"), val[1])
    test = (test[0] + noise * fixed.standard_normal(test[0].shape).astype("float32"), test[1])

    def augment(xb, yb, rng):
        return (xb + noise * rng.standard_normal(xb.shape)).astype("float32"), yb

    def build_model():
        return keras.Sequential([
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv_in"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(1, 3, padding="same", name=HEAD),
        ])

    return EvalTask(
        name="denoise_digits",
        description=f"conv denoiser (4 Conv2D) on sklearn digits + N(0, {noise}^2) noise, MSE",
        build_model=build_model,
        loss=keras.losses.MeanSquaredError(),
        batches=array_batches(*train, batch_size, augment=augment),
        validation=val, test=test,
        why_not_zero="fresh noise every batch: the clean image is not a function of the input",
    )


def autoencoder_digits(batch_size=64):
    """An MLP autoencoder with an 8-unit bottleneck on sklearn digits, MSE."""
    images, _ = _digits()
    x = images.reshape(len(images), 64)
    train, val, test = split3(x, x, 270, 270)

    def build_model():
        return keras.Sequential([
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu", name="dense_in"),
            keras.layers.Dense(8),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, name=HEAD),
        ])

    return EvalTask(
        name="autoencoder_digits",
        description="MLP autoencoder 64-128-8-128-64, MSE, sklearn digits",
        build_model=build_model,
        loss=keras.losses.MeanSquaredError(),
        batches=array_batches(*train, batch_size),
        validation=val, test=test,
        why_not_zero="an 8-unit bottleneck for 64 pixels",
    )


class PatchEmbedding(keras.layers.Layer):
    """Non-overlapping `patch x patch` patches, a linear embedding and learned positions."""

    def __init__(self, patch, dim, num_patches, **kwargs):
        super().__init__(**kwargs)
        self.patch, self.dim, self.num_patches = patch, dim, num_patches
        self.project = keras.layers.Dense(dim, name="patch_projection")
        self.position = keras.layers.Embedding(num_patches, dim, name="position_embedding")

    def call(self, images):
        p = self.patch
        h, w, c = images.shape[1:]
        x = ops.reshape(images, (-1, h // p, p, w // p, p, c))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        x = ops.reshape(x, (-1, (h // p) * (w // p), p * p * c))
        return self.project(x) + self.position(ops.arange(self.num_patches))


def vit_digits(batch_size=64, dim=64, heads=4, layers=2):
    """A small ViT (2x2 patches, 2 blocks) on augmented sklearn digits."""
    images, labels = _digits()
    train, val, test = split3(images[..., None], labels, 270, 270)

    def build_model():
        inputs = keras.Input((8, 8, 1))
        x = PatchEmbedding(2, dim, 16, name="patches")(inputs)
        for i in range(layers):
            h = keras.layers.LayerNormalization(name=f"block{i}_ln1")(x)
            h = keras.layers.MultiHeadAttention(heads, dim // heads,
                                                name=f"block{i}_attention")(h, h)
            x = x + h
            h = keras.layers.LayerNormalization(name=f"block{i}_ln2")(x)
            h = keras.layers.Dense(2 * dim, activation="gelu", name=f"block{i}_mlp_in")(h)
            x = x + keras.layers.Dense(dim, name=f"block{i}_mlp_out")(h)
        x = keras.layers.LayerNormalization(name="final_ln")(x)
        x = keras.layers.GlobalAveragePooling1D()(x)
        return keras.Model(inputs, keras.layers.Dense(10, name=HEAD)(x))

    return EvalTask(
        name="vit_digits",
        description=f"ViT ({layers} blocks, d={dim}, 16 2x2 patches) on sklearn digits, "
                    "random +-1 px shifts and N(0, 0.15^2) pixel noise",
        build_model=build_model,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        batches=array_batches(*train, batch_size, augment=shift_and_noise()),
        validation=val, test=test,
        why_not_zero="fresh shifts and noise every batch",
    )


# --- language models on the standard library's sources ----------------------


def _stdlib_paths():
    return sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))


def _stream(paths):
    chunks = []
    for path in paths:
        with open(path, "rb") as f:
            chunks.append(f.read())
    return np.frombuffer(b"\n".join(chunks), dtype=np.uint8).astype("int32")


def stdlib_source_bytes(heldout_every=10):
    """Train and held-out byte streams from the standard library's sources.

    Reads the top-level `.py` files of the directory holding the `os` module,
    sorted by name; every `heldout_every`-th file (index % n == n - 1) is
    held out. The corpus depends on the Python version, which evaluate.py
    records.
    """
    paths = _stdlib_paths()
    held = [i % heldout_every == heldout_every - 1 for i in range(len(paths))]
    return (_stream([p for p, h in zip(paths, held) if not h]),
            _stream([p for p, h in zip(paths, held) if h]))


def stdlib_splits(heldout_every=10):
    """(train, validation, test) byte streams: `stdlib_source_bytes`' training
    files, and its held-out files alternately to validation and test."""
    paths = _stdlib_paths()
    held = [p for i, p in enumerate(paths) if i % heldout_every == heldout_every - 1]
    train = [p for i, p in enumerate(paths) if i % heldout_every != heldout_every - 1]
    return _stream(train), _stream(held[0::2]), _stream(held[1::2])


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


def _fixed_windows(stream, seq_len, count, seed):
    starts = np.random.default_rng(seed).integers(0, len(stream) - seq_len - 1, count)
    return windows(stream, starts, seq_len)


def _lm_task(name, description, build_model, seq_len, batch_size, eval_windows=128):
    train, val, test = stdlib_splits()
    return EvalTask(
        name=name,
        description=description,
        build_model=build_model,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        batches=window_batches(train, seq_len, batch_size),
        validation=_fixed_windows(val, seq_len, eval_windows, 0),
        test=_fixed_windows(test, seq_len, eval_windows, 1),
        log_y=False,
        why_not_zero=f"{len(train) / 1e6:.1f} MB of training bytes; a run sees a small "
                     "fraction of its windows once",
    )


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


def transformer_stdlib(seq_len=64, dim=64, heads=4, layers=2, batch_size=16):
    """A 2-layer byte-level causal Transformer LM (functional Keras) on stdlib sources."""

    def build_model():
        ids = keras.Input((seq_len,), dtype="int32")
        x = TokenAndPositionEmbedding(256, seq_len, dim, name="embeddings")(ids)
        for i in range(layers):
            x = transformer_block(x, dim, heads, name=f"block{i}")
        x = keras.layers.LayerNormalization(name="final_ln")(x)
        return keras.Model(ids, keras.layers.Dense(256, name=HEAD)(x))

    return _lm_task("transformer_stdlib",
                    f"byte-level causal Transformer LM ({layers} layers, d={dim}, T={seq_len}) "
                    "on the stdlib's .py files", build_model, seq_len, batch_size)


def gru_stdlib(seq_len=64, dim=64, units=128, batch_size=16):
    """A byte-level GRU LM on stdlib sources."""

    def build_model():
        return keras.Sequential([
            keras.Input((seq_len,), dtype="int32"),
            keras.layers.Embedding(256, dim, name="token_embedding"),
            keras.layers.GRU(units, return_sequences=True, name="gru"),
            keras.layers.Dense(256, name=HEAD),
        ])

    return _lm_task("gru_stdlib", f"byte-level GRU LM (embedding {dim}, {units} units, "
                    f"T={seq_len}) on the stdlib's .py files", build_model, seq_len, batch_size)


def mamba2_stdlib(seq_len=64, dim=64, layers=2, batch_size=16):
    """`keras_lopt.models.Mamba2LM` (small) as a byte-level LM on stdlib sources."""
    from keras_lopt.models import Mamba2LM

    def build_model():
        model = Mamba2LM(256, num_layers=layers, hidden_dim=dim,
                         mixer_config={"d_state": 16, "head_dim": 16})
        model.build((None, seq_len))
        return model

    return _lm_task("mamba2_stdlib", f"keras_lopt.models.Mamba2LM ({layers} layers, d={dim}, "
                    f"tied embeddings, T={seq_len}) on the stdlib's .py files",
                    build_model, seq_len, batch_size)


TASKS = {
    "tabular_noisy": tabular_noisy,
    "teacher_regression": teacher_regression,
    "cnn_digits_aug": cnn_digits_aug,
    "denoise_digits": denoise_digits,
    "autoencoder_digits": autoencoder_digits,
    "vit_digits": vit_digits,
    "transformer_stdlib": transformer_stdlib,
    "gru_stdlib": gru_stdlib,
    "mamba2_stdlib": mamba2_stdlib,
    "mlp_breast_cancer": mlp_breast_cancer,
}
DEFAULT_TASKS = tuple(name for name in TASKS if name != "mlp_breast_cancer")
