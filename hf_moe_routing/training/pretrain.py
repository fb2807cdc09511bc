"""Pre-train (or continue training) a MoE causal LM under any routing config, recording load balance.

>>> result = pretrain(model, BIPConfig(), train_data, eval_data, PretrainConfig(max_steps=300))
>>> result.avg_max_vio, result.val_perplexity, result.mean_step_time

The model is patched with the routing config (and left patched). Each step is one AdamW update on a batch
of packed sequences with the causal-LM loss plus ``routing_aux_loss(model)`` (the Loss-Controlled auxiliary
loss, when the routing produces one). Per step it records the loss, the MaxVio of every MoE layer (via
:class:`~hf_moe_routing.evaluation.stats.RoutingStats`, padding excluded) and the wall time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import get_scheduler

from ..core.batching import iter_batches, model_device
from ..data.context import check_context_length
from ..evaluation.evaluate import evaluate_routing
from ..evaluation.stats import RoutingStats
from ..methods import RoutingConfig, TopKConfig
from ..patching import get_patch_state, patch_model, routing_aux_loss

_SCHEDULES = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}


@dataclasses.dataclass
class PretrainConfig:
    """Settings of :func:`pretrain` (AdamW with warm-up and a cosine or linear decay)."""

    max_steps: int = 300
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int | None = None  # None: 10% of max_steps
    lr_schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr), "linear" (to 0) or "constant"
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    eval_every: int = 0  # evaluate every n steps (0: only at the end)
    eval_batch_size: int = 16
    max_eval_batches: int | None = None  # None: the whole eval set
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        """Check the settings' ranges.

        Raises:
            ValueError: a count below 1 or a non-positive learning rate (the message names the field).
        """
        if self.max_steps < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("max_steps, batch_size and eval_batch_size must be >= 1.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if self.lr_schedule not in _SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {sorted(_SCHEDULES)}, got {self.lr_schedule!r}.")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(
                f"warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}."
            )
        if self.eval_every < 0:
            raise ValueError("eval_every must be >= 0.")


@dataclasses.dataclass
class PretrainResult:
    """What :func:`pretrain` measured. Lists are per optimisation step (``max_vio`` is step x layer)."""

    routing: dict[str, Any]
    layers: list[int]
    loss: list[float]
    aux_loss: list[float]
    lr: list[float]
    max_vio: list[list[float]]
    step_time: list[float]
    tokens_per_step: float
    evals: list[dict[str, float]]
    val_loss: float | None
    val_perplexity: float | None
    total_time: float
    num_parameters: int

    @property
    def layer_mean_max_vio(self) -> list[float]:
        """MaxVio of each step averaged over the MoE layers."""
        return [sum(row) / len(row) for row in self.max_vio]

    @property
    def avg_max_vio(self) -> float:
        """AvgMaxVio: the layer-averaged MaxVio averaged over steps."""
        values = self.layer_mean_max_vio
        return sum(values) / len(values)

    @property
    def sup_max_vio(self) -> float:
        """SupMaxVio: the largest layer-averaged MaxVio of any step."""
        return max(self.layer_mean_max_vio)

    @property
    def max_vio_step1(self) -> float:
        """The layer-averaged MaxVio of the first step."""
        return self.layer_mean_max_vio[0]

    @property
    def mean_step_time(self) -> float:
        """Mean wall time per step in seconds, without the first step (warm-up of kernels/allocator)."""
        times = self.step_time[1:] or self.step_time
        return sum(times) / len(times)

    def summary(self) -> dict[str, Any]:
        """The headline numbers (what the comparison table shows)."""
        return {
            "routing": self.routing.get("routing_type"),
            "steps": len(self.loss),
            "final_loss": self.loss[-1],
            "val_perplexity": self.val_perplexity,
            "avg_max_vio": self.avg_max_vio,
            "sup_max_vio": self.sup_max_vio,
            "max_vio_step1": self.max_vio_step1,
            "mean_step_time": self.mean_step_time,
            "total_time": self.total_time,
        }

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON values, with a one-line ``summary``."""
        return {"summary": self.summary(), **dataclasses.asdict(self)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def _as_tensors(data: Any, name: str) -> dict[str, torch.Tensor]:
    """All rows of ``data`` (packed dataset, dict of columns, id tensor, list of rows) as (N, T) tensors."""
    try:
        batch = next(iter_batches(data, 1 << 30))
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from error
    return batch


def pretrain(
    model: nn.Module,
    routing_config: RoutingConfig | None,
    train_data: Any,
    eval_data: Any = None,
    config: PretrainConfig | None = None,
) -> PretrainResult:
    """Train every parameter of ``model`` on ``train_data`` with ``routing_config``'s routing.

    Args:
        model: a transformers MoE causal LM (e.g. from :func:`~hf_moe_routing.training.build_moe_model`).
        routing_config: e.g. ``BIPConfig()``, ``LossFreeConfig()``, ``LossControlledConfig()``; ``None``
            keeps the model's current patch, or the model's own Top-K routing if it is not patched. A model
            already patched with another routing is re-patched (``replace=True``).
        train_data: packed training sequences (``datasets.Dataset`` from
            :func:`~hf_moe_routing.data.pack_dataset`, a dict of columns or an (N, T) id tensor).
            Batches are drawn in a shuffled order, epoch after epoch, until ``config.max_steps``.
        eval_data: held-out sequences for the validation perplexity (None: no evaluation).
        config: :class:`PretrainConfig`.

    Returns a :class:`PretrainResult`. The model is left patched and in eval mode.
    """
    config = config or PretrainConfig()
    config.validate()
    if routing_config is not None and not isinstance(routing_config, RoutingConfig):
        raise TypeError(
            f"routing_config must be a RoutingConfig or None, got {type(routing_config).__name__}."
        )
    rows = _as_tensors(train_data, "train_data")
    num_rows, seq_len = rows["input_ids"].shape
    check_context_length(model, seq_len)
    if eval_data is not None:
        check_context_length(model, _as_tensors(eval_data, "eval_data")["input_ids"].shape[1])
    if routing_config is not None:
        patch_model(model, routing_config, replace=True)
    elif get_patch_state(model) is None:
        patch_model(model, TopKConfig())
    state = get_patch_state(model)

    device = model_device(model)
    generator = torch.Generator().manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=config.adam_betas,
    )
    scheduler = get_scheduler(
        _SCHEDULES[config.lr_schedule],
        optimizer,
        num_warmup_steps=config.warmup_steps if config.warmup_steps is not None else config.max_steps // 10,
        num_training_steps=config.max_steps,
        scheduler_specific_kwargs={"min_lr_rate": config.min_lr_ratio}
        if config.lr_schedule == "cosine"
        else None,
    )

    result = PretrainResult(
        routing=state.config.to_dict(),
        layers=[],
        loss=[],
        aux_loss=[],
        lr=[],
        max_vio=[],
        step_time=[],
        tokens_per_step=0.0,
        evals=[],
        val_loss=None,
        val_perplexity=None,
        total_time=0.0,
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
    order = torch.randperm(num_rows, generator=generator)
    cursor = 0
    tokens = 0
    from tqdm.auto import tqdm

    bar = tqdm(
        range(config.max_steps),
        desc=f"pre-training ({state.config.routing_type})",
        disable=not config.progress,
    )
    start = time.perf_counter()
    with RoutingStats(model) as stats:
        result.layers = list(stats.layers)
        for step in bar:
            if cursor + config.batch_size > num_rows and cursor > 0:
                order, cursor = torch.randperm(num_rows, generator=generator), 0
            pick = order[cursor : cursor + config.batch_size]
            cursor += config.batch_size
            batch = {k: v[pick].to(device) for k, v in rows.items()}
            model.train()
            t0 = time.perf_counter()
            out = model(**batch)
            aux = routing_aux_loss(model)
            loss = out.loss if aux is None else out.loss + aux.to(out.loss.device)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"The training loss became {float(loss)} at step {step + 1}: lower learning_rate "
                    f"(now {config.learning_rate}) or check the data."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm:
                nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            elapsed = time.perf_counter() - t0
            last = stats.last
            result.loss.append(float(out.loss.detach()))
            result.aux_loss.append(float(aux.detach()) if aux is not None else 0.0)
            result.lr.append(float(scheduler.get_last_lr()[0]))
            result.max_vio.append([float(v) for v in last.max_vio])
            result.step_time.append(elapsed)
            tokens += last.num_tokens
            bar.set_postfix(
                loss=f"{result.loss[-1]:.3f}", max_vio=f"{sum(result.max_vio[-1]) / len(result.layers):.2f}"
            )
            is_last = step + 1 == config.max_steps
            if eval_data is not None and (
                is_last or (config.eval_every and (step + 1) % config.eval_every == 0)
            ):
                stats.detach()
                ev = _validate(model, eval_data, config)
                stats.attach()
                result.evals.append({"step": step + 1, **ev})
    optimizer.zero_grad(set_to_none=True)  # no stale gradients left on the model
    model.eval()
    result.total_time = time.perf_counter() - start
    result.tokens_per_step = tokens / config.max_steps
    if result.evals:
        result.val_loss = result.evals[-1]["loss"]
        result.val_perplexity = result.evals[-1]["perplexity"]
    return result


def _validate(model: nn.Module, eval_data: Any, config: PretrainConfig) -> dict[str, float]:
    model.eval()
    ev = evaluate_routing(
        model,
        eval_data,
        batch_size=config.eval_batch_size,
        max_batches=config.max_eval_batches,
        topk_reference=False,
        progress=False,
    )
    return {
        "loss": float(ev["loss"]),
        "perplexity": float(ev["perplexity"]),
        "avg_max_vio": ev["avg_max_vio"],
    }


def plot_max_vio(
    results: Mapping[str, PretrainResult], path: str | os.PathLike, *, title: str | None = None
) -> Path:
    """PNG of the layer-averaged MaxVio over training steps, one line per result (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, result in results.items():
        values = [max(v, 1e-3) for v in result.layer_mean_max_vio]
        ax.plot(range(1, len(values) + 1), values, label=label, linewidth=1.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("MaxVio (mean over MoE layers)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
