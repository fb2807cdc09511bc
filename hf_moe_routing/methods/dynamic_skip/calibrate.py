"""Per-layer calibration of the dynamic-skipping thresholds ``beta_l``."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...core.batching import run_forwards
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
