"""The math behind the ``evaluate`` routing metrics (pure functions over plain lists / tensors).

Rows are forward passes (batches): ``loads`` rows are (L, m) tokens per expert of the L MoE layers,
``activated`` rows are (L,) mean activated routed experts per token, weighted by ``num_tokens``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..core.ops import max_vio
from ..evaluation.flops import flops_per_token


def _rows(name: str, rows: Sequence[Any]) -> torch.Tensor:
    tensor = torch.as_tensor([list(r) for r in rows] if len(rows) else [], dtype=torch.float64)
    if len(rows) == 0:
        raise ValueError(f"No {name} were added: call metric.add_batch(...) or pass them to compute().")
    return tensor


def max_vio_summary(loads: Sequence[Sequence[Sequence[float]]]) -> dict[str, Any]:
    """MaxVio of batches of expert loads.

    With ``MaxVio(l) = (max_j l_j - mean_j l_j) / mean_j l_j`` and batch b, layer i:

    * ``avg_max_vio = mean_b mean_i MaxVio(loads[b, i])``, ``sup_max_vio = max_b mean_i MaxVio(loads[b, i])``
    * ``max_vio_global_per_layer[i] = MaxVio(sum_b loads[b, i])``, ``max_vio_global`` = its mean over layers.
    """
    try:
        tensor = _rows("loads", [[list(layer) for layer in batch] for batch in loads])
    except ValueError as error:
        if "No loads" in str(error):
            raise
        raise ValueError(
            "loads must be (batch, layers, experts) with the same layers and experts in every batch."
        ) from error
    if tensor.dim() != 3:
        raise ValueError(f"loads must be (batch, layers, experts); got shape {tuple(tensor.shape)}.")
    per_batch = max_vio(tensor).mean(dim=1)
    global_per_layer = max_vio(tensor.sum(dim=0))
    return {
        "avg_max_vio": float(per_batch.mean()),
        "sup_max_vio": float(per_batch.max()),
        "max_vio_global": float(global_per_layer.mean()),
        "max_vio_global_per_layer": global_per_layer.tolist(),
    }


def activated_per_layer(activated: Sequence[Sequence[float]], num_tokens: Sequence[int]) -> list[float]:
    """Token-weighted mean activated experts per layer: ``sum_b n_b a[b, i] / sum_b n_b``."""
    values = _rows("activated expert counts", activated)
    if values.dim() != 2:
        raise ValueError(f"activated must be (batch, layers); got shape {tuple(values.shape)}.")
    weights = torch.as_tensor(list(num_tokens), dtype=torch.float64)
    if weights.shape != values.shape[:1] or bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise ValueError("num_tokens must give one non-negative token count per row, not all zero.")
    return ((weights[:, None] * values).sum(dim=0) / weights.sum()).tolist()


def activated_summary(activated: Sequence[Sequence[float]], num_tokens: Sequence[int]) -> dict[str, Any]:
    """``mean_activated_experts`` (mean over layers of :func:`activated_per_layer`) and the per-layer list."""
    per_layer = activated_per_layer(activated, num_tokens)
    return {"mean_activated_experts": sum(per_layer) / len(per_layer), "activated_per_layer": per_layer}


def as_model_or_config(value: Any) -> Any:
    """A model or config from a model, ``PretrainedConfig``, config dict, or config folder / Hub id."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(value, (torch.nn.Module, PretrainedConfig)):
        return value
    if isinstance(value, dict):
        data = dict(value)
        if "model_type" not in data:
            raise ValueError("A config dict needs its 'model_type' (pass model.config.to_dict()).")
        return AutoConfig.for_model(data.pop("model_type"), **data)
    if isinstance(value, (str, os.PathLike)):
        return AutoConfig.from_pretrained(value)
    raise TypeError(
        f"model_config must be a model, a transformers config, a config dict or a config path; got {type(value).__name__}."
    )


def flops_summary(model_or_config: Any, seq_len: int, per_layer: Sequence[float]) -> dict[str, Any]:
    """FLOPs per token with ``per_layer`` activated experts, vs. the model's own top-k.

    ``flops_reduction = 1 - F(activated) / F(top-k)`` (forward FLOPs per token, whole model).
    """
    model_or_config = as_model_or_config(model_or_config)
    routed = flops_per_token(model_or_config, seq_len, activated=list(per_layer))
    topk = flops_per_token(model_or_config, seq_len)
    return {
        "flops_per_token": routed.total,
        "topk_flops_per_token": topk.total,
        "flops_reduction": 1.0 - routed.total / topk.total,
        "routed_expert_flops_per_token": routed.routed_experts,
        "mean_activated_experts": sum(per_layer) / len(per_layer),
    }
