"""Evaluate a routing: held-out perplexity, activated experts, FLOPs and MaxVio, and forward speed.

Everything works on patched and unpatched models. The *Top-K reference* of a patched model is the same
model with its routers temporarily restored (:func:`topk_routing`), so every comparison holds the model
fixed and changes only the routing.

Perplexity is token-weighted over all predicted tokens of the data set (padding and labels of -100
excluded)::

    ppl = exp( sum_t -log p(x_t | x_<t) / #predicted tokens )
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..adapters import MoEShape, get_adapter
from ..patching import get_patch_state, patch_model, routing_layers, unpatch_model
from .flops import flops_per_token
from .stats import RoutingStats

IGNORE_INDEX = -100


# ---- data ----------------------------------------------------------------------------------------
def model_device(model: nn.Module) -> torch.device:
    """Where inputs go: the device of the input embeddings (or of the first parameter)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None:
        weight = next(model.parameters())
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


def _as_rows(data: Any) -> tuple[int, Any]:
    """``(number of rows, getter(start, stop) -> dict of columns)`` for the supported data types."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise ValueError(
                f"Token ids must be a 2-D (batch, seq_len) tensor, got shape {tuple(data.shape)}."
            )
        return data.shape[0], lambda a, b: {"input_ids": data[a:b]}
    if isinstance(data, Mapping):
        if "input_ids" not in data:
            raise ValueError(f"Evaluation data has no 'input_ids' (keys: {sorted(data)}); tokenise it first.")
        ids = data["input_ids"]
        return len(ids), lambda a, b: {k: v[a:b] for k, v in data.items() if k in _COLUMNS}
    column_names = getattr(data, "column_names", None)
    if column_names is not None:  # datasets.Dataset
        if "input_ids" not in column_names:
            raise ValueError(
                f"The dataset has columns {column_names} but no 'input_ids': tokenise and pack it first, "
                "e.g. with hf_moe_routing.data.pack_dataset(dataset, tokenizer, seq_len)."
            )
        return len(data), lambda a, b: {k: v for k, v in data[a:b].items() if k in _COLUMNS}
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        rows = list(data)

        def get(a: int, b: int) -> dict[str, list]:
            chunk = rows[a:b]
            if all(isinstance(r, Mapping) for r in chunk):
                missing = [i for i, r in enumerate(chunk) if "input_ids" not in r]
                if missing:
                    raise ValueError("Every record of the evaluation data needs 'input_ids'.")
                return {k: [r[k] for r in chunk] for k in _COLUMNS if k in chunk[0]}
            return {"input_ids": chunk}

        return len(rows), get
    raise TypeError(
        f"Unsupported evaluation data {type(data).__name__}: pass a packed datasets.Dataset (input_ids, "
        "attention_mask, labels), a (batch, seq_len) tensor of token ids, or a list of token-id lists / dicts."
    )


_COLUMNS = ("input_ids", "attention_mask", "labels")


def _pad(rows: Any, value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of sequences to a (B, T) long tensor; returns it and the (B, T) real-token mask."""
    if isinstance(rows, torch.Tensor):
        return rows.long(), torch.ones_like(rows, dtype=torch.long)
    seqs = [torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in rows]
    width = max((s.numel() for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : s.numel()] = s
        mask[i, : s.numel()] = 1
    return out, mask


def iter_batches(
    data: Any,
    batch_size: int,
    device: torch.device | str = "cpu",
    *,
    max_batches: int | None = None,
    progress: bool = False,
    desc: str = "evaluating",
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches ``{"input_ids", "attention_mask", "labels"}`` (B, T) of evaluation data on ``device``.

    ``data``: a packed ``datasets.Dataset`` / dict of columns, a (N, T) tensor of token ids, or a list of
    token-id sequences or dicts (ragged rows are right-padded; padding gets mask 0 and label -100).
    Missing labels are the input ids with padding set to -100 (the usual causal-LM convention).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    num_rows, get = _as_rows(data)
    if num_rows == 0:
        raise ValueError("The evaluation data is empty: pass at least one sequence.")
    starts = list(range(0, num_rows, batch_size))
    if max_batches is not None:
        starts = starts[: max(1, max_batches)]
    iterator: Any = starts
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(starts, desc=desc, unit="batch", leave=False)
    for start in iterator:
        columns = get(start, min(start + batch_size, num_rows))
        ids, mask = _pad(columns["input_ids"], 0)
        if "attention_mask" in columns:
            mask = _pad(columns["attention_mask"], 0)[0]
        if "labels" in columns:
            labels = _pad(columns["labels"], IGNORE_INDEX)[0]
        else:
            labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        if ids.shape[1] < 2:
            raise ValueError(
                "Evaluation sequences need at least 2 tokens (one to predict from, one to predict)."
            )
        yield {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens.

    ``logits`` (B, T, V) predict position t+1 from position t; ``labels`` (B, T) use -100 for tokens
    that are not predicted.
    """
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    keep = target != IGNORE_INDEX
    nll = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return float(nll), int(keep.sum())


# ---- routing helpers -------------------------------------------------------------------------------
def moe_shape(model: nn.Module) -> MoEShape:
    """The MoE shape of a patched or unpatched model."""
    state = get_patch_state(model)
    if state is not None:
        return state.shape
    adapter, blocks = get_adapter(model)
    return adapter.shape(model, blocks)


def routing_name(model: nn.Module) -> str:
    """A short label of the model's routing, e.g. ``"top_p(p=0.5)"`` or ``"topk (model)"``."""
    state = get_patch_state(model)
    if state is None:
        return "topk (model)"
    settings = {k: v for k, v in state.config.to_dict().items() if k != "routing_type" and v is not None}
    inner = ", ".join(f"{k}={v}" for k, v in settings.items() if not isinstance(v, (list, dict)))
    return f"{state.config.routing_type}({inner})"


@contextlib.contextmanager
def topk_routing(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with its own Top-K routers inside the block; the routing comes back afterwards.

    A patched model is unpatched and re-patched with the same config; every routing layer's
    :meth:`~hf_moe_routing.methods.RoutingLayer.routing_state` (allocators, duals, thresholds, ...) is
    restored. An unpatched model is already Top-K and is yielded unchanged.
    """
    state = get_patch_state(model)
    if state is None:
        yield model
        return
    config, adapter = state.config, state.adapter
    saved = {
        i: {k: v.detach().clone() for k, v in layer.routing_state().items()}
        for i, layer in routing_layers(model).items()
    }
    unpatch_model(model)
    try:
        yield model
    finally:
        patch_model(model, config, adapter=adapter)
        for i, layer in routing_layers(model).items():
            layer.load_routing_state(saved[i])


# ---- evaluation ------------------------------------------------------------------------------------
def _evaluate_once(
    model: nn.Module, eval_data: Any, batch_size: int, max_batches: int | None, progress: bool, desc: str
) -> dict[str, Any]:
    total_nll, total_tokens, seq_lens = 0.0, 0, []
    device = model_device(model)
    with RoutingStats(model) as stats, torch.no_grad():
        for batch in iter_batches(
            eval_data, batch_size, device, max_batches=max_batches, progress=progress, desc=desc
        ):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            nll, count = token_nll(out.logits, batch["labels"])
            total_nll += nll
            total_tokens += count
            seq_lens.append(batch["input_ids"].shape[1])
        summary = stats.summary()
    if total_tokens == 0:
        raise ValueError("No token of the evaluation data is predicted (all labels are -100 or padding).")
    loss = total_nll / total_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "num_tokens": total_tokens,
        "seq_len": int(round(statistics.fmean(seq_lens))),
        "stats": summary,
    }


def evaluate_routing(
    model: nn.Module,
    eval_data: Any,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    topk_reference: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Held-out perplexity, activated experts, FLOPs and load balance of ``model``'s current routing.

    Args:
        model: a transformers MoE causal LM, patched with any routing or not (= the model's Top-K).
        eval_data: a packed ``datasets.Dataset`` (``input_ids``, optional ``attention_mask``/``labels``), a
            (N, T) tensor of token ids, or a list of token-id sequences / dicts (see :func:`iter_batches`).
        batch_size: sequences per forward pass.
        max_batches: evaluate only the first batches (None = all).
        topk_reference: also evaluate the same model under its own Top-K routing and report the change.
        progress: show a tqdm progress bar.

    Returns a JSON-serialisable dict: ``perplexity``, ``loss`` (mean NLL), ``num_tokens``; ``mean_activated``
    (routed experts per token, averaged over MoE layers and real tokens), ``activated_per_layer``
    ({layer: mean}), ``top_k``, ``activation_reduction`` (1 - mean_activated / top_k); ``flops_per_token``
    and ``flops_per_token_topk`` (forward FLOPs breakdowns at the data's sequence length),
    ``flops_reduction`` (whole model) and ``routed_flops_reduction`` (routed experts only);
    ``avg_max_vio``, ``sup_max_vio``, ``max_vio_per_layer``; and with ``topk_reference`` a ``topk`` dict of
    the reference's numbers plus ``perplexity_change`` (relative, e.g. 0.01 = 1% higher than Top-K).
    """
    shape = moe_shape(model)
    result = _evaluate_once(model, eval_data, batch_size, max_batches, progress, "evaluating")
    stats = result.pop("stats")
    layers = [int(i) for i in stats["layers"]]
    per_layer = [float(v) for v in stats["activated_per_layer"]]
    flops = flops_per_token(model, result["seq_len"], activated=per_layer)
    flops_topk = flops_per_token(model, result["seq_len"])
    state = get_patch_state(model)
    out: dict[str, Any] = {
        "routing": routing_name(model),
        "routing_config": state.config.to_dict() if state is not None else None,
        **result,
        "num_experts": shape.num_experts,
        "top_k": shape.top_k,
        "mean_activated": float(stats["mean_activated"]),
        "activated_per_layer": dict(zip([str(i) for i in layers], per_layer)),
        "activation_reduction": 1.0 - float(stats["mean_activated"]) / shape.top_k,
        "flops_per_token": flops.to_dict(),
        "flops_per_token_topk": flops_topk.to_dict(),
        "flops_reduction": 1.0 - flops.total / flops_topk.total,
        "routed_flops_reduction": (
            1.0 - flops.routed_experts / flops_topk.routed_experts if flops_topk.routed_experts else 0.0
        ),
        "avg_max_vio": float(stats["avg_max_vio"]),
        "sup_max_vio": float(stats["sup_max_vio"]),
        "max_vio_per_layer": dict(zip([str(i) for i in layers], [float(v) for v in stats["max_vio_global"]])),
    }
    if topk_reference:
        if state is None:
            reference = {
                "perplexity": out["perplexity"],
                "loss": out["loss"],
                "mean_activated": out["mean_activated"],
            }
            reference["avg_max_vio"] = out["avg_max_vio"]
        else:
            with topk_routing(model):
                ref = _evaluate_once(model, eval_data, batch_size, max_batches, progress, "evaluating Top-K")
            reference = {
                "perplexity": ref["perplexity"],
                "loss": ref["loss"],
                "mean_activated": float(ref["stats"]["mean_activated"]),
                "avg_max_vio": float(ref["stats"]["avg_max_vio"]),
            }
        out["topk"] = reference
        out["perplexity_change"] = out["perplexity"] / reference["perplexity"] - 1.0
    return out


def token_expert_counts(
    model: nn.Module,
    eval_data: Any,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Routed experts each real token got in each MoE layer (for per-token analyses such as Ada-K's).

    Returns ``input_ids`` (N,) of the real (non-padding) tokens in data order, ``next_ids`` (N,) the token
    that follows each (-100 at the end of a row or before padding), and ``counts``
    ``{layer_index: (N,) long}``: the number of non-sentinel expert slots of each token.
    """
    shape = moe_shape(model)
    adapter_blocks = (
        get_patch_state(model).blocks if get_patch_state(model) is not None else get_adapter(model)[1]
    )
    current: dict[int, torch.Tensor] = {}

    def hook(layer_index: int):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            current[layer_index] = (output[2] < shape.num_experts).sum(dim=-1).cpu()

        return record

    handles = [b.gate.register_forward_hook(hook(b.layer_index)) for b in adapter_blocks]
    ids_out, next_out, counts_out = [], [], {b.layer_index: [] for b in adapter_blocks}
    try:
        with torch.no_grad():
            for batch in iter_batches(
                eval_data, batch_size, model_device(model), max_batches=max_batches, progress=progress
            ):
                current.clear()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                mask = batch["attention_mask"].cpu().bool()
                ids = batch["input_ids"].cpu()
                following = torch.full_like(ids, IGNORE_INDEX)
                following[:, :-1] = ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
                flat = mask.reshape(-1)
                ids_out.append(ids.reshape(-1)[flat])
                next_out.append(following.reshape(-1)[flat])
                for i, values in current.items():
                    counts_out[i].append(values.reshape(-1)[flat])
    finally:
        for handle in handles:
            handle.remove()
    return {
        "input_ids": torch.cat(ids_out),
        "next_ids": torch.cat(next_out),
        "counts": {i: torch.cat(v) for i, v in counts_out.items()},
    }


# ---- speed ---------------------------------------------------------------------------------------
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
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    rounds = min(repeats, 5)
    per_round = max(1, math.ceil(repeats / rounds))
    routed: list[float] = []
    topk: list[float] = []
    for r in range(rounds):
        routed += measure_speed(model, batch, repeats=per_round, warmup=warmup if r == 0 else 1)["times_s"]
        with topk_routing(model):
            topk += measure_speed(model, batch, repeats=per_round, warmup=warmup if r == 0 else 1)["times_s"]
    tokens = int(_as_batch(batch, torch.device("cpu"))["attention_mask"].sum())

    def summary(times: list[float]) -> dict[str, Any]:
        median = statistics.median(times)
        return {"median_s": median, "times_s": times, "tokens": tokens, "tokens_per_s": tokens / median}

    out = {"routing_name": routing_name(model), "routing": summary(routed), "topk": summary(topk)}
    out["speedup"] = out["topk"]["median_s"] / out["routing"]["median_s"]
    out["time_saved"] = 1.0 - out["routing"]["median_s"] / out["topk"]["median_s"]
    return out
