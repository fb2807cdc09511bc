"""Evaluate a routing: held-out perplexity, activated experts, FLOPs and MaxVio, and forward speed.

Everything works on patched and unpatched models. The *Top-K reference* of a patched model is the same
model with its routers temporarily running their original forward (:func:`~hf_moe_routing.original_routing`;
nothing is unpatched, the caller's routing layers stay valid), so every comparison holds the model
fixed and changes only the routing.

Perplexity is token-weighted over all predicted tokens of the data set (padding and labels of -100
excluded)::

    ppl = exp( sum_t -log p(x_t | x_<t) / #predicted tokens )
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from torch import nn

from ..core.batching import IGNORE_INDEX, iter_batches, model_device
from ..data.context import check_context_length
from ..families import MoEShape
from ..patching import describe, get_patch_state, original_routing, warn_if_unfitted
from .flops import flops_per_token
from .stats import RoutingStats


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
    return describe(model).shape


def routing_name(model: nn.Module) -> str:
    """A short label of the model's routing, e.g. ``"top_p(p=0.5)"`` or ``"topk (model)"``."""
    state = get_patch_state(model)
    if state is None:
        return "topk (model)"
    settings = {k: v for k, v in state.config.to_dict().items() if k != "routing_type" and v is not None}
    inner = ", ".join(f"{k}={v}" for k, v in settings.items() if not isinstance(v, (list, dict)))
    return f"{state.config.routing_type}({inner})"


#: The model's own Top-K inside the block, without rebuilding the patch (see ``original_routing``).
topk_routing = original_routing


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
            check_context_length(model, batch["input_ids"].shape[1])
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            nll, count = token_nll(out.logits, batch["labels"])
            total_nll += nll
            total_tokens += count
            seq_lens.append(batch["input_ids"].shape[1])
        summary = stats.summary()
    if total_tokens == 0:
        raise ValueError(
            "No token of the evaluation data is predicted (no batch, or all labels are -100 or padding): "
            "there is no perplexity to report."
        )
    loss = total_nll / total_tokens
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"The evaluation loss is {loss}: the model produced NaN or infinite logits under this routing."
        )
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

    A routing whose state was never fitted or trained (e.g. ``BIPConfig()`` right after patching)
    is evaluated with a warning: its numbers are those of its initial state.

    Raises:
        ValueError: the model has no MoE block; ``max_batches`` < 1; the data has no predicted token
            or sequences longer than the model's context (``max_position_embeddings``).
        FloatingPointError: the loss is NaN or infinite.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 (or None for all batches), got {max_batches}.")
    shape = moe_shape(model)
    warn_if_unfitted(model, "the results are those of its initial state", stacklevel=2)
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
            reference["max_vio_per_layer"] = out["max_vio_per_layer"]
        else:
            with topk_routing(model):
                ref = _evaluate_once(model, eval_data, batch_size, max_batches, progress, "evaluating Top-K")
            reference = {
                "perplexity": ref["perplexity"],
                "loss": ref["loss"],
                "mean_activated": float(ref["stats"]["mean_activated"]),
                "avg_max_vio": float(ref["stats"]["avg_max_vio"]),
                "max_vio_per_layer": dict(
                    zip([str(i) for i in layers], [float(v) for v in ref["stats"]["max_vio_global"]])
                ),
            }
        out["topk"] = reference
        out["perplexity_change"] = out["perplexity"] / reference["perplexity"] - 1.0
    return out


def hook_expert_counts(blocks: list[Any], current: dict[int, torch.Tensor]) -> list[Any]:
    """Register a forward hook on every block's router (``describe(model).blocks``) that sets, at each
    forward, ``current[layer_index]`` to a (tokens,) int64 CPU tensor: the non-sentinel expert slots of each
    token (a shared expert is not counted). Returns the hook handles: call ``.remove()`` on each when done.
    """

    def hook(block):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            index = block.spec.decode(output).index
            current[block.layer_index] = (index < block.spec.num_experts).sum(dim=-1).cpu()

        return record

    return [b.router.register_forward_hook(hook(b)) for b in blocks]


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
    described = describe(model)
    adapter_blocks = described.blocks
    current: dict[int, torch.Tensor] = {}
    handles = hook_expert_counts(adapter_blocks, current)
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
