"""Sentinel-safe experts implementation for variable numbers of experts per token.

Routers that give tokens fewer experts than the slot count mark unused slots with the sentinel
index ``num_experts`` and weight 0. transformers' ``eager`` experts skip them; ``batched_mm`` reads
out of bounds and ``grouped_mm`` handles them only under expert parallelism. This implementation
drops sentinel slots *before* any matmul, so a skipped expert costs no compute::

    keep    = {(i, s) : index[i, s] < E}                 # real (token, slot) pairs
    sort keep by expert, offsets = cumsum(count per expert)
    (under torch.compile all slots are sorted instead: sentinels, index E, land past offsets[-1]
     where grouped_mm never reads, so every shape is static and the graph has no break)
    y_p     = down_e( act(gate_up_e(x_i)) ) * w_is       # one grouped matmul per projection
    out_i   = sum over kept slots s of token i of y_p    # float32 accumulation

It is registered in transformers' ``ALL_EXPERTS_FUNCTIONS`` as ``"sentinel_grouped_mm"`` and
selected by ``patch_model`` for variable-k routings.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _grouped_linear

SENTINEL_EXPERTS = "sentinel_grouped_mm"


def sentinel_grouped_mm_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Experts forward that skips sentinel slots (``top_k_index == num_experts``) in every matmul."""
    num_slots = top_k_index.size(-1)
    flat_index = top_k_index.reshape(-1)
    # tokens per expert in a fixed-size tensor (bincount's size depends on the data, which compile can't use)
    counts = flat_index.new_zeros(self.num_experts + 1).scatter_add_(
        0, flat_index, torch.ones_like(flat_index)
    )
    offsets = torch.cumsum(counts[: self.num_experts], dim=0, dtype=torch.int32)
    if torch.compiler.is_compiling():
        # static shapes: sentinel slots sort to the tail, past offsets[-1], where grouped_mm never reads
        expert_ids, slots = torch.sort(flat_index, stable=True)
        kept = (expert_ids < self.num_experts).unsqueeze(-1)
        expert_ids = expert_ids.clamp(max=self.num_experts - 1)  # keeps bias gathers in bounds
    else:  # eager: drop sentinel slots before any work
        kept_slots = (flat_index < self.num_experts).nonzero().squeeze(-1)
        expert_ids, order = torch.sort(flat_index[kept_slots], stable=True)
        slots, kept = kept_slots[order], None
    tokens = torch.div(slots, num_slots, rounding_mode="floor")

    x = hidden_states[tokens]
    if kept is not None:  # zeroes the tail rows' gradients, which grouped_mm leaves uninitialised
        x = x.masked_fill(~kept, 0.0)
    if self.has_gate:
        bias = self.gate_up_proj_bias[expert_ids] if self.has_bias else None
        h = _grouped_linear(x, self.gate_up_proj, offsets, bias=bias, is_transposed=self.is_transposed)
        h = self._apply_gate(h)
    else:
        bias = self.up_proj_bias[expert_ids] if self.has_bias else None
        h = self.act_fn(
            _grouped_linear(x, self.up_proj, offsets, bias=bias, is_transposed=self.is_transposed)
        )
    bias = self.down_proj_bias[expert_ids] if self.has_bias else None
    y = _grouped_linear(h, self.down_proj, offsets, bias=bias, is_transposed=self.is_transposed)
    if self.has_post_expert_norm:
        y = self.post_expert_norm(y)
    if kept is not None:  # the tail rows of y are uninitialised (NaN * 0 is NaN): zero them first
        y = y.masked_fill(~kept, 0.0)
    y = y.float() * top_k_weights.reshape(-1)[slots, None].float()

    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    out.index_add_(0, tokens, y)
    return out.to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register(SENTINEL_EXPERTS, sentinel_grouped_mm_experts_forward)
