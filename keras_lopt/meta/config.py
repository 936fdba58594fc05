"""The configuration of a meta-training run."""

import dataclasses

from keras_lopt.rules.routing import check_mode
from keras_lopt.rules.theta import RULES

# What runs recorded before these settings existed used; a resumed old run
# keeps them (`from_dict`).
LEGACY_DEFAULTS = {
    "adam_bias_correction": False, "routing": "reference", "warmup_cosine_fraction": 0.0,
    "validate_every": 0,
}


@dataclasses.dataclass
class MetaTrainConfig:
    """Hyper-parameters of a meta-training run (all recorded in checkpoints).

    Args:
        rule: `"celo2"` (orthogonalised rule on matrices, Adam branch on
            vectors), `"celo2_base"` (the rule on every tensor) or `"celo"`
            (Celo v1: MLP plus learned LSTM scheduler on every tensor).
        phase: Celo only. `1` meta-trains the MLP with no scheduler
            (`lr_mult = 1`); `2` freezes the MLP (from `init_weights`) and
            meta-trains the scheduler. Inner runs then hand their raw
            training loss and horizon to the rule.
        seed: seeds everything; equal seeds give identical runs.
        pairs_per_family: antithetic pairs per task family.
        truncation: inner steps per outer iteration.
        min_horizon, max_horizon: inner horizons are drawn log-uniformly.
        sigma: PES perturbation scale.
        outer_lr: AdamW learning rate on the meta-weights.
        outer_weight_decay: AdamW decoupled weight decay.
        inner_lr: learning rate of the learned rule in inner runs (Celo2
            rules; Celo has none: its step is `1e-3 * ... * lr_mult`).
        adam_lr_ratio: Adam-branch multiplier (rule `"celo2"` only).
        adam_bias_correction: whether the Adam branch is bias-corrected, as
            in `Celo2(adam_bias_correction=...)`.
        routing: `"deployment"` or `"reference"`, as in
            `Celo2(routing=...)`: inner runs route each task tensor with
            `keras_lopt.rules.routing.plan` on the task's Keras model.
        warmup_cosine_fraction: the share of inner runs (Celo2 rules) whose
            rate follows `keras_lopt.rules.schedule.warmup_cosine` over the
            run's horizon, as `Celo2(total_steps=horizon)` does; the others
            run at the constant `inner_lr`.
        min_scale, max_scale: range of the log-uniform reparametrisation
            scale `s` (the task optimises `L(s * w)` from `w0 / s`).
        families: names of the task families (`tasks.FAMILIES`).
        validate_every: every this many outer iterations (and at the
            start), score theta on a fixed set of inner runs
            (`PESMetaTrainer.validate`) and keep the best theta; 0 turns
            validation off.
        validation_runs: fresh inner runs per family in each validation.
        validation_horizon: their length in inner steps.
        validation_seed: seeds the validation runs, independently of
            `seed`, so runs with different seeds are scored on the same set.
        init_weights: optional path of meta-weights (`.npz` or the
            authors' `.state`) to start from instead of a random
            initialisation, e.g. to continue from shipped weights with a
            new task mix.
    """

    rule: str = "celo2"
    phase: int = 1
    seed: int = 0
    pairs_per_family: int = 8
    truncation: int = 50
    min_horizon: int = 100
    max_horizon: int = 2000
    sigma: float = 0.01
    outer_lr: float = 3e-4
    outer_beta_1: float = 0.9
    outer_beta_2: float = 0.999
    outer_epsilon: float = 1e-8
    outer_weight_decay: float = 1e-4
    inner_lr: float = 1e-3
    adam_lr_ratio: float = 20.0
    # The defaults of the optimizers, so that meta-training sees what users run.
    adam_bias_correction: bool = True
    routing: str = "deployment"
    warmup_cosine_fraction: float = 0.5
    min_scale: float = 1e-3
    max_scale: float = 1e3
    # Each family has a hidden matrix under the deployment routing (the
    # input and output layers are Adam's), so that every inner run depends
    # on theta.
    families: tuple = (
        "digits_deep_mlp",
        "mnist1d_deep_mlp",
        "teacher_deep_mlp",
        "mnist1d_conv",
        "teacher_regression_deep",
        "raw_scale_binary_deep",
    )
    init_weights: str = ""
    validate_every: int = 100
    validation_runs: int = 4
    validation_horizon: int = 1000
    validation_seed: int = 12345

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}; received {self.rule!r}.")
        if self.phase not in (1, 2):
            raise ValueError(f"phase must be 1 or 2; received {self.phase!r}.")
        if self.rule == "celo" and self.phase == 2 and not self.init_weights:
            raise ValueError(
                "Celo phase 2 trains the scheduler on a frozen phase-1 MLP: "
                "pass init_weights (the phase-1 theta.npz)."
            )
        check_mode(self.routing)
        if not 0.0 <= self.warmup_cosine_fraction <= 1.0:
            raise ValueError("warmup_cosine_fraction must be in [0, 1].")
        if self.pairs_per_family < 1 or self.truncation < 1:
            raise ValueError("pairs_per_family and truncation must be >= 1.")
        if self.validate_every < 0 or self.validation_runs < 1 or self.validation_horizon < 1:
            raise ValueError(
                "Need validate_every >= 0 (0: off), validation_runs >= 1 and "
                "validation_horizon >= 1."
            )
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError("Need 0 < min_scale <= max_scale.")
        if not 1 <= self.min_horizon <= self.max_horizon:
            raise ValueError("Need 1 <= min_horizon <= max_horizon.")

    @classmethod
    def from_dict(cls, values):
        """The config a run recorded (`dataclasses.asdict`), with settings
        added since then at the values that run used."""
        return cls(**dict(LEGACY_DEFAULTS, **values))
