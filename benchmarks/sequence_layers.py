"""Speed and memory of the sequence layers, side by side in one process.

    KERAS_BACKEND=jax python benchmarks/sequence_layers.py            # everything
    KERAS_BACKEND=torch python benchmarks/sequence_layers.py --only attention scan
    python benchmarks/sequence_layers.py --quick                      # small sizes, smoke test

Sections (`--only`):
- `attention`: `LinearAttention` (chunked) vs softmax attention
  (`keras.ops.dot_product_attention`, same projections), forward + backward,
  d_model 256, 4 heads, batch 1, L = 512, 2048, 8192.
- `scan`: Mamba-1's selective scan and Mamba-2's SSD, chunked vs the same
  recurrence as a time-step `keras.ops.scan`, forward + backward, L = 2048,
  d_model 256 (d_inner 512; Mamba-1 d_state 16; Mamba-2 8 heads of 64, d_state 64).
- `generate`: time per new token at context 256 vs 8192 for small LMs
  (2 blocks, width 256) with each mixer; jitted step on JAX, eager elsewhere.
- `memory` (JAX only): XLA's temporary buffer size for Mamba-1 forward +
  backward at L = 8192, chunked vs sequential, vs the size of the full
  `(batch, L, d_inner, d_state)` tensor the chunked form avoids.

Prints a Markdown table per section and writes them to `--out`.
"""

import argparse
import json
import os
import statistics
import time

import keras
import numpy as np
from keras import ops

BACKEND = keras.backend.backend()


def _timeit(fn, repeats, warmup=1):
    for _ in range(warmup):
        _block(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _block(x):
    if BACKEND == "jax":
        import jax

        jax.block_until_ready(x)
    return x


def _grad_fn(fn, args):
    """A compiled function returning d(sum fn(*args))/d(args) on this backend."""
    if BACKEND == "jax":
        import jax

        loss = lambda *a: ops.sum(fn(*a))  # noqa: E731
        g = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
        return lambda: g(*args)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=False)
        def g(*a):
            with tf.GradientTape() as tape:
                tape.watch(a)
                out = tf.reduce_sum(fn(*a))
            return tape.gradient(out, a)

        targs = [tf.convert_to_tensor(a) for a in args]
        return lambda: g(*targs)
    import torch

    targs = [torch.tensor(np.asarray(a), requires_grad=True) for a in args]

    def g():
        for a in targs:
            a.grad = None
        fn(*targs).sum().backward()
        return [a.grad for a in targs]

    return g


def _layer_grad_fn(layer, x):
    """Forward + backward of a layer w.r.t. its input and weights."""
    layer(x[:, :8])  # build
    weights = [v.value for v in layer.trainable_variables]

    def fn(x, *w):
        with keras.StatelessScope(
            state_mapping=list(zip(layer.trainable_variables, w))
        ):
            return layer(x)

    return _grad_fn(fn, [x] + [ops.convert_to_numpy(w) for w in weights])


def bench_attention(lengths, repeats):
    from keras_lopt.layers import LinearAttention
    from keras_lopt.layers.attention import CausalSelfAttention

    rows = []
    for length in lengths:
        x = np.random.default_rng(0).standard_normal((1, length, 256)).astype("float32")
        la = LinearAttention(num_heads=4, key_dim=64, feature_map="hedgehog", chunk_size=64)
        sm = CausalSelfAttention(num_heads=4, key_dim=64)
        t_la = _timeit(_layer_grad_fn(la, x), repeats)
        t_sm = _timeit(_layer_grad_fn(sm, x), repeats)
        rows.append({"L": length, "linear_attention_ms": 1e3 * t_la,
                     "softmax_ms": 1e3 * t_sm, "speedup": t_sm / t_la})
        print(rows[-1], flush=True)
    return rows


def bench_scan(length, repeats, chunk_size=64):
    from keras_lopt.ops.linear_attention import chunk_linear_attention
    from keras_lopt.ops.linear_attention import recurrent_linear_attention
    from keras_lopt.ops.selective_scan import chunk_selective_scan
    from keras_lopt.ops.selective_scan import sequential_selective_scan

    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype("float32")  # noqa: E731
    d_inner, n1 = 512, 16
    x, b, c = f32(1, length, d_inner), f32(1, length, n1), f32(1, length, n1)
    delta = rng.uniform(1e-3, 0.1, (1, length, d_inner)).astype("float32")
    a = -np.tile(np.arange(1, n1 + 1, dtype="float32"), (d_inner, 1))
    rows = []
    sequential = _grad_fn(lambda *t: sequential_selective_scan(*t, a, b, c)[0], [x, delta])
    t_s = _timeit(sequential, max(1, repeats // 2))
    for within in ("associative", "sequential"):
        chunked = _grad_fn(
            lambda *t, w=within: chunk_selective_scan(
                *t, a, b, c, chunk_size=chunk_size, within_chunk=w)[0],
            [x, delta],
        )
        t_c = _timeit(chunked, repeats)
        rows.append({"kernel": f"mamba (selective scan), {within} within chunks", "L": length,
                     "chunked_ms": 1e3 * t_c, "sequential_ms": 1e3 * t_s, "speedup": t_s / t_c})
        print(rows[-1], flush=True)

    heads, head_dim, n2 = 8, 64, 64
    q, k = f32(1, length, heads, n2), f32(1, length, heads, n2)
    v = f32(1, length, heads, head_dim)
    log_a = -rng.uniform(1e-3, 0.1, (1, length, heads)).astype("float32")

    def ssd_sequential(q, k, v, log_a):
        def body(state, inputs):
            out, state = recurrent_linear_attention(*inputs[:3], inputs[3], state)
            return state, out

        state = ops.zeros((1, heads, n2, head_dim))
        xs = tuple(ops.moveaxis(t, 1, 0) for t in (q, k, v, log_a))
        return ops.scan(body, state, xs)[1]

    chunked = _grad_fn(
        lambda *t: chunk_linear_attention(*t, chunk_size=chunk_size)[0], [q, k, v, log_a]
    )
    sequential = _grad_fn(ssd_sequential, [q, k, v, log_a])
    t_c, t_s = _timeit(chunked, repeats), _timeit(sequential, max(1, repeats // 2))
    rows.append({"kernel": "mamba2 (SSD)", "L": length, "chunked_ms": 1e3 * t_c,
                 "sequential_ms": 1e3 * t_s, "speedup": t_s / t_c})
    print(rows[-1], flush=True)
    return rows


def bench_generate(contexts, new_tokens):
    from keras_lopt.models import LinearAttentionLM
    from keras_lopt.models import Mamba2LM
    from keras_lopt.models import MambaLM
    from keras_lopt.models import TransformerLM
    from keras_lopt.backend import compile_step

    makers = {
        "transformer (KV cache)": lambda: TransformerLM(
            256, 2, 256, mixer_config={"num_heads": 4, "key_dim": 64, "rotary": True}),
        "linear_attention": lambda: LinearAttentionLM(
            256, 2, 256, mixer_config={"num_heads": 4, "key_dim": 64, "feature_map": "hedgehog"}),
        "mamba": lambda: MambaLM(256, 2, 256),
        "mamba2": lambda: Mamba2LM(256, 2, 256, mixer_config={"d_state": 64, "head_dim": 64}),
    }
    rows = []
    for name, make in makers.items():
        keras.utils.set_random_seed(0)
        model = make()
        step = compile_step(model)
        row = {"model": name}
        for context in contexts:
            prompt = np.random.default_rng(0).integers(0, 256, (1, context)).astype("int32")
            logits, caches = model.prefill(prompt, max_length=context + new_tokens + 1)
            token = ops.cast(ops.argmax(logits[:, -1], axis=-1), "int32")
            _block(step(token, caches))  # compile
            start = time.perf_counter()
            for _ in range(new_tokens):
                logits, caches = step(token, caches)
            _block(logits)
            row[f"ms_per_token@{context}"] = 1e3 * (time.perf_counter() - start) / new_tokens
        row["ratio"] = row[f"ms_per_token@{contexts[-1]}"] / row[f"ms_per_token@{contexts[0]}"]
        rows.append(row)
        print(row, flush=True)
    return rows


def bench_memory(length, chunk_size=64):
    if BACKEND != "jax":
        print("memory: JAX only (uses XLA's compiled memory analysis); skipped")
        return []
    import jax

    from keras_lopt.ops.selective_scan import chunk_selective_scan
    from keras_lopt.ops.selective_scan import sequential_selective_scan

    d_inner, n = 512, 16
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, length, d_inner)).astype("float32")
    delta = np.full((1, length, d_inner), 0.01, "float32")
    b = c = rng.standard_normal((1, length, n)).astype("float32")
    a = -np.ones((d_inner, n), "float32")

    def temp_bytes(fn):
        loss = lambda x, d: ops.sum(fn(x, d))  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, delta).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    chunked = {
        w: temp_bytes(lambda x, d, w=w: chunk_selective_scan(
            x, d, a, b, c, chunk_size=chunk_size, within_chunk=w)[0])
        for w in ("associative", "sequential")
    }
    sequential = temp_bytes(lambda x, d: sequential_selective_scan(x, d, a, b, c)[0])
    full = length * d_inner * n * 4
    row = {"L": length, "chunked_associative_MiB": chunked["associative"] / 2**20,
           "chunked_sequential_MiB": chunked["sequential"] / 2**20,
           "time_step_scan_MiB": sequential / 2**20,
           "one_full_(B,L,D,N)_tensor_MiB": full / 2**20}
    print(row, flush=True)
    return [row]


def _markdown(rows):
    if not rows:
        return ""
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=["attention", "scan", "generate", "memory"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args()
    quick = args.quick
    results = {}
    if "attention" in args.only:
        results["attention"] = bench_attention([64, 128] if quick else [512, 2048, 8192],
                                               args.repeats)
    if "scan" in args.only:
        results["scan"] = bench_scan(128 if quick else 2048, args.repeats)
    if "generate" in args.only:
        results["generate"] = bench_generate([16, 64] if quick else [256, 8192],
                                             4 if quick else 32)
    if "memory" in args.only:
        results["memory"] = bench_memory(256 if quick else 8192)
    os.makedirs(args.out, exist_ok=True)
    tag = f"sequence_layers_{BACKEND}" + ("_quick" if quick else "")
    with open(os.path.join(args.out, tag + ".json"), "w") as f:
        json.dump(results, f, indent=1)
    report = "\n\n".join(f"### {k} ({BACKEND})\n\n{_markdown(v)}" for k, v in results.items())
    with open(os.path.join(args.out, tag + ".md"), "w") as f:
        f.write(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
