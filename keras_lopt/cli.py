"""Command line: `keras-lopt meta-train ...`, `keras-lopt --version`.

Running meta-training needs JAX (the `meta` extra); `--help` and
`--version` work on any backend. The package imports Keras before this
module runs, so `keras_lopt/__init__.py` sets `KERAS_BACKEND=jax` for the
command when it is unset; a different backend requested is refused when
meta-training starts, not while parsing.
"""

import argparse
import os
import sys

_REQUESTED_BACKEND = os.environ.get("KERAS_BACKEND")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # Shows "(default: ...)" except for required options and flags.
    def _get_help_string(self, action):
        if action.required or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _parser():
    from keras_lopt.meta.config import MetaTrainConfig

    defaults = MetaTrainConfig()
    from keras_lopt import __version__

    parser = argparse.ArgumentParser(prog="keras-lopt", description="keras-lopt tools")
    parser.add_argument("--version", action="version", version=f"keras-lopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # Every default is shown in --help (%(default)s), so a reader of a
    # recipe knows what an omitted flag meant.
    mt = sub.add_parser(
        "meta-train", help="meta-train Celo2 / Celo2-base / Celo weights with PES (needs JAX)",
        description="Meta-train learned-optimizer weights with PES on the JAX backend.",
        formatter_class=_DefaultsFormatter,
    )
    mt.add_argument("--rule", choices=["celo2", "celo2_base", "celo"], default=defaults.rule,
                    help="which learned rule to meta-train")
    mt.add_argument("--phase", type=int, choices=[1, 2], default=defaults.phase,
                    help="celo only: 1 trains the MLP, 2 the scheduler (needs --init-weights)")
    mt.add_argument("--out", required=True, help="output directory")
    mt.add_argument("--iterations", type=int, required=True, help="outer iterations to reach")
    mt.add_argument("--seed", type=int, default=defaults.seed,
                    help="seeds everything; equal seeds give identical runs")
    mt.add_argument("--families", default=",".join(defaults.families),
                    help="comma-separated task families")
    mt.add_argument("--pairs-per-family", type=int, default=defaults.pairs_per_family,
                    help="antithetic PES pairs per task family and outer iteration")
    mt.add_argument("--truncation", type=int, default=defaults.truncation,
                    help="inner steps per outer iteration")
    mt.add_argument("--min-horizon", type=int, default=defaults.min_horizon,
                    help="shortest inner run (horizons are log-uniform)")
    mt.add_argument("--max-horizon", type=int, default=defaults.max_horizon,
                    help="longest inner run")
    mt.add_argument("--sigma", type=float, default=defaults.sigma,
                    help="PES perturbation scale")
    mt.add_argument("--outer-lr", type=float, default=defaults.outer_lr,
                    help="AdamW learning rate on the meta-weights")
    mt.add_argument("--outer-weight-decay", type=float, default=defaults.outer_weight_decay,
                    help="AdamW weight decay on the meta-weights")
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
    mt.add_argument("--min-scale", type=float, default=defaults.min_scale,
                    help="smallest reparametrisation scale s (tasks optimise L(s*w) from w0/s; "
                         "log-uniform)")
    mt.add_argument("--max-scale", type=float, default=defaults.max_scale,
                    help="largest reparametrisation scale s")
    mt.add_argument("--validate-every", type=int, default=defaults.validate_every,
                    help="score theta on fixed validation runs every this many iterations and "
                         "keep the best as theta_best.npz (0: off)")
    mt.add_argument("--validation-runs", type=int, default=defaults.validation_runs,
                    help="fresh validation runs per family")
    mt.add_argument("--validation-horizon", type=int, default=defaults.validation_horizon,
                    help="inner steps of each validation run")
    mt.add_argument("--init-weights", default="random",
                    help="start from these meta-weights instead of a random init: a .npz or "
                         ".state file, a shipped version (celo2-v2, ...), or 'momentum' "
                         "(Celo2/Celo2Base: the MLP outputs the 0.9 momentum)")
    mt.add_argument("--checkpoint-every", type=int, default=100,
                    help="checkpoint period in outer iterations")
    mt.add_argument("--max-minutes", type=float, default=None,
                    help="checkpoint and stop after this many minutes (resume later)")
    mt.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    mt.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _require(module, extra):
    try:
        __import__(module)
    except ImportError:
        sys.exit(
            f"keras-lopt meta-train needs {module!r}, which is not installed: "
            f'pip install "keras-lopt[{extra}]"'
        )


def main(argv=None):
    args = _parser().parse_args(argv)
    backend = _REQUESTED_BACKEND or "jax"
    if backend != "jax":
        sys.exit(
            f"keras-lopt meta-train needs the JAX backend; KERAS_BACKEND is {backend!r}. "
            "Unset it or set KERAS_BACKEND=jax."
        )
    _require("jax", "jax")
    import keras

    if keras.backend.backend() != "jax":
        # Keras was imported before the package could choose (e.g. `main()`
        # called from a session already on another backend).
        sys.exit(
            f"keras-lopt meta-train needs the JAX backend; Keras is running on "
            f"{keras.backend.backend()!r}. Run it in a new process, or set KERAS_BACKEND=jax."
        )
    for module in ("jax", "sklearn", "mnist1d", "tqdm", "matplotlib"):
        _require(module, "meta")
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
        init_weights="" if args.init_weights == "random" else args.init_weights,
        routing=args.routing,
        warmup_cosine_fraction=args.warmup_cosine_fraction,
        adam_bias_correction=args.adam_bias_correction,
        families=tuple(f for f in args.families.split(",") if f),
        min_scale=args.min_scale,
        max_scale=args.max_scale,
        validate_every=args.validate_every,
        validation_runs=args.validation_runs,
        validation_horizon=args.validation_horizon,
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
