"""Settings of :class:`~hf_moe_routing.training.adak.trainer.AdaKTrainer` and the state of a run.

:class:`AdaKTrainingConfig` is a strict JSON dataclass (``JSONConfig``): types and ranges are checked
at construction and at JSON load (NaN and infinity refused), names follow transformers'
``TrainingArguments`` where a concept is shared, and every field carries the help text the command
line shows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ...core.config import JSONConfig, check_choice, check_range
from ...methods.adak.ppo import ADVANTAGE_NORMALIZATIONS
from ...methods.adak.warmup import WARMUP_METHODS

MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
#: How the advantage of a sampled expert count is measured (see ``training/adak/rollout.py``).
BASELINES = ("counterfactual", "topk", "leave-one-out")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - the CLI reads metadata["help"]
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class AdaKTrainingConfig(JSONConfig):
    """Hyper-parameters of the Ada-K trainer (JSON-serialisable; stored in every checkpoint).

    Defaults are ours (chosen by measurement on the reference models, see the README's Ada-K section): an exact
    Skip-Warm start from dynamic skipping calibrated to the budget, a per-layer counterfactual baseline,
    and lambda adapted to ``target_experts`` by dual ascent when a budget is given. The paper's settings
    (Yue et al. 2025): ``warmup="p-warm"``, ``baseline="topk"``, ``k_penalty=3e-3`` by hand,
    ``learning_rate=1e-3``, ``weight_decay=0.1``, ``ppo_epochs=2``, with ``AdaKConfig.paper()``.

    Raises TypeError / ValueError at construction (and at JSON load) for a wrong type, a value out of
    range, NaN or infinity, or an unknown choice.
    """

    output_dir: str = _f("adak-output", "checkpoints, log.jsonl and the routing adapter go here")
    overwrite_output_dir: bool = _f(
        False,
        "replace a previous run's adapter, checkpoints and log.jsonl in output_dir (other files are "
        "kept); without it such a folder is refused unless resuming",
    )
    # ---- warm start
    warmup: str = _f(
        "skip-warm",
        "warm start: skip-warm (dynamic skipping at the budget), k-warm (the model's Top-K), "
        "p-warm (the paper) or random",
        choices=WARMUP_METHODS,
    )
    warmup_steps: int = _f(100, "cross-entropy warm-start steps (p-warm; k/skip-warm without an exact start)")
    warmup_learning_rate: float = _f(1e-2, "AdamW learning rate of the cross-entropy warm start")
    warmup_p: float | None = _f(None, "P-Warm threshold p (default: calibrated to the budget)")
    warmup_scale: float = _f(4.0, "logit scale of the exact K-/Skip-Warm starts (higher: less exploration)")
    calibration_batches: int = _f(4, "batches used to calibrate warm-start thresholds")
    # ---- compute budget
    target_experts: float | None = _f(
        None,
        "mean routed experts per token over the MoE layers at greedy inference; lambda is adapted "
        "by dual ascent to reach it (default: none, lambda stays k_penalty)",
    )
    layer_targets: list[float] | None = _f(
        None,
        "per-Ada-K-layer mean k (in layer order) whose average over the MoE layers is target_experts, e.g. "
        "a split searched on validation rows: Skip-Warm starts each layer at its own budget and each layer "
        "gets its own lambda by dual ascent (default: one budget for every layer, one lambda)",
    )
    k_penalty: float = _f(
        3e-3, "lambda: nats of log-likelihood per expected expert (initial value with a target)"
    )
    k_penalty_learning_rate: float = _f(
        0.01, "dual-ascent step of lambda per PPO step, per relative budget error"
    )
    budget_calibration: bool = _f(
        True,
        "after PPO, tilt every allocator's bias by one common amount so that the greedy mean on "
        "calibration_batches batches (of the rows budget_calibration_data names) is target_experts "
        "(needs allocator_bias)",
    )
    budget_calibration_data: str = _f(
        "train",
        "rows the budget calibration measures the mean k on: 'train' (calibration_batches training "
        "batches) or 'eval' (the first calibration_batches batches of eval_dataset: text like the one "
        "served, when the training text differs from it)",
        choices=("train", "eval"),
    )
    # ---- kept-expert weight gains (AdaKConfig(weight_gain=True) only)
    weight_gain_steps: int = _f(
        100,
        "Adam steps fitting the weight gains per layer and kept-expert count on the training rows after PPO "
        "and the budget calibration, model frozen (0: leave them to hf_moe_routing.fit_kept_weight_gains)",
    )
    weight_gain_learning_rate: float = _f(1e-2, "Adam learning rate of the weight-gain fit")
    # ---- PPO
    max_steps: int = _f(300, "PPO steps (rollouts); each makes ppo_epochs optimiser steps")
    ppo_epochs: int = _f(2, "optimiser steps per rollout")
    learning_rate: float = _f(1e-3, "AdamW learning rate of PPO")
    weight_decay: float = _f(0.1, "AdamW weight decay of PPO")
    baseline: str = _f(
        "counterfactual",
        "advantage baseline: counterfactual (per layer: the same sample with that layer at Top-K), "
        "topk (the paper: the model's Top-K), leave-one-out (the other samples of the batch)",
        choices=BASELINES,
    )
    rollout_samples: int = _f(1, "samples of k per batch (leave-one-out needs >= 2)")
    gamma: float = _f(0.99, "per-layer discount gamma^(L-l) of the topk / leave-one-out advantages")
    clip_epsilon: float = _f(0.2, "PPO clip range epsilon")
    advantage_normalization: str = _f(
        "none", "rescale advantages: none, scale or standardize", choices=ADVANTAGE_NORMALIZATIONS
    )
    entropy_coef: float = _f(0.0, "entropy bonus beta")
    max_grad_norm: float | None = _f(1.0, "gradient clipping (None: off)")
    # ---- data and devices
    batch_size: int = _f(8, "sequences per micro-batch and process")
    gradient_accumulation_steps: int = _f(1, "micro-batches per PPO / warm-up step")
    mixed_precision: str = _f(
        "auto", "auto (bf16 on GPUs that support it), no, bf16, fp16", choices=MIXED_PRECISIONS
    )
    fsdp: bool = _f(False, "shard the frozen model with FSDP2 (automatic under accelerate's FSDP2)")
    seed: int = _f(0, "seeds allocator initialisation, k sampling and data order")
    shuffle: bool = _f(True, "shuffle the training rows every epoch")
    # ---- bookkeeping
    logging_steps: int = _f(10, "log every N steps (0: only the last)")
    log_level: str = _f(
        "info", "info prints log lines and the summary; warning and above stay quiet", choices=LOG_LEVELS
    )
    eval_steps: int = _f(0, "evaluate every N steps (0: only at the end)")
    eval_batches: int | None = _f(
        None,
        "evaluate on at most N batches per process (None: all); `train` without --eval-dataset "
        "holds out the last N batches of --dataset",
    )
    save_steps: int = _f(50, "checkpoint every N steps (0: only at the end and on Ctrl-C)")
    save_total_limit: int | None = _f(2, "keep the newest N checkpoints (None: all)")
    report_to: list[str] | None = _f(None, "accelerate trackers, e.g. tensorboard wandb")
    progress_bar: bool = _f(True, "show a progress bar")
    verify_base_unchanged: bool = _f(True, "check at the end that no base-model weight changed")

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        super().__post_init__()
        owner = "AdaKTrainingConfig"
        for name in dataclasses.fields(self):
            choices = name.metadata.get("choices")
            if choices is not None:
                check_choice(owner, name.name, getattr(self, name.name), choices)
        for name in (
            "batch_size",
            "gradient_accumulation_steps",
            "ppo_epochs",
            "calibration_batches",
            "rollout_samples",
        ):
            check_range(owner, name, getattr(self, name), low=1)
        for name in (
            "warmup_steps",
            "max_steps",
            "logging_steps",
            "eval_steps",
            "save_steps",
            "weight_gain_steps",
        ):
            check_range(owner, name, getattr(self, name), low=0)
        check_range(owner, "eval_batches", self.eval_batches, low=1)
        check_range(owner, "save_total_limit", self.save_total_limit, low=1)
        for name in (
            "learning_rate",
            "warmup_learning_rate",
            "clip_epsilon",
            "warmup_scale",
            "weight_gain_learning_rate",
        ):
            check_range(owner, name, getattr(self, name), low=0.0, low_open=True)
        for name in ("weight_decay", "k_penalty", "k_penalty_learning_rate", "entropy_coef"):
            check_range(owner, name, getattr(self, name), low=0.0)
        check_range(owner, "max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        check_range(owner, "gamma", self.gamma, low=0.0, high=1.0, low_open=True)
        check_range(owner, "warmup_p", self.warmup_p, low=0.0, high=1.0, low_open=True)
        check_range(
            owner,
            "target_experts",
            self.target_experts,
            low=0.0,
            low_open=True,
            hint="It is the mean number of routed experts per token, e.g. 0.7 * the model's top-k.",
        )
        if self.layer_targets is not None:
            if self.target_experts is None or not self.layer_targets:
                raise ValueError(
                    f"{owner}(layer_targets=...) splits the budget target_experts across layers: set "
                    "target_experts too, and give one value per Ada-K layer."
                )
            for value in self.layer_targets:
                check_range(
                    owner, "layer_targets", value, low=1.0, hint="each is a mean k of one layer (>= 1)."
                )
        if self.baseline == "leave-one-out" and self.rollout_samples < 2:
            raise ValueError(
                f"{owner}(baseline='leave-one-out') compares samples of the same batch: set rollout_samples >= 2."
            )


@dataclass
class TrainerState:
    """Progress of a training run (saved in ``trainer_state.json``); ``k_penalty`` is the current lambda."""

    warmup_step: int = 0
    ppo_step: int = 0
    batches_seen: int = 0  # micro-batches drawn from the training stream by each process
    k_penalty: float | None = None
    warmup_p: float | None = None
    warmup_mean_label: float | None = None
    skip_log_betas: dict[str, float] | None = None
    layer_k_penalties: list[float] | None = (
        None  # per-layer lambdas (with layer_targets); k_penalty: their mean
    )
    exact_start: bool = False
    budget_tilt: float | None = None
    weight_gain_fit: dict[str, float] | None = None  # fit_gains' summary once the weight gains are fitted
    log_history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def global_step(self) -> int:
        return self.warmup_step + self.ppo_step
