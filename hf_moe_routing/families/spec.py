"""One MoE block's router, resolved: its kind plus the numbers and tensors it reads.

A :class:`RouterSpec` is built once per MoE block by the family layer (see ``families/base.py``)
and is the only thing routing methods know about a family. Its steps reproduce the family's
router bit for bit (``spec.route``), and let a method change the *selection* (an offset such as
BIP's ``-q``, a different k, a per-token number of slots) while keeping the family's scoring and
weighting rules::

    logits  = spec.logits(router, hidden)              # (n, m), the family's dtype rules
    scores  = spec.scores(logits)                      # (n, m) float32
    choice  = spec.choice(logits, scores, offset)      # what top-k selects on
    index   = spec.topk(choice, k)                     # (n, k) in the family's order
    weights = spec.weights(logits, scores, index, valid, hidden_dtype=hidden.dtype)

Unused slots of variable-k routings hold the sentinel index m and weight 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ..core.ops import renormalize as normalize_rows
from .kinds import (
    RouterKind,
    chosen_weights,
    limit_to_groups,
    router_logits,
    routing_scores,
    sparsemixer_weights,
)


class RouterOutput(NamedTuple):
    """A routing decision: ``logits`` (n, m), ``weights`` (n, S), ``index`` (n, S) long (m = unused slot)."""

    logits: torch.Tensor
    weights: torch.Tensor
    index: torch.Tensor


@dataclass(frozen=True)
class TensorSlot:
    """Where a router reads a tensor that is not its own weight: ``getattr(owner, name)``.

    ``owner`` is the router, its block or a submodule (ERNIE's ``moe_statics``); the tensor is read
    at call time, so in-place updates (Loss-Free) and accelerate's offload hooks are seen.
    """

    owner: nn.Module = field(repr=False)
    name: str
    path: str  # for messages, e.g. "mlp.gate.e_score_correction_bias"

    def get(self) -> torch.Tensor:
        return getattr(self.owner, self.name)


@dataclass(frozen=True, eq=False)
class RouterSpec:
    """How one block's router routes: a :class:`RouterKind` with its numbers resolved.

    Attributes:
        kind: the router kind (score function, bias, groups, weighting, codec).
        num_experts: m, routed experts (the sentinel index is m).
        top_k: k, experts per token.
        hidden_size: d, the width of the hidden states the router reads.
        weight_name: attribute path of the router's (m, d) weight, e.g. ``"weight"`` or ``"wg.weight"``.
        bias_name: attribute path of the linear bias (gpt-oss), or None.
        renorm: whether the chosen weights are renormalised (``norm_topk_prob`` resolved).
        norm_value: the ``eps`` or ``min`` of the renormalisation denominator.
        scaling: the routed scaling factor, or None.
        num_groups, topk_groups: group-limited selection (DeepSeek), or None.
        selection_bias: where the selection bias lives, or None.
        jitter_eps: PhiMoE's SparseMixer epsilon.
        input_norm_name: attribute path of the router's input norm module (``kind.input_norm``).
        input_scale_names: attribute paths of the tensors / numbers the normed input is multiplied
            by, in order (Gemma 4: ``("scale", "scalar_root_size")``).
        expert_scale: where the (m,) per-expert weight scale lives (``kind.expert_scale``), or None.
        input_rank: 2 if the router takes (n, d) hidden states, 3 if it takes (batch, seq, d).
    """

    kind: RouterKind
    num_experts: int
    top_k: int
    hidden_size: int
    weight_name: str = "weight"
    bias_name: str | None = None
    renorm: bool = False
    norm_value: float = 0.0
    scaling: float | None = None
    num_groups: int | None = None
    topk_groups: int | None = None
    selection_bias: TensorSlot | None = None
    jitter_eps: float = 0.0
    input_norm_name: str | None = None
    input_scale_names: tuple[str, ...] = ()
    expert_scale: TensorSlot | None = None
    input_rank: int = 2

    # ---- the steps -------------------------------------------------------------------------------
    def weight(self, router: nn.Module) -> torch.Tensor:
        """The router's (m, d) weight."""
        return _get_path(router, self.weight_name)

    def logits(self, router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits (n, m) of hidden states (..., d), in the family's dtype."""
        hidden = hidden.reshape(-1, self.hidden_size)
        if self.kind.input_norm:
            hidden = _get_path(router, self.input_norm_name)(hidden)
            for name in self.input_scale_names:
                hidden = hidden * _get_path(router, name)
        bias = _get_path(router, self.bias_name) if self.bias_name else None
        return router_logits(self.kind, self.weight(router), bias, hidden)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Routing scores (n, m) float32 (softmax or sigmoid of the logits)."""
        return routing_scores(self.kind, logits)

    @property
    def limits_groups(self) -> bool:
        """Whether selection keeps only some expert groups per token (group-limited top-k)."""
        return bool(self.kind.group_score and self.num_groups and self.topk_groups < self.num_groups)

    def choice(
        self,
        logits: torch.Tensor,
        scores: torch.Tensor,
        offset: torch.Tensor | None = None,
        *,
        bias: torch.Tensor | None = None,
        limit_groups: bool = True,
    ) -> torch.Tensor:
        """What top-k selects on (n, m): ``s + b_sel + offset`` (or the logits), group-limited.

        Args:
            offset: (m,) added for selection only (BIP's ``-q``, Loss-Free's bias); None = the family's own.
            bias: the selection bias to use instead of the one the model holds (checkpoint replay).
            limit_groups: False skips group limiting (BIP's demand rounds), keeping the other rules.
        Experts outside a token's groups get -inf.
        """
        choice = logits if self.kind.selects_on_logits else scores
        if self.selection_bias is not None:
            choice = choice + (self.selection_bias.get() if bias is None else bias)
        if offset is not None:
            choice = choice + offset
        if limit_groups and self.limits_groups:
            choice = limit_to_groups(choice, self.num_groups, self.topk_groups, self.kind.group_score)
        return choice

    def topk(self, choice: torch.Tensor, k: int) -> torch.Tensor:
        """Indices (n, k) of the k best experts by ``choice``, exactly as the family selects them."""
        if self.kind.score == "sparsemixer":  # PhiMoE: successive argmax, not torch.topk
            picks, masked = [], choice
            for _ in range(k):
                best = masked.max(dim=-1, keepdim=True)[1]
                picks.append(best)
                masked = torch.scatter(masked, -1, best, float("-inf"))
            return torch.cat(picks, dim=-1)
        return torch.topk(choice, k, dim=-1, sorted=self.kind.sorted).indices

    def ranked(self, choice: torch.Tensor, k_max: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(index, rank, selectable)`` (n, k_max): the family's own top-k first, in its order, then the next best.

        ``rank[i, s]`` is slot s's position in token i's ranking by ``choice`` (0 = best), so the
        best j experts are the slots with ``rank < j``. At ``j = top_k`` these are exactly the
        family's experts, ties included (the selection rule is the family's own ``topk``).
        ``selectable[i, s]`` is False for slots whose expert the family cannot select for token i
        (outside its groups: -inf choice); such slots must stay unused.
        """
        k = min(self.top_k, k_max)
        base = self.topk(choice, self.top_k)
        base_scores = choice.gather(1, base)
        order = torch.sort(base_scores, dim=-1, descending=True, stable=True).indices
        positions = torch.arange(self.top_k, device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, positions)
        if k_max <= self.top_k:
            keep = rank < k_max  # the k_max best of the family's top-k, in the family's slot order
            index = base.masked_select(keep).view(-1, k_max)
            rank = rank.masked_select(keep).view(-1, k_max)
            return index, rank, torch.isfinite(choice.gather(1, index))
        rest = choice.scatter(1, base, float("-inf"))
        extra_values, extra = torch.topk(rest, k_max - k, dim=-1, sorted=True)
        extra_rank = torch.arange(k, k_max, device=extra.device).expand_as(extra)
        selectable = torch.cat([torch.isfinite(base_scores), torch.isfinite(extra_values)], dim=1)
        return torch.cat([base, extra], dim=1), torch.cat([rank, extra_rank], dim=1), selectable

    def weights(
        self,
        logits: torch.Tensor,
        scores: torch.Tensor,
        index: torch.Tensor,
        valid: torch.Tensor | None = None,
        *,
        renormalize: bool | None = None,
        hidden_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Gating weights (n, S) of the chosen slots, by the family's rules; invalid slots get 0.

        Args:
            valid: (n, S) bool, False for unused (sentinel) slots; None = all used.
            renormalize: override the family's renormalisation (Ada-K's ``renormalize``).
            hidden_dtype: dtype of the hidden states (families that cast weights to it).
        """
        renorm = self.renorm if renormalize is None else renormalize
        if self.kind.score == "sparsemixer":
            w = sparsemixer_weights(logits, index, self.jitter_eps)
            w = w if valid is None else w.masked_fill(~valid, 0.0)
            if renormalize:
                w = normalize_rows(w)
        else:
            w = chosen_weights(self.kind, logits, scores, index, valid, renorm, self.norm_value)
        if self.expert_scale is not None:  # Gemma 4: w_s *= scale[I_s]
            w = w * self.expert_scale.get()[index.clamp(max=self.num_experts - 1)]
        if self.scaling is not None:
            w = w * self.scaling
        if self.kind.weights_dtype == "logits":
            w = w.to(logits.dtype)
        elif self.kind.weights_dtype == "hidden" and hidden_dtype is not None:
            w = w.to(hidden_dtype)
        return w

    def route(self, router: nn.Module, hidden: torch.Tensor, k: int | None = None) -> RouterOutput:
        """The family's own top-k routing rebuilt from the steps (bit-identical at ``k = top_k``)."""
        logits = self.logits(router, hidden)
        scores = self.scores(logits)
        index = self.topk(self.choice(logits, scores), self.top_k if k is None else k)
        return RouterOutput(logits, self.weights(logits, scores, index, hidden_dtype=hidden.dtype), index)

    # ---- the checkpoint's own routing state ----------------------------------------------------------
    def read_tensors(self, router: nn.Module, router_name: str = "router") -> dict[str, torch.Tensor]:
        """Every tensor the routing steps read from the checkpoint, by module path.

        The router's weight and linear bias, its input norm's parameters and input scales (Gemma 4),
        the selection bias (DeepSeek-V3's ``e_score_correction_bias``, wherever it lives) and the
        per-expert scale. Numbers that are not tensors are left out.
        """
        found: dict[str, torch.Tensor] = {f"{router_name}.{self.weight_name}": self.weight(router)}
        if self.bias_name:
            found[f"{router_name}.{self.bias_name}"] = _get_path(router, self.bias_name)
        if self.kind.input_norm and self.input_norm_name:
            norm = _get_path(router, self.input_norm_name)
            for name, tensor in [*norm.named_parameters(), *norm.named_buffers()]:
                found[f"{router_name}.{self.input_norm_name}.{name}"] = tensor
            for name in self.input_scale_names:
                found[f"{router_name}.{name}"] = _get_path(router, name)
        for slot in (self.selection_bias, self.expert_scale):
            if slot is not None:
                found[slot.path] = slot.get()
        return {k: v for k, v in found.items() if isinstance(v, torch.Tensor)}

    def check_finite(self, router: nn.Module, router_name: str, layer_index: int) -> None:
        """Refuse a checkpoint whose routing state (see :meth:`read_tensors`) holds NaN or infinity.

        Tensors offloaded to the meta device are not checked (their values are not here).

        Raises:
            ValueError: naming the tensor, the layer and how many values are bad.
        """
        refuse_non_finite(self.read_tensors(router, router_name), layer_index)

    # ---- the router's interface ------------------------------------------------------------------
    def encode(self, output: RouterOutput) -> tuple[torch.Tensor, ...]:
        """Our decision in the format the original router returns (its block consumes this)."""
        if self.kind.codec == "dense_scores":  # Llama 4: (n, m) scores with 0 for unchosen experts
            logits, weights, index = output
            n, m = logits.shape
            dense = weights.new_zeros(n, m + 1).scatter_(1, index, weights)[:, :m]
            return dense, logits
        if self.kind.codec == "scores_triple":  # Gemma 4 returns its softmax scores first
            return self.scores(output.logits), output.weights, output.index
        return tuple(output)

    def decode(self, output: object) -> RouterOutput:
        """The routing decision inside an (original or patched) router's output.

        For a ``"scores_triple"`` router the first field holds its scores, not logits.
        """
        if not isinstance(output, tuple) or len(output) < 2:
            raise TypeError(f"A {self.kind.codec} router returns a tuple, got {type(output).__name__}.")
        if self.kind.codec == "dense_scores":
            dense, logits = output[0], output[1]
            m = dense.shape[-1]
            chosen = dense != 0
            index = torch.where(chosen, torch.arange(m, device=dense.device), m)
            return RouterOutput(logits, dense, index)
        return RouterOutput(*output[:3])


def _get_path(module: nn.Module, path: str) -> torch.Tensor:
    for part in path.split("."):
        module = getattr(module, part)
    return module  # type: ignore[return-value]


def refuse_non_finite(tensors: dict[str, torch.Tensor], layer_index: int) -> None:
    """Raise if a floating tensor of ``tensors`` (path -> tensor) holds NaN or infinity.

    Tensors on the meta device (offloaded: their values are not here) are skipped.

    Raises:
        ValueError: naming the tensor, the layer and how many values are bad.
    """
    for path, tensor in tensors.items():
        if tensor.device.type == "meta" or not tensor.is_floating_point():
            continue
        finite = torch.isfinite(tensor.detach())
        if bool(finite.all()):
            continue
        bad = int((~finite).sum())
        kinds = " and ".join(
            word
            for word, present in (
                ("NaN", bool(torch.isnan(tensor).any())),
                ("infinite", bool(torch.isinf(tensor).any())),
            )
            if present
        )
        raise ValueError(
            f"Layer {layer_index}: the checkpoint's {path} holds {kinds} values ({bad} of "
            f"{tensor.numel()}); routing with it would route on garbage (and fitting would save a "
            "corrupt adapter). The model was left unpatched: repair or reload the checkpoint."
        )
