"""Routing steps shared by the method layers (the family's rules come from the router spec).

Fixed-k methods (BIP, Loss-Free) change only the selection offset; variable-k methods (top-p,
dynamic skipping, Ada-K) rank each token's experts with the family's own top-k first, keep a
per-token prefix of that ranking and mark the other slots with the sentinel index m::

    ranking = rank_experts(spec, router, hidden, k_max)      # logits, scores, index, rank
    keep    = ranking.rank < k_token[:, None]                 # (n, S) the k best of each token
    output  = keep_slots(spec, ranking, keep, ...)            # weights 0 and index m elsewhere

At ``k_token = top_k`` the kept experts are exactly the family's (its own top-k, ties included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn

from ..core.batching import run_forwards
from ..core.ops import to_sentinel
from ..families import RouterOutput, RouterSpec


class Ranking(NamedTuple):
    """A token-by-expert ranking: ``index`` (n, S) experts, ``rank`` (n, S) their places (0 = best),
    ``selectable`` (n, S) False where the family cannot select the slot's expert for that token."""

    logits: torch.Tensor
    scores: torch.Tensor
    choice: torch.Tensor
    index: torch.Tensor
    rank: torch.Tensor
    selectable: torch.Tensor


def original_router_output(
    spec: RouterSpec, router: nn.Module, hidden_states: torch.Tensor, router_args: tuple[Any, ...]
) -> RouterOutput:
    """The router's own (unpatched) forward, decoded (for families whose training routing samples)."""
    forward = getattr(type(router), "_original_class", type(router)).forward
    return spec.decode(forward(router, hidden_states, *router_args))


def rank_experts(spec: RouterSpec, router: nn.Module, hidden_states: torch.Tensor, k_max: int) -> Ranking:
    """Each token's ``k_max`` best experts: the family's own top-k in its order, then the next best."""
    logits = spec.logits(router, hidden_states)
    scores = spec.scores(logits)
    choice = spec.choice(logits, scores)
    index, rank, selectable = spec.ranked(choice, k_max)
    return Ranking(logits, scores, choice, index, rank, selectable)


def keep_slots(
    spec: RouterSpec,
    ranking: Ranking,
    keep: torch.Tensor,
    *,
    renormalize: bool | None = None,
    hidden_dtype: torch.dtype | None = None,
) -> RouterOutput:
    """The routing that uses only the slots where ``keep`` (n, S) is True (at least one per token).

    Slots whose expert the family cannot select (-inf choice, outside a token's groups) are never
    kept. Weights follow the family's rules over the kept slots (``renormalize`` overrides them);
    unused slots get index m and weight exactly 0, even for a token whose scores are NaN (whose
    renormalisation would otherwise spread the NaN onto them).
    """
    valid = keep & ranking.selectable
    weights = spec.weights(
        ranking.logits,
        ranking.scores,
        ranking.index,
        valid,
        renormalize=renormalize,
        hidden_dtype=hidden_dtype,
    ).masked_fill(~valid, 0.0)
    return RouterOutput(ranking.logits, weights, to_sentinel(ranking.index, valid, spec.num_experts))


def selectable_experts(spec: RouterSpec, device: torch.device | str = "cpu") -> int:
    """How many experts a token can choose from (fewer than m under group-limited routing)."""
    if not spec.limits_groups:
        return spec.num_experts
    return spec.topk_groups * (spec.num_experts // spec.num_groups)


def weights_depend_on_chosen_set(spec: RouterSpec) -> bool:
    """Whether a slot's weight depends on which other experts the token uses (n/a -> a setting that
    renormalises over the kept experts would change nothing).

    True for families that renormalise the chosen weights (Mixtral, Qwen3-MoE, DeepSeek-V3, ...) and
    for softmax-over-the-chosen-logits routers (gpt-oss, GraniteMoE); False for Qwen1.5-MoE with
    ``norm_topk_prob=False``, DeepSeek-V2, OLMoE, Llama 4 and PhiMoE, whose weights are per expert.
    """
    return spec.kind.score == "softmax_topk" or (spec.renorm and spec.kind.score != "sparsemixer")


L = TypeVar("L", bound=nn.Module)


def patched_layers(model: nn.Module, layer_type: type[L], config_name: str) -> list[L]:
    """Every ``layer_type`` module of ``model`` (in module order).

    Raises ValueError naming ``config_name`` if the model has none (it was not patched with that method).
    """
    layers = [m for m in model.modules() if isinstance(m, layer_type)]
    if not layers:
        raise ValueError(
            f"This needs a model patched with {config_name}: patch_model(model, {config_name}()) first."
        )
    return layers


def calibrate_layers(
    layers: list[Any],
    budgets: float | dict[int, float],
    stats: dict[int, torch.Tensor],
    solve: Callable[[torch.Tensor, float], float],
    apply: Callable[[Any, float], None],
    what: str,
) -> dict[int, float]:
    """Per-layer budget calibration of a variable-k method: for every layer, ``solve(stats[i], budgets[i])``
    gives the setting that keeps that many experts per token; ``apply(layer, value)`` sets it.

    ``budgets`` is one mean k for every layer or ``{layer_index: mean_k}``. Returns ``{layer_index: value}``.
    Raises ValueError if a layer has no budget or no ``what`` (the calibration statistics' name).
    """
    out = {}
    for layer in layers:
        i = layer.layer_index
        budget = budgets if isinstance(budgets, (int, float)) else budgets.get(i)
        if budget is None or i not in stats:
            raise ValueError(f"No budget or no calibration {what} for MoE layer {i}.")
        out[i] = solve(stats[i], float(budget))
        apply(layer, out[i])
    return out


def collect_calibration(
    model: nn.Module, layers: list[Any], data: Any, batch_size: int, max_batches: int | None
) -> dict[int, torch.Tensor]:
    """Run ``model`` over ``data`` and return ``{layer_index: torch.cat(layer.calibration)}``.

    Every layer must have started collecting (``layer.calibration`` a list the forward appends to);
    its ``calibration`` is set back to None afterwards, also when a forward raises.
    """
    try:
        run_forwards(model, data, batch_size, max_batches=max_batches)
        return {layer.layer_index: torch.cat(layer.calibration) for layer in layers}
    finally:
        for layer in layers:
            layer.calibration = None
