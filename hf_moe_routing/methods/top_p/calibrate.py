"""Per-layer top-p: thresholds ``p_l`` calibrated so that each layer keeps a budget of experts per token."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..routing import calibrate_layers, collect_calibration, patched_layers
from .layer import TopPLayer
from .routing import top_p_counts


def collect_probs(
    model: nn.Module, data: Any, *, batch_size: int = 8, max_batches: int | None = None
) -> dict[int, torch.Tensor]:
    """``{layer_index: (n, max_k) float32}``: each real calibration token's probabilities in rank order.

    ``model`` must be patched with :class:`~.config.TopPConfig`; while collecting, every layer takes all
    eligible experts up to ``max_k`` (with ``max_k = top_k``: the model's own Top-K). Ineligible ranks hold 0.
    """
    layers = _layers(model)
    for layer in layers:
        layer.calibration = []
    return collect_calibration(model, layers, data, batch_size, max_batches)


def mean_count(ordered: torch.Tensor, p: float) -> float:
    """Mean experts per token that top-p with threshold ``p`` keeps on these ranked probabilities."""
    return float(top_p_counts(ordered, p, eligible=ordered > 0).float().mean())


def p_for_budget(ordered: torch.Tensor, mean_k: float, iterations: int = 50) -> float:
    """The threshold ``p`` in (0, 1] whose mean count on ``ordered`` (from :func:`collect_probs`) is closest
    to ``mean_k`` from below-or-equal where the step function allows (bisection; the count grows with p).

    Raises ValueError for ``mean_k`` below 1 or above the mean count at p = 1, or no tokens.
    """
    if ordered.numel() == 0:
        raise ValueError("No calibration probabilities: pass calibration data that reaches the layer.")
    full = mean_count(ordered, 1.0)
    if not 1.0 <= mean_k <= full + 1e-9:
        raise ValueError(f"mean_k={mean_k} must be in [1, {full:.4f}] (the count at p = 1).")
    lo, hi = 0.0, 1.0  # count(lo) <= mean_k <= count(hi)
    for _ in range(iterations):
        mid = (lo + hi) / 2.0
        if mean_count(ordered, mid) <= mean_k:
            lo = mid
        else:
            hi = mid
    low, high = mean_count(ordered, max(lo, 1e-12)), mean_count(ordered, hi)
    return hi if abs(high - mean_k) < abs(low - mean_k) else max(lo, 1e-12)


def calibrate_to_budget(
    model: nn.Module, budgets: float | dict[int, float], probs: dict[int, torch.Tensor]
) -> dict[int, float]:
    """Set every layer's ``p_l`` so that it keeps ``budgets[l]`` experts per token on the calibration tokens
    (``probs`` from :func:`collect_probs`); a float is the same budget for every layer. Returns ``{layer: p_l}``.
    """
    return calibrate_layers(_layers(model), budgets, probs, p_for_budget, TopPLayer.set_p, "probabilities")


def set_p(model: nn.Module, p: float | dict[int, float]) -> None:
    """Set every top-p layer's threshold (one ``p`` for all, or ``{layer_index: p_l}``)."""
    for layer in _layers(model):
        layer.set_p(p if isinstance(p, (int, float)) else p[layer.layer_index])


def _layers(model: nn.Module) -> list[TopPLayer]:
    return patched_layers(model, TopPLayer, "TopPConfig")
