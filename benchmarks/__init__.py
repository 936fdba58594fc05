"""Benchmarks of keras-lopt: held-out evaluation, optimizer speed, sequence layers.

A package, run from the repository root with `python -m` (keras_lopt itself
comes from the installed package, `pip install -e .`):

* `benchmarks.evaluate`: Celo2 / Celo2Base / Celo against tuned AdamW and
  Muon on held-out tasks; tables, JSON and plots under `--out`
  (default `benchmarks/results`).

      KERAS_BACKEND=jax python -m benchmarks.evaluate            # full run
      KERAS_BACKEND=torch python -m benchmarks.evaluate --quick  # smoke test

* `benchmarks.eval_tasks`: the tasks `evaluate` runs (`TASKS`, `EvalTask`)
  and the pieces other scripts share (`TokenAndPositionEmbedding`,
  `stdlib_source_bytes`); a library module, not a script.
* `benchmarks.optimizer_speed`: time of one optimizer step per backend,
  optionally of `model.fit` on a small LM (`--fit-lm`).

      KERAS_BACKEND=jax python -m benchmarks.optimizer_speed --quick --fit-lm --no-save

* `benchmarks.sequence_layers`: speed and memory of the sequence layers.

      KERAS_BACKEND=jax python -m benchmarks.sequence_layers --quick

Each module's docstring has the full command lines and what the numbers mean;
`BENCHMARKS.md` has the results and the commands that produced them.
"""
