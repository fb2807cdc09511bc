"""Warm starts of the Ada-K trainer: calibration of the label thresholds, exact starts, label CE steps.

* ``"k-warm"``: every token's label is the model's top-k;
* ``"skip-warm"``: dynamic skipping's count, with ``log beta_l`` calibrated per layer so that the mean
  label is the budget (``target_experts``; without one, the paper's median rule);
* ``"p-warm"`` (the paper): the fewest experts whose probability reaches p, one p calibrated so the
  mean label is the budget (without one, the model's top-k, as in the paper);
* ``"random"``: the allocators' seeded initialisation.

Allocators with a bias that see the router start K-Warm and Skip-Warm exactly in closed form
(:func:`hf_moe_routing.methods.adak.warmup.skip_warm_init`); the others learn the labels by
cross-entropy on the states of Top-K forwards (``warmup_steps`` steps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...core.distributed import gather_rows
from ...methods.adak import AdaKLayer
from ...methods.adak.warmup import (
    calibrate_skip_threshold,
    constant_labels,
    default_candidates,
    k_warm_init,
    label_means,
    pick_threshold,
    skip_labels,
    skip_warm_init,
    threshold_labels,
)
from .rollout import Forward, _layer_hooks


def topk_records(
    forward: Forward, layers: dict[int, AdaKLayer], batch: dict[str, torch.Tensor]
) -> dict[int, Any]:
    """{layer: AllocatorRecord} of a forward with the model's own Top-K routing."""
    everywhere = lambda value: {i: value for i in layers}  # noqa: E731
    with _layer_hooks(layers, use_topk=everywhere(True), record=everywhere(True)):
        forward(batch)
        return {i: layer.last for i, layer in layers.items()}


def layer_target(
    target_experts: float | None, top_k: int, num_moe_layers: int, num_adak_layers: int
) -> float | None:
    """Mean k each Ada-K layer needs so that all MoE layers average ``target_experts`` (others run top-k)."""
    if target_experts is None:
        return None
    others = num_moe_layers - num_adak_layers
    return (target_experts * num_moe_layers - top_k * others) / num_adak_layers


def exact_start_available(method: str, layers: dict[int, AdaKLayer]) -> bool:
    """Whether every allocator can take ``method``'s start in closed form (no cross-entropy steps)."""
    if method == "k-warm":
        return all(layer.allocator.bias is not None for layer in layers.values())
    if method == "skip-warm":
        return all(
            layer.allocator.bias is not None and layer.allocator.router_features >= layer.k_max
            for layer in layers.values()
        )
    return False


def calibrate(
    method: str,
    records: list[dict[int, Any]],
    masks: list[torch.Tensor],
    layers: dict[int, AdaKLayer],
    target: float | dict[int, float] | None,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, Any]:
    """Thresholds of ``method`` on Top-K records of calibration batches (every process's tokens).

    ``target``: the mean label of every layer, or ``{layer: mean label}`` (Skip-Warm only; P-Warm's one p
    is calibrated to the layers' mean).

    Returns ``{"warmup_p", "warmup_mean_label"}`` for P-Warm, ``{"skip_log_betas": {layer: log beta},
    "warmup_mean_label"}`` for Skip-Warm, ``{}`` otherwise.
    """
    if method == "p-warm":
        ordered = torch.cat(
            [
                r[i].ordered_probs[m.to(r[i].ordered_probs.device)].cpu()
                for r, m in zip(records, masks)
                for i in layers
            ]
        )
        k = max(layer.default_k for layer in layers.values())
        goal = float(k) if target is None else target
        goal = sum(goal.values()) / len(goal) if isinstance(goal, dict) else goal
        candidates = default_candidates()
        sums = label_means(ordered, candidates).double() * len(ordered)
        total = reduce_sum(torch.cat([sums, torch.tensor([float(len(ordered))], dtype=torch.float64)]))
        p, mean = pick_threshold(candidates, (total[:-1] / total[-1]).float(), goal)
        return {"warmup_p": p, "warmup_mean_label": mean}
    if method == "skip-warm":
        betas, means = {}, []
        for i, layer in layers.items():
            ordered = torch.cat(
                [r[i].ordered_probs[m.to(r[i].ordered_probs.device)] for r, m in zip(records, masks)]
            )
            ordered = gather_rows(ordered[:, : layer.k_max].contiguous().float()).cpu()
            goal = 1.0 + (layer.k_max - 1) / 2.0 if target is None else target
            goal = goal[i] if isinstance(goal, dict) else goal  # per-layer budgets (layer_targets)
            betas[str(i)] = calibrate_skip_threshold(ordered, goal)
            means.append(float(skip_labels(ordered, betas[str(i)]).float().mean()))
        return {"skip_log_betas": betas, "warmup_mean_label": sum(means) / len(means)}
    return {}


def apply_exact_start(
    method: str, layers: dict[int, AdaKLayer], log_betas: dict[str, float] | None, scale: float
) -> None:
    """Set every allocator to the closed-form K-Warm / Skip-Warm start."""
    for i, layer in layers.items():
        if method == "k-warm":
            k_warm_init(layer.allocator, min(layer.default_k, layer.k_max), scale)
        else:
            skip_warm_init(layer.allocator, log_betas[str(i)], scale)


def labels(method: str, record: Any, layer: AdaKLayer, state: Any) -> torch.Tensor:
    """Warm-start labels (n,) in 1..k_max of one layer's Top-K record."""
    if method == "p-warm":
        return threshold_labels(record.ordered_probs, state.warmup_p)
    if method == "skip-warm":
        return skip_labels(
            record.ordered_probs[:, : layer.k_max], state.skip_log_betas[str(layer.layer_index)]
        )
    device = record.states.device
    return constant_labels(len(record.states), min(layer.default_k, layer.k_max), device)
