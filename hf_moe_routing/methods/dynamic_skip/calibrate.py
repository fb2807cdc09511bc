"""Per-layer calibration of the dynamic-skipping thresholds ``beta_l``: to a quantile of the ratios
(:func:`calibrate`, the paper), or to a per-layer budget of experts per token (:func:`calibrate_to_budget`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core.batching import run_forwards
from ..routing import calibrate_layers, collect_calibration, patched_layers
from .layer import DynamicSkipLayer


def calibrate(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    quantile: float | None = None,
    progress: bool = True,
) -> dict[int, float]:
    """Set every layer's ``beta_l`` to a quantile of ``w_j / w_(1)`` over the calibration tokens.

    ``model`` must be patched with :class:`~.config.DynamicSkipConfig`. ``data`` is anything
    :func:`hf_moe_routing.core.batching.iter_batches` accepts (a packed ``datasets.Dataset``, a
    tensor of token ids, or a list of dicts/sequences); padding (``attention_mask == 0``) is
    excluded. The model routes with its own top-k while calibrating. Returns
    ``{layer_index: beta_l}``; the values live in the layers' ``beta`` buffers and are saved with
    the routing adapter. ``hf_moe_routing.fit_routing`` does the same for any routing.

    Raises:
        ValueError: the model is not patched with dynamic skipping, or ``quantile`` is not in (0, 1).
    """
    layers = [m for m in model.modules() if isinstance(m, DynamicSkipLayer)]
    if not layers:
        raise ValueError(
            "calibrate() needs a model patched with DynamicSkipConfig: "
            "patch_model(model, DynamicSkipConfig()) first."
        )
    if quantile is not None and not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile={quantile!r} must be in (0, 1); 0.5 is the paper's median.")
    for layer in layers:
        layer.begin_fit()
    try:
        run_forwards(
            model,
            data,
            batch_size,
            max_batches=max_batches,
            progress=progress,
            desc="calibrating dynamic skipping",
        )
        return {layer.layer_index: layer.end_fit(quantile) for layer in layers}
    finally:
        for layer in layers:
            layer.calibration = None


def collect_ratios(
    model: nn.Module, data: Any, *, batch_size: int = 8, max_batches: int | None = None
) -> dict[int, torch.Tensor]:
    """``{layer_index: (n, k - 1) float32}``: the ratios ``w_j / w_(1)`` of every real calibration token.

    ``model`` must be patched with :class:`~.config.DynamicSkipConfig`; it routes with its own top-k while
    collecting (as in :func:`calibrate`), and every layer's ``beta`` is left unchanged.
    """
    layers = _layers(model)
    saved = {layer.layer_index: float(layer.beta) for layer in layers}
    for layer in layers:
        layer.begin_fit()
    try:
        return collect_calibration(model, layers, data, batch_size, max_batches)
    finally:
        for layer in layers:
            layer.set_beta(saved[layer.layer_index])


def beta_for_budget(ratios: torch.Tensor, mean_k: float) -> float:
    """The threshold ``beta_l`` at which tokens with these ratios keep ``mean_k`` experts on average.

    ``ratios`` (n, k - 1) from :func:`collect_ratios`; a token keeps its best expert plus every j with
    ``w_j / w_(1) >= beta``, so ``mean_k = 1 + (k - 1) * share of ratios >= beta``. ``mean_k`` in
    [1, k]; the result is exact up to ties and the 1/n granularity of the share.

    Raises ValueError for ``mean_k`` outside [1, k] or no ratios.
    """
    n, slots = ratios.shape[0], ratios.shape[1]
    if n == 0 or slots == 0:
        raise ValueError("No calibration ratios: pass calibration data that reaches the layer.")
    if not 1.0 <= mean_k <= slots + 1:
        raise ValueError(f"mean_k={mean_k} must be in [1, {slots + 1}] (one to all of the top-k experts).")
    flat = ratios.reshape(-1).float().sort(descending=True).values
    kept = round((mean_k - 1.0) / slots * flat.numel())
    if kept == 0:
        return (
            1.0 if float(flat[0]) < 1.0 else float(torch.nextafter(flat[0], torch.tensor(2.0)).clamp(max=1.0))
        )
    return float(flat[kept - 1])


def calibrate_to_budget(
    model: nn.Module,
    budgets: float | dict[int, float],
    ratios: dict[int, torch.Tensor],
) -> dict[int, float]:
    """Set every layer's ``beta_l`` so that it keeps ``budgets[l]`` experts per token on the calibration
    tokens (``ratios`` from :func:`collect_ratios`); a float is the same budget for every layer.

    Returns ``{layer_index: beta_l}``. Raises ValueError if a layer has no budget or no ratios.
    """
    return calibrate_layers(
        _layers(model), budgets, ratios, beta_for_budget, DynamicSkipLayer.set_beta, "ratios"
    )


def _layers(model: nn.Module) -> list[DynamicSkipLayer]:
    return patched_layers(model, DynamicSkipLayer, "DynamicSkipConfig")
