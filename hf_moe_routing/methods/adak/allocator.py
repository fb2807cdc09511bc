"""The Ada-K allocator: one bias-free linear layer per MoE layer, a softmax over k = 1..k_max."""

from __future__ import annotations

import math

import torch
from torch import nn


class Allocator(nn.Module):
    """``P(k | h) = softmax(W h)_k`` for k = 1..k_max, with ``W`` (k_max, hidden) in float32.

    The input is the hidden state the router sees; it is cast to float32 and autocast is disabled,
    so the allocator computes in float32 whatever the model's dtype (it has k_max * hidden weights).
    Initialised like ``nn.Linear`` (uniform in +-1/sqrt(hidden)).
    """

    def __init__(self, hidden_size: int, k_max: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        if k_max < 1:
            raise ValueError(f"k_max must be >= 1, got {k_max}.")
        self.hidden_size = int(hidden_size)
        self.k_max = int(k_max)
        self.weight = nn.Parameter(
            torch.empty(self.k_max, self.hidden_size, dtype=torch.float32, device=device)
        )
        bound = 1.0 / math.sqrt(self.hidden_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (n, k_max) in float32 for hidden states (..., hidden_size)."""
        hidden = hidden.reshape(-1, self.hidden_size)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return nn.functional.linear(hidden.float(), self.weight)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, k_max={self.k_max}"
