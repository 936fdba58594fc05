"""Benchmarks of keras-lopt: held-out evaluation, optimizer speed, sequence layers.

A package, run from the repository root with `python -m` (keras_lopt itself
comes from the installed package, `pip install -e .`):

* `benchmarks.evaluate`: harness v2, Celo2 (default and tuned) against
  tuned AdamW and tuned Muon (routed like Celo2) on nine held-out tasks,
  the same warm-up + cosine schedule for all, selection on validation,
  3 seeds, IQM with bootstrap intervals; tables, JSON and plots under
  `--out` (default `benchmarks/results/evaluate`).

      KERAS_BACKEND=jax python -m benchmarks.evaluate            # full run, ~31 min on 2 cores
      KERAS_BACKEND=jax python -m benchmarks.evaluate --quick    # smoke test, ~4 min
      KERAS_BACKEND=jax python -m benchmarks.evaluate --estimate # the time estimate only

* `benchmarks.eval_tasks`: the tasks `evaluate` runs (`TASKS`, `EvalTask`)
  and the pieces other scripts share (`TokenAndPositionEmbedding`,
  `stdlib_source_bytes`); a library module, not a script.
* `benchmarks.stats`: IQM, stratified bootstrap intervals, interpolated
  steps-to-reach, performance profiles (numpy only).
* `benchmarks.matrix_muon`: `MatrixMuon`, Keras Muon with Celo2's routing
  and matrix views of conv / attention kernels.
* `benchmarks.optimizer_speed`: time of one optimizer step per backend,
  optionally of `model.fit` on a small LM (`--fit-lm`).

      KERAS_BACKEND=jax python -m benchmarks.optimizer_speed --quick --fit-lm --no-save

* `benchmarks.sequence_layers`: speed and memory of the sequence layers.

      KERAS_BACKEND=jax python -m benchmarks.sequence_layers --quick

Each module's docstring has the full command lines and what the numbers mean;
`BENCHMARKS.md` has the results and the commands that produced them.
"""
