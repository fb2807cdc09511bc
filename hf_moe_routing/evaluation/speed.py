"""Forward speed of a routing, alone and side by side with the model's own Top-K."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..core.batching import model_device
from ..data.context import check_context_length
from ..patching import describe, original_routing
from .evaluate import routing_name


def _as_batch(batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError("batch must be a (B, T) tensor of token ids or a dict with 'input_ids'.")
    ids = torch.as_tensor(batch["input_ids"]).to(device)
    if ids.dim() != 2:
        raise ValueError(f"batch input_ids must be 2-D (batch, seq_len), got shape {tuple(ids.shape)}.")
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).to(device)
    return {"input_ids": ids, "attention_mask": mask}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_forward(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    model(**batch)
    _synchronize(device)
    return time.perf_counter() - start


def measure_speed(model: nn.Module, batch: Any, *, repeats: int = 10, warmup: int = 2) -> dict[str, Any]:
    """Wall-clock time of ``model``'s forward pass on ``batch`` (no grad), as routed now.

    Returns ``median_s`` (the median over ``repeats`` timed runs after ``warmup`` untimed ones),
    ``times_s``, ``tokens`` (real tokens in the batch) and ``tokens_per_s`` (at the median).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    device = model_device(model)
    inputs = _as_batch(batch, device)
    with torch.no_grad():
        for _ in range(warmup):
            model(**inputs)
        times = [_time_forward(model, inputs, device) for _ in range(repeats)]
    median = statistics.median(times)
    tokens = int(inputs["attention_mask"].sum())
    return {"median_s": median, "times_s": times, "tokens": tokens, "tokens_per_s": tokens / median}


def compare_speed(model: nn.Module, batch: Any, *, repeats: int = 10, warmup: int = 2) -> dict[str, Any]:
    """Forward time of ``model``'s routing next to the same model under its own Top-K.

    Both are timed in alternating rounds (``repeats`` rounds, each a few forwards of each), so drifting
    machine load hits both alike. Returns ``routing`` and ``topk`` (:func:`measure_speed` dicts),
    ``speedup`` (Top-K median / routing median) and ``time_saved`` (1 - routing / Top-K).

    Raises:
        ValueError: the model has no MoE block (there is no routing to compare), ``repeats`` < 1, or
            the batch is longer than the model's context.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    describe(model)  # ValueError for a model without MoE blocks
    check_context_length(model, _as_batch(batch, torch.device("cpu"))["input_ids"].shape[1])
    rounds = min(repeats, 5)
    per_round = max(1, math.ceil(repeats / rounds))
    routed: list[float] = []
    topk: list[float] = []
    for r in range(rounds):
        routed += measure_speed(model, batch, repeats=per_round, warmup=warmup if r == 0 else 1)["times_s"]
        with original_routing(model):
            topk += measure_speed(model, batch, repeats=per_round, warmup=warmup if r == 0 else 1)["times_s"]
    tokens = int(_as_batch(batch, torch.device("cpu"))["attention_mask"].sum())

    def summary(times: list[float]) -> dict[str, Any]:
        median = statistics.median(times)
        return {"median_s": median, "times_s": times, "tokens": tokens, "tokens_per_s": tokens / median}

    out = {"routing_name": routing_name(model), "routing": summary(routed), "topk": summary(topk)}
    out["speedup"] = out["topk"]["median_s"] / out["routing"]["median_s"]
    out["time_saved"] = 1.0 - out["routing"]["median_s"] / out["topk"]["median_s"]
    return out
