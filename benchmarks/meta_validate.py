"""Scores meta-weights on a meta-training run's fixed validation runs (JAX).

Meta-training (`keras-lopt meta-train --validate-every N`) scores its own
theta on a fixed set of inner runs; this scores any other weights on the
same set, so that a run's curve can be read against where it started and
against earlier runs' weights:

    KERAS_BACKEND=jax python -m benchmarks.meta_validate runs/meta/celo2_v7 \\
        momentum celo2-v3 runs/meta/celo2_v5/theta.npz

Prints one row per weights (mean normalised training loss over the runs,
its last 10%, and per family) and writes them as JSON with `--out`.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="meta-training run directory (its checkpoint.npz, or the "
                                    "provenance in its theta.npz, gives the config)")
    parser.add_argument("weights", nargs="+",
                        help="weights to score: .npz paths, shipped versions, 'momentum'")
    parser.add_argument("--out", help="write the scores here as JSON")
    args = parser.parse_args(argv)

    import numpy as np

    from keras_lopt.meta.config import MetaTrainConfig
    from keras_lopt.meta.pes import PESMetaTrainer
    from keras_lopt.rules import theta as theta_lib

    checkpoint = os.path.join(args.run, "checkpoint.npz")
    if os.path.exists(checkpoint):
        with np.load(checkpoint, allow_pickle=False) as archive:
            config = MetaTrainConfig.from_dict(json.loads(str(archive["config"])))
    else:
        # Checkpoints stay out of git; the tracked weights record the config.
        record = theta_lib.provenance(os.path.join(args.run, "theta.npz"))
        config = MetaTrainConfig.from_dict(record["config"])
    if not config.validate_every:
        sys.exit(f"{args.run} was run without validation (validate_every=0).")
    trainer = PESMetaTrainer(config)
    scores = {}
    for name in args.weights:
        theta = theta_lib.load(config.rule, name, what="weights")
        scores[name] = trainer.validate({k: theta[k] for k in trainer.theta0})
        s = scores[name]
        per_family = " ".join(
            f"{f.name}={s['val_' + f.name]:.4f}/{s['final_' + f.name]:.4f}"
            for f in trainer.families
        )
        print(f"{name}: val_loss {s['val_loss']:.4f}  val_final {s['val_final']:.4f}  "
              f"({per_family})", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(scores, f, indent=1)


if __name__ == "__main__":
    main()
