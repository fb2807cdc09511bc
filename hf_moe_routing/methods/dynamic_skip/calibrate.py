"""Per-layer calibration of the dynamic-skipping thresholds ``beta_l``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import DynamicSkipConfig
from .layer import DynamicSkipLayer
from .routing import calibrate_beta


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

    ``model`` must be patched with :class:`DynamicSkipConfig`. ``data`` is what
    :func:`hf_moe_routing.evaluation.evaluate.iter_batches` accepts (a packed ``datasets.Dataset``, a
    tensor of token ids, or a list of dicts/sequences); padding (``attention_mask == 0``) is excluded.
    The model routes with its own top-k while calibrating. Returns ``{layer_index: beta_l}``; the values
    live in the routing layers' ``beta`` buffers and are saved with the routing adapter.
    """
    from ...evaluation.evaluate import iter_batches, model_device  # lazy: evaluation imports patching
    from ...patching import get_patch_state, routing_layers

    state = get_patch_state(model)
    if state is None or not isinstance(state.config, DynamicSkipConfig):
        raise ValueError(
            "calibrate() needs a model patched with DynamicSkipConfig: "
            "patch_model(model, DynamicSkipConfig()) first."
        )
    quantile = state.config.quantile if quantile is None else quantile
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile={quantile!r} must be in (0, 1); 0.5 is the paper's median.")
    layers = {i: layer for i, layer in routing_layers(model).items() if isinstance(layer, DynamicSkipLayer)}
    for layer in layers.values():
        layer.calibration = []
    try:
        with torch.no_grad():
            for batch in iter_batches(
                data,
                batch_size,
                model_device(model),
                max_batches=max_batches,
                progress=progress,
                desc="calibrating dynamic skipping",
            ):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        betas = {}
        for i, layer in layers.items():
            betas[i] = calibrate_beta(
                torch.cat(layer.calibration) if layer.calibration else torch.empty(0), quantile
            )
            layer.set_beta(betas[i])
    finally:
        for layer in layers.values():
            layer.calibration = None
    return betas
