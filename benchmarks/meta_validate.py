"""Scores meta-weights on a meta-training run's fixed validation runs (JAX).

Meta-training (`keras-lopt meta-train --validate-every N`) scores its own
theta on a fixed set of inner runs; this scores any other weights on the
same set, so that a run's curve can be read against where it started and
against earlier runs' weights:

    KERAS_BACKEND=jax python -m benchmarks.meta_validate runs/meta/celo2_v7 \\
        momentum celo2-v3 runs/meta/celo2_v5/theta.npz

Prints one row per weights (mean normalised training loss over the runs,
its last 10%, and per family) and writes them as JSON with `--out`.
Besides files and shipped versions, `hand:<name>` scores hand-set Celo2
weights near the `momentum` start (`HAND_SET`), to see how much any small
move from it can gain on these runs.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")


def _passthrough(theta, group, channel, weight=1.0):
    # The two ReLU units of `momentum_theta` carry `relu(x) - relu(-x) = x`;
    # adding a channel to both adds it to the MLP's output.
    theta[f"w0__{group}"][channel, 0] += weight
    theta[f"w0__{group}"][channel, 1] -= weight
    return theta


def _adam_direction():
    from keras_lopt.rules.theta import momentum_theta

    theta = momentum_theta(0)
    theta["w0__3"][:] = 0.0
    return _passthrough(theta, 5, 0)


def _momentum(decay_index):
    from keras_lopt.rules.theta import momentum_theta

    return momentum_theta(decay_index)


# Feature groups (celo2.FEATURE_WIDTHS order): 0 the gradient, 3 the three
# momenta, 5 the momenta over sqrt(v) (Adam's direction).
HAND_SET = {
    "momentum_0.99": lambda: _momentum(1),
    "nesterov_0.5": lambda: _passthrough(_momentum(0), 0, 0, 0.5),
    "nesterov_1": lambda: _passthrough(_momentum(0), 0, 0, 1.0),
    "adam_direction": _adam_direction,
}


def _hand_set(name):
    if name not in HAND_SET:
        raise SystemExit(f"Unknown hand-set weights {name!r}; known: {sorted(HAND_SET)}.")
    return HAND_SET[name]()


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
        if name.startswith("hand:"):
            theta = _hand_set(name[len("hand:"):])
        else:
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
