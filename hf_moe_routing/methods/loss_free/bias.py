"""Loss-Free balancing (Wang et al., arXiv 2408.15664): a selection-only bias, updated by load sign."""

from __future__ import annotations

import torch


def token_loads(index: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``load_j = #{(i, slot) : index_i,slot = j, token i real}`` as float32 (m,); sentinels (>= m) ignored."""
    if mask is not None:
        index = index[mask.to(index.device)]
    flat = index.reshape(-1)
    flat = flat[flat < num_experts]
    return torch.bincount(flat, minlength=num_experts).float()


def bias_update(loads: torch.Tensor, update_rate: float) -> torch.Tensor:
    """``delta_j = u * sign(mean_j' load_j' - load_j)``: raise under-loaded experts, lower over-loaded ones."""
    return update_rate * torch.sign(loads.mean() - loads)
