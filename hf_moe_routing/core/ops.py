"""Routing primitives shared by every layer above: loads, MaxVio, sentinel slots, safe normalisation.

A routing decision for n tokens, m routed experts and S slots per token is an ``index`` (n, S) long
tensor of expert ids and a ``weights`` (n, S) tensor; an unused slot (a token given fewer experts
than S) holds the *sentinel* index m and weight 0. Every function here is pure (no state, no
family knowledge) and works on any device.
"""

from __future__ import annotations

import torch


def tokens_per_expert(
    index: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``load_j = #{(i, s) : index_is = j, token i real}``: (m,) float32 loads.

    Args:
        index: (n, S) expert ids (or any shape whose first dim is tokens); sentinels (>= m) are not
            counted.
        num_experts: m.
        mask: optional (n,) bool, True for real tokens (padding is not counted).
    """
    index = index.reshape(index.shape[0], -1) if index.dim() else index.reshape(1, 1)
    if mask is None:
        counts = torch.ones(index.numel(), dtype=torch.float32, device=index.device)
    else:
        counts = mask.to(index.device, torch.float32)[:, None].expand_as(index).reshape(-1)
    loads = torch.zeros(num_experts + 1, dtype=torch.float32, device=index.device)
    loads.scatter_add_(0, index.reshape(-1).clamp(0, num_experts), counts)
    return loads[:num_experts]


def max_vio(loads: torch.Tensor) -> torch.Tensor:
    """MaxVio of each row of ``loads`` (..., m): ``(max_j load_j - mean_j load_j) / mean_j load_j``.

    Returns a float64 tensor of shape ``loads.shape[:-1]`` (a 0-dim tensor for one layer's (m,)
    loads; use ``float(...)`` for a number). Rows without load (no tokens) get 0. (Wang et al.,
    arXiv 2408.15664, Eq. 6.)
    """
    loads = loads.double()
    mean = loads.mean(dim=-1)
    vio = (loads.amax(dim=-1) - mean) / mean.clamp(min=torch.finfo(torch.float64).tiny)
    return torch.where(mean > 0, vio, torch.zeros_like(vio))


def slot_mask(counts: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(n, S) bool: slot s of token i is used iff ``s < counts_i`` (counts (n,) long)."""
    return torch.arange(num_slots, device=counts.device) < counts.unsqueeze(-1)


def to_sentinel(index: torch.Tensor, valid: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``index`` (n, S) with unused slots (``valid`` False) replaced by the sentinel ``num_experts``."""
    return index.masked_fill(~valid, num_experts)


def renormalize(weights: torch.Tensor, eps: float = 0.0, minimum: float | None = None) -> torch.Tensor:
    """``w_is / d_i`` with ``d_i = sum_s' w_is' + eps`` (or ``max(sum, minimum)``); never 0/0 = NaN.

    ``weights`` (n, S) of any float dtype; returns the same shape and dtype. A token whose chosen
    experts all have probability 0 (a softmax that underflowed: a router logit gap of ~100 or more,
    or a routing that moved the token onto such experts) keeps weight 0 on every slot instead of
    NaN: its routed output is 0, as those experts would contribute nothing at those probabilities
    anyway. Where ``d_i != 0`` the result is bit-identical to the plain division (the families'
    own rule). NaN inputs stay NaN (nothing is hidden).

    Args:
        eps: added to the sum (DeepSeek-V3's ``+ 1e-20``); minimum: the sum is clamped to at least
            this (ERNIE 4.5's ``norm_min``); at most one of the two applies (``minimum`` first).
    """
    total = weights.sum(dim=-1, keepdim=True)
    denominator = total
    if minimum is not None:
        denominator = total.clamp(min=minimum)
    elif eps:
        denominator = total + eps
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return weights / safe
