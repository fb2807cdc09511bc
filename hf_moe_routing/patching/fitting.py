"""Fit a routing's state on data, without gradients: BIP's prices, Loss-Free's bias, skip thresholds.

A frozen checkpoint patched with ``BIPConfig()`` routes exactly like Top-K until its prices q have
seen data. ``fit_routing`` is that step, next to ``patch_model``::

    patch_model(model, BIPConfig())
    fit_routing(model, calibration_data)        # q fitted on the data, model unchanged
    save_routing_adapter(model, "bip-adapter")

Routings whose config declares ``requires = "fitting"`` are fitted; each routing layer takes part
through ``begin_fit()`` / ``end_fit()`` (no-ops on the base layer): BIP and Loss-Free update
their state on every batch (as in training, but the model stays in eval mode: no dropout, no
gradients), dynamic skipping collects score ratios and sets its thresholds at the end.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from ..core.batching import run_forwards
from .patch import _require_state, get_patch_state, routing_layers


def fit_routing(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit the routing state of a patched model on ``data`` (no gradients, the model stays as it is).

    Args:
        model: a model patched with a routing that has state to fit (``BIPConfig``,
            ``LossFreeConfig``, ``DynamicSkipConfig``).
        data: token ids: a packed ``datasets.Dataset``, a (N, T) tensor, or a list of sequences/dicts
            (see :func:`hf_moe_routing.core.batching.iter_batches`); padding is excluded.
        batch_size: sequences per forward; BIP balances each batch, so use the batch size you will
            serve or train with.
        max_batches: fit on the first batches only (None = all).
        progress: show a progress bar.

    Returns ``{"routing": name, "batches": int, "tokens": int, "layers": {layer_index: summary}}``.

    Raises:
        ValueError: the model is not patched, its routing has nothing to fit (Top-K, top-p,
            Loss-Controlled), or it is trained rather than fitted (Ada-K: use ``AdaKTrainer``), or
            the data is empty.
    """
    state = _require_state(model)
    config = state.config
    if config.requires != "fitting":
        raise ValueError(f"{type(config).__name__} cannot be fitted: {_NOT_FITTED[config.requires]}")
    fittable = routing_layers(model)
    for layer in fittable.values():
        layer.begin_fit()
    try:
        batches, tokens = run_forwards(
            model,
            data,
            batch_size,
            max_batches=max_batches,
            progress=progress,
            desc=f"fitting {config.routing_type}",
        )
        summaries = {i: layer.end_fit() for i, layer in fittable.items()}
    except BaseException:
        for layer in fittable.values():
            layer.abort_fit()
        raise
    return {"routing": config.routing_type, "batches": batches, "tokens": tokens, "layers": summaries}


#: Why ``fit_routing`` refuses a routing, by :attr:`RoutingConfig.requires`.
_NOT_FITTED = {
    "nothing": "it has no state to fit: it routes by fixed rules. Fitting applies to routings with "
    "state fitted on data (BIPConfig, LossFreeConfig, DynamicSkipConfig).",
    "training": "its state is trained, not fitted: use its trainer (Ada-K: hf_moe_routing.AdaKTrainer, "
    "or `hf-moe-routing train`).",
    "router_training": "it fine-tunes the router weights with the training loss: train the model with it, "
    "or use `hf-moe-routing fit`, which fine-tunes the routers and saves the model.",
}


def unfitted_layers(model: nn.Module) -> list[int]:
    """MoE layer indices whose routing state was never fitted or trained (``RoutingLayer.is_fitted``).

    Empty for an unpatched model and for routings without state (Top-K, top-p).
    """
    if get_patch_state(model) is None:
        return []
    return [index for index, layer in routing_layers(model).items() if not layer.is_fitted()]


def warn_if_unfitted(model: nn.Module, consequence: str, *, stacklevel: int = 2) -> bool:
    """Warn (UserWarning) if the routing of ``model`` was never fitted or trained; returns whether it warned.

    ``consequence`` completes the sentence, e.g. ``"the results are those of its initial state"``.
    """
    layers = unfitted_layers(model)
    if not layers:
        return False
    config = get_patch_state(model).config
    fittable = config.requires == "fitting"
    how = (
        "fit it first: hf_moe_routing.fit_routing(model, data) (command line: hf-moe-routing fit)"
        if fittable
        else "train it first (Ada-K: hf_moe_routing.AdaKTrainer, command line: hf-moe-routing train), "
        "or load a trained routing adapter"
    )
    warnings.warn(
        f"The {config.routing_type} routing of MoE layers {layers} was never fitted or trained, so {consequence}"
        f"{' (BIP and Loss-Free then route exactly like the model Top-K)' if fittable else ''}: {how}.",
        UserWarning,
        stacklevel=stacklevel + 1,
    )
    return True
