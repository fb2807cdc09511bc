"""Router kinds: the composable parts every transformers top-k router is made of.

A learned top-k router turns the hidden states ``h`` (n, d) of n tokens into, per token, k expert
ids and k gating weights. Every family in transformers does it in the same five steps and differs
only in the choices below (each a field of :class:`RouterKind`)::

    h = norm(h) * scales                  input      (n, d)   optional (Gemma 4)
    z = h W^T (+ b)                       logits     (n, m)   "linear", "float32", "weight_dtype", "then_float32"
    s = score(z)                          scores     (n, m)   "softmax" | "sigmoid" (float32 or the logits' dtype)
    c = s + b_sel (or z for *_topk)       choice     (n, m)   selection bias; group limiting ("max" | "top2")
    I = topk(c, k)                        index      (n, k)   sorted or not
    g = weigh(s or z, I)                  weights    (n, k)   gather | softmax/sigmoid of the chosen logits;
                                                              renormalise (plain | eps | clamp), per-expert
                                                              scale, routed scale, cast

``score="softmax_topk"`` (gpt-oss, GraniteMoE) selects on the logits and weighs the chosen ones by a
softmax over their logits; ``score="sigmoid_topk"`` (Llama 4) weighs each chosen logit by a
sigmoid. The functions here are pure: the numbers a router needs (k, m, groups, factors) come
from a :class:`~hf_moe_routing.families.spec.RouterSpec`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..core.ops import renormalize

#: How the router computes logits from hidden states h and weight W.
LOGITS = ("linear", "float32", "weight_dtype", "then_float32")
#: Score functions; ``*_topk`` select on logits and weigh the chosen logits only.
SCORES = ("softmax", "sigmoid", "softmax_topk", "sigmoid_topk", "sparsemixer")
#: Group score of DeepSeek-style group-limited selection.
GROUP_SCORES = (None, "max", "top2")
#: Renormalisation of the chosen weights: ``never``, ``always``, or read ``norm_topk_prob``.
RENORMALIZE = ("never", "always", "attr")
#: The denominator: ``plain`` sum, ``eps`` sum + norm_eps, ``clamp`` max(sum, norm_min).
NORMS = ("plain", "eps", "clamp")
#: dtype of the returned weights: float32 as computed, the logits' dtype, the hidden states' dtype.
WEIGHTS_DTYPES = ("float32", "logits", "hidden")
#: dtype the score function runs in: float32, or the logits' own dtype (bf16 logits -> bf16 scores).
SCORE_DTYPES = ("float32", "logits")
#: What the router returns: transformers' ``(logits, weights, index)``; the same with the softmax
#: scores first (Gemma 4); ``(dense scores (n, m), logits)`` (Llama 4).
CODECS = ("triple", "scores_triple", "dense_scores")


@dataclass(frozen=True)
class RouterKind:
    """How a family's router scores, selects and weighs experts (see the module docstring).

    Attributes:
        input_norm: the router normalises its input and multiplies it by fixed scales before its
            projection (Gemma 4: ``norm(h) * scale * d**-0.5``); the spec names the modules.
        logits: ``"linear"`` ``F.linear(h, W)``; ``"float32"`` ``F.linear(h.float(), W.float())``;
            ``"weight_dtype"`` ``F.linear(h.to(W.dtype), W)``; ``"then_float32"`` ``F.linear(h, W).float()``.
        linear_bias: the router's linear layer adds its bias (gpt-oss).
        autocast: False if the family computes the router with autocast disabled (ERNIE 4.5).
        score: one of :data:`SCORES`.
        score_dtype: one of :data:`SCORE_DTYPES` (Mistral 4, LFM2-MoE and DBRX score in the logits' dtype).
        selection_bias: the family adds a learned bias to the scores for selection only
            (``e_score_correction_bias``, DeepSeek-V3 style); where it lives is family knowledge.
        group_score: DeepSeek group-limited selection (``"max"``: V2, ``"top2"``: V3), or None.
        sorted: whether the family's ``torch.topk`` returns sorted indices.
        renormalize: divide the chosen weights by their sum: ``never``, ``always``, ``attr``.
        norm: the denominator rule (:data:`NORMS`).
        expert_scale: multiply each chosen weight by a learned per-expert scale (Gemma 4).
        scaling: multiply the weights by the router's routed scaling factor.
        weights_dtype: one of :data:`WEIGHTS_DTYPES`.
        codec: what the router returns (:data:`CODECS`).
    """

    input_norm: bool = False
    logits: str = "linear"
    linear_bias: bool = False
    autocast: bool = True
    score: str = "softmax"
    score_dtype: str = "float32"
    selection_bias: bool = False
    group_score: str | None = None
    sorted: bool = True
    renormalize: str = "never"
    norm: str = "plain"
    expert_scale: bool = False
    scaling: bool = False
    weights_dtype: str = "logits"
    codec: str = "triple"

    def __post_init__(self) -> None:
        for name, choices in (
            ("logits", LOGITS),
            ("score", SCORES),
            ("group_score", GROUP_SCORES),
            ("renormalize", RENORMALIZE),
            ("norm", NORMS),
            ("weights_dtype", WEIGHTS_DTYPES),
            ("score_dtype", SCORE_DTYPES),
            ("codec", CODECS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"RouterKind({name}={getattr(self, name)!r}): choose one of {choices}.")

    @property
    def selects_on_logits(self) -> bool:
        """True when top-k runs on the logits (softmax/sigmoid of the chosen ones gives the weights)."""
        return self.score in ("softmax_topk", "sigmoid_topk", "sparsemixer")

    def replace(self, **changes: object) -> RouterKind:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """A short human-readable name, e.g. ``"sigmoid + bias, group top2, renorm, scaled"``."""
        parts = [self.score]
        if self.selection_bias:
            parts[0] += " + bias"
        if self.input_norm:
            parts.insert(0, "normed input")
        if self.group_score:
            parts.append(f"group {self.group_score}")
        if self.renormalize != "never":
            parts.append("renorm" + ("?" if self.renormalize == "attr" else ""))
        if self.expert_scale:
            parts.append("per-expert scale")
        if self.scaling:
            parts.append("scaled")
        if self.codec != "triple":
            parts.append(self.codec)
        return ", ".join(parts)


# ---- the steps ------------------------------------------------------------------------------------
def router_logits(
    kind: RouterKind, weight: torch.Tensor, bias: torch.Tensor | None, hidden: torch.Tensor
) -> torch.Tensor:
    """``z = h W^T (+ b)`` (n, m) with the family's dtype rule; ``hidden`` (n, d)."""
    context = (
        torch.autocast(device_type=hidden.device.type, enabled=False)
        if not kind.autocast
        else contextlib.nullcontext()
    )
    with context:
        if kind.logits == "float32":
            b = bias.float() if bias is not None else None
            return nn.functional.linear(hidden.float(), weight.float(), b)
        if kind.logits == "weight_dtype":
            return nn.functional.linear(hidden.to(weight.dtype), weight, bias)
        logits = nn.functional.linear(hidden, weight, bias)
        return logits.float() if kind.logits == "then_float32" else logits


def routing_scores(kind: RouterKind, logits: torch.Tensor) -> torch.Tensor:
    """Routing scores ``s`` (n, m): ``softmax(z)`` or ``sigmoid(z)``, float32 or in the logits' dtype.

    For kinds that select on logits, ``s = softmax(z)`` over all experts (float32): a
    probability-like score used by balancing and statistics (its per-token order is the logits').
    """
    in_logits_dtype = kind.score_dtype == "logits" and not kind.selects_on_logits
    if kind.score == "sigmoid":
        return logits.sigmoid() if in_logits_dtype else logits.float().sigmoid()
    if in_logits_dtype:
        return nn.functional.softmax(logits, dim=-1, dtype=logits.dtype)
    return nn.functional.softmax(logits, dim=-1, dtype=torch.float32)


def limit_to_groups(
    choice: torch.Tensor, num_groups: int, topk_groups: int, group_score: str
) -> torch.Tensor:
    """Keep the experts of each token's ``topk_groups`` best groups; the others get -inf.

    Experts form ``num_groups`` equal groups; a group scores the max of its choice scores
    (``"max"``, DeepSeek-V2) or the sum of its two largest (``"top2"``, DeepSeek-V3 / GLM-4.5).
    """
    n, m = choice.shape
    grouped = choice.view(n, num_groups, m // num_groups)
    if group_score == "top2":
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    group_idx = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, num_groups, m // num_groups).reshape(-1, m)
    return choice.masked_fill(~score_mask.bool(), float("-inf"))


def chosen_weights(
    kind: RouterKind,
    logits: torch.Tensor,
    scores: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor | None,
    renorm: bool,
    norm_value: float,
) -> torch.Tensor:
    """Unscaled, uncast weights (n, S) of the chosen slots; invalid (sentinel) slots get 0.

    ``softmax_topk``: a softmax over the chosen (valid) logits; ``sigmoid_topk``: ``sigmoid(z_j)``;
    otherwise ``s_j``, renormalised over the valid slots when ``renorm`` (never 0/0: see
    :func:`~hf_moe_routing.core.ops.renormalize`).
    """
    m = logits.shape[-1]
    safe = index.clamp(max=m - 1) if valid is not None else index
    if kind.score == "softmax_topk":
        chosen = logits.gather(1, safe)
        if valid is not None:
            chosen = chosen.masked_fill(~valid, float("-inf"))
        return nn.functional.softmax(chosen, dim=-1, dtype=chosen.dtype)
    if kind.score == "sigmoid_topk" and kind.codec == "dense_scores":
        # Llama 4 takes the sigmoid of the dense (n, m) matrix: evaluate it on the same layout (CPU
        # kernels round the vectorised body and the tail of a tensor differently)
        dense = torch.full_like(logits, float("-inf")).scatter(1, safe, logits.gather(1, safe))
        w = dense.float().sigmoid().to(logits.dtype).gather(1, safe)
    elif kind.score == "sigmoid_topk":
        w = logits.gather(1, safe).float().sigmoid()
    else:
        w = scores.gather(1, safe)
    if valid is not None:
        w = w.masked_fill(~valid, 0.0)
    if not renorm:
        return w
    if kind.norm == "clamp":
        return renormalize(w, minimum=norm_value)
    return renormalize(w, norm_value if kind.norm == "eps" else 0.0)


def sparsemixer_weights(logits: torch.Tensor, index: torch.Tensor, jitter_eps: float) -> torch.Tensor:
    """PhiMoE's inference-time SparseMixer multipliers (Liu et al. 2024, arXiv 2409.12136) of the
    chosen experts (n, S) in float32 logits' dtype.

    Slot 1 takes ``softmax`` over the experts within ``2 eps`` (relative) of the best logit; slot 2
    the same after masking slot 1's expert, as ``transformers.models.phimoe.sparsemixer`` with
    ``training=False``. Slots beyond the second reuse the rule with all earlier experts masked.
    """
    scores = logits
    out = []
    masked = scores
    for slot in range(index.shape[1]):
        chosen = index[:, slot : slot + 1].clamp(max=scores.shape[-1] - 1)
        with torch.no_grad():
            threshold = masked.max(dim=-1, keepdim=True).values
            factor = scores.abs().clamp(min=threshold)
            drop = ((threshold - scores) / factor) > (2 * jitter_eps)
        gates = torch.softmax(masked.masked_fill(drop, float("-inf")), dim=-1)
        out.append(gates.gather(-1, chosen))
        masked = torch.scatter(masked, -1, chosen, float("-inf"))
    return torch.cat(out, dim=-1)
