"""Command line: `keras-lopt meta-train ...`.

Meta-training needs JAX. The package imports Keras before this module
runs, so `keras_lopt/__init__.py` sets `KERAS_BACKEND=jax` for the command
when it is unset; a different backend requested is refused here.
"""

import argparse
import os
import sys

_REQUESTED_BACKEND = os.environ.get("KERAS_BACKEND")


def _parser():
    from keras_lopt.meta.config import MetaTrainConfig

    defaults = MetaTrainConfig()
    parser = argparse.ArgumentParser(prog="keras-lopt", description="keras-lopt tools")
    sub = parser.add_subparsers(dest="command", required=True)
    mt = sub.add_parser("meta-train", help="meta-train Celo2 / Celo2-base / Celo weights with PES")
    mt.add_argument("--rule", choices=["celo2", "celo2_base", "celo"], default=defaults.rule)
    mt.add_argument("--phase", type=int, choices=[1, 2], default=defaults.phase,
                    help="celo only: 1 trains the MLP, 2 the scheduler (needs --init-weights)")
    mt.add_argument("--out", required=True, help="output directory")
    mt.add_argument("--iterations", type=int, required=True, help="outer iterations to reach")
    mt.add_argument("--seed", type=int, default=defaults.seed)
    mt.add_argument("--families", default=None,
                    help="comma-separated task families (default: "
                         + ",".join(defaults.families) + ")")
    mt.add_argument("--pairs-per-family", type=int, default=defaults.pairs_per_family)
    mt.add_argument("--truncation", type=int, default=defaults.truncation)
    mt.add_argument("--min-horizon", type=int, default=defaults.min_horizon)
    mt.add_argument("--max-horizon", type=int, default=defaults.max_horizon)
    mt.add_argument("--sigma", type=float, default=defaults.sigma)
    mt.add_argument("--outer-lr", type=float, default=defaults.outer_lr)
    mt.add_argument("--outer-weight-decay", type=float, default=defaults.outer_weight_decay)
    mt.add_argument("--routing", choices=["deployment", "reference"], default=defaults.routing,
                    help="how inner runs route task tensors, as Celo2(routing=...); "
                         "runs before this option used 'reference'")
    mt.add_argument("--adam-bias-correction", action=argparse.BooleanOptionalAction,
                    default=defaults.adam_bias_correction,
                    help="bias-corrected Adam branch, as Celo2(adam_bias_correction=...); "
                         "runs before this option used --no-adam-bias-correction")
    mt.add_argument("--warmup-cosine-fraction", type=float,
                    default=defaults.warmup_cosine_fraction,
                    help="share of inner runs on warm-up + cosine over their horizon "
                         "(the rest at a constant rate); runs before this option used 0")
    mt.add_argument("--init-weights", default="",
                    help="start from these meta-weights instead of a random init: a .npz or "
                         ".state file, a shipped version (celo2-v2, ...), or 'momentum' "
                         "(Celo2/Celo2Base: the MLP outputs the 0.9 momentum)")
    mt.add_argument("--checkpoint-every", type=int, default=100)
    mt.add_argument("--max-minutes", type=float, default=None,
                    help="checkpoint and stop after this many minutes (resume later)")
    mt.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    mt.add_argument("--quiet", action="store_true")
    return parser


def main(argv=None):
    backend = _REQUESTED_BACKEND or "jax"
    if backend != "jax":
        sys.exit(
            f"keras-lopt meta-train needs the JAX backend; KERAS_BACKEND is {backend!r}. "
            "Unset it or set KERAS_BACKEND=jax."
        )
    import keras

    if keras.backend.backend() != "jax":
        # Keras was imported before the package could choose (e.g. `main()`
        # called from a session already on another backend).
        sys.exit(
            f"keras-lopt meta-train needs the JAX backend; Keras is running on "
            f"{keras.backend.backend()!r}. Run it in a new process, or set KERAS_BACKEND=jax."
        )
    args = _parser().parse_args(argv)
    from keras_lopt.meta.config import MetaTrainConfig
    from keras_lopt.meta.train import meta_train

    config = MetaTrainConfig(
        rule=args.rule,
        phase=args.phase,
        seed=args.seed,
        pairs_per_family=args.pairs_per_family,
        truncation=args.truncation,
        min_horizon=args.min_horizon,
        max_horizon=args.max_horizon,
        sigma=args.sigma,
        outer_lr=args.outer_lr,
        outer_weight_decay=args.outer_weight_decay,
        init_weights=args.init_weights,
        routing=args.routing,
        warmup_cosine_fraction=args.warmup_cosine_fraction,
        adam_bias_correction=args.adam_bias_correction,
        **({"families": tuple(args.families.split(","))} if args.families else {}),
    )
    meta_train(
        config,
        args.out,
        args.iterations,
        checkpoint_every=args.checkpoint_every,
        resume=not args.no_resume,
        verbose=0 if args.quiet else 1,
        max_minutes=args.max_minutes,
    )
    print(f"Meta-weights written to {os.path.join(args.out, 'theta.npz')}")


if __name__ == "__main__":
    main()
