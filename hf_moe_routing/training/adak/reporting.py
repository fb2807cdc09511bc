"""What the Ada-K trainer reports: log lines (``log.jsonl``, console, trackers) and the end-of-run summary."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from . import steps
from .checkpoint import LOG_NAME
from .data import prepare_dataset

#: The :class:`~hf_moe_routing.training.adak.trainer.AdaKTrainer` these functions serve (passed in, not
#: imported: the trainer module imports this one).
Trainer = Any


@dataclasses.dataclass
class AdaKTrainOutput:
    """What :meth:`AdaKTrainer.train` returns (transformers' ``TrainOutput`` habit); ``str()`` is a summary."""

    global_step: int
    metrics: dict[str, Any]
    adapter_dir: str | None
    log_history: list[dict[str, Any]]

    def __str__(self) -> str:
        m = self.metrics
        lines = [
            f"Ada-K training finished: {m['warmup_steps']} warm-start + {m['ppo_steps']} PPO steps "
            f"in {m['train_runtime']:.0f} s"
        ]
        if "eval_ppl" in m:
            lines.append(
                f"  held-out perplexity {m['eval_ppl']:.3f} vs Top-K {m['eval_ppl_topk']:.3f} "
                f"({100 * m['eval_ppl_change']:+.2f}%)"
            )
            lines.append(
                f"  routed experts per token {m['eval_activated_mean']:.3f} of top-{m['top_k']} "
                f"({100 * (1 - m['eval_activated_mean'] / m['top_k']):.1f}% fewer)"
            )
        if m.get("target_experts") is not None:
            lines.append(f"  budget {m['target_experts']:.3f} experts, lambda ended at {m['k_penalty']:.4g}")
        elif m.get("k_penalty") is not None:
            lines.append(f"  lambda (k_penalty) {m['k_penalty']:.4g}")
        if self.adapter_dir:
            lines.append(f"  routing adapter: {self.adapter_dir} (load_routing_adapter(model, path))")
        return "\n".join(lines)


class LoggingMixin:
    """Held-out evaluation and logging methods of :class:`~hf_moe_routing.training.adak.trainer.AdaKTrainer`."""

    @property
    def _verbose(self) -> bool:
        return self.config.log_level in ("debug", "info")

    # ---- logging -----------------------------------------------------------------------------------------
    def _reduce(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Average the numeric statistics over processes (sums for token counts)."""
        if self.accelerator.num_processes == 1:
            return stats
        out = dict(stats)
        for key, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                tensor = torch.tensor(float(value), device=self.device)
                reduced = self.accelerator.reduce(tensor, "sum" if key == "tokens" else "mean")
                out[key] = int(reduced) if key == "tokens" else float(reduced)
            elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                tensor = torch.tensor(value, dtype=torch.float32, device=self.device)
                out[key] = self.accelerator.reduce(tensor, "mean").tolist()
        return out

    def log(self, stats: dict[str, Any], bar: Any = None) -> None:
        """Record ``stats`` in the history, ``log.jsonl``, the console (log_level info) and the trackers."""
        entry = _finite({"step": self.state.global_step, **stats})
        self.state.log_history.append(entry)
        if not self.accelerator.is_main_process:
            return
        Path(self.config.output_dir).mkdir(parents=True, exist_ok=True)
        line = json.dumps(entry, allow_nan=False)
        with open(Path(self.config.output_dir) / LOG_NAME, "a") as f:
            f.write(line + "\n")
        if self._verbose:
            (bar.write if bar is not None else print)(line)
        if self.config.report_to:
            scalars = {k: v for k, v in entry.items() if isinstance(v, (int, float)) and k != "step"}
            for key, values in entry.items():
                if key.endswith("_per_layer") and isinstance(values, list):
                    for index, value in zip(self.layers, values):
                        scalars[f"{key}/{index}"] = value
            self.accelerator.log(scalars, step=self.state.global_step)

    def _evaluate_and_log(self, bar: Any = None) -> None:
        if self.eval_dataset is not None or self.eval_fn is not None:
            results = self.evaluate() if self.eval_dataset is not None else {}
            if self.eval_fn is not None:
                results.update(self.eval_fn(self))
            self.log(results, bar)

    # ---- evaluation --------------------------------------------------------------------------------------
    def evaluate(self, dataset: Any = None, max_batches: int | None = None) -> dict[str, Any]:
        """Held-out log-likelihood and routed experts, greedy Ada-K against the model's Top-K.

        Returns ``eval_nll`` / ``eval_ppl`` (Ada-K), ``eval_nll_topk`` / ``eval_ppl_topk``,
        ``eval_ppl_change`` (relative), ``eval_activated_mean`` (over all MoE layers),
        ``eval_activated_per_layer`` (Ada-K layers) and ``eval_tokens``. Warns if Ada-K uses more experts
        than the model's top-k on average. Every process must call it (FSDP forwards are collective).
        """
        if dataset is not None:
            dataset = prepare_dataset(dataset, self.model, self.tokenizer, self.seq_len)
        dataset = self.eval_dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("No evaluation data: pass eval_dataset to the trainer or dataset= here.")
        return steps.evaluate(self, dataset, self.config.eval_batches if max_batches is None else max_batches)


def settings_that_did_not_run(trainer: Trainer) -> list[str]:
    """Training settings with no effect on this run (left off the model card)."""
    config, skip = trainer.config, []
    if trainer.warmup_total() == 0:
        skip += ["warmup_steps", "warmup_learning_rate"]
    if config.warmup != "p-warm":
        skip += ["warmup_p"]
    if not trainer.exact_start:
        skip += ["warmup_scale"]
    calibrates_budget = config.budget_calibration and config.target_experts is not None
    if config.warmup in (
        "random",
        "k-warm",
    ):  # no calibrated warm start; the budget calibration may still run
        skip += ["warmup_mean_label"] + ([] if calibrates_budget else ["calibration_batches"])
    if not calibrates_budget:
        skip += ["budget_calibration_data"]
    if config.target_experts is None:
        skip += ["target_experts", "k_penalty_learning_rate"]
    if config.baseline == "counterfactual":
        skip += ["gamma"]
    if not trainer.gains:  # no AdaKConfig(weight_gain=True): nothing to fit
        skip += ["weight_gain_steps", "weight_gain_learning_rate"]
    elif config.weight_gain_steps == 0:
        skip += ["weight_gain_learning_rate"]
    if config.max_steps == 0:
        skip += [
            "max_steps",
            "ppo_epochs",
            "learning_rate",
            "weight_decay",
            "baseline",
            "rollout_samples",
            "gamma",
            "clip_epsilon",
            "advantage_normalization",
            "entropy_coef",
            "k_penalty",
            "final_k_penalty",
            "target_experts",
            "k_penalty_learning_rate",
        ]
    return skip


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """Tracker-friendly hyper-parameters (lists and None as strings)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


def _finite(value: Any) -> Any:
    """``value`` with NaN / infinite floats replaced by None (standard JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
