"""The Ada-K allocator: one small linear layer per MoE layer, a softmax over k = 1..k_max.

Two inputs (``AdaKConfig.allocator_input``):

* ``"hidden"`` -- the paper's allocator (Yue et al. 2025, Eq. 4): ``P(k | h) = softmax(W h)_k`` on the
  hidden state the router sees;
* ``"hidden+router"`` -- the same linear map on the hidden state *and* the router's sorted
  log-probabilities ``log P_(1) >= ... >= log P_(k_max)`` (the confidence signal dynamic skipping
  uses): ``softmax(W h + U log P_sorted + b)_k``.

``allocator_bias`` adds ``b`` (the paper's allocator has none); with it, K-Warm and Skip-Warm have
exact closed-form starts (:mod:`.warmup`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: Inputs an allocator can see.
ALLOCATOR_INPUTS = ("hidden", "hidden+router")

#: Router log-probabilities are clamped here (a probability of 1e-9) so features stay finite.
MIN_LOG_PROB = math.log(1e-9)


class Allocator(nn.Module):
    """Allocator logits (n, k_max) in float32 from features (n, hidden_size + router_features).

    Parameters (all float32, ``nn.Linear``-style uniform init in +-1/sqrt(fan_in)):
    ``weight`` (k_max, hidden_size); ``router_weight`` (k_max, router_features) if the allocator
    sees the router; ``bias`` (k_max,) if ``bias``. Autocast is disabled inside, so the allocator
    computes in float32 whatever the model's dtype.

    Raises ValueError for ``k_max < 1`` or ``router_features < 0``.
    """

    def __init__(
        self,
        hidden_size: int,
        k_max: int,
        *,
        router_features: int = 0,
        bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if k_max < 1:
            raise ValueError(f"k_max must be >= 1, got {k_max}.")
        if router_features < 0:
            raise ValueError(f"router_features must be >= 0, got {router_features}.")
        self.hidden_size = int(hidden_size)
        self.k_max = int(k_max)
        self.router_features = int(router_features)
        kwargs = dict(dtype=torch.float32, device=device)
        self.weight = nn.Parameter(torch.empty(self.k_max, self.hidden_size, **kwargs))
        self.router_weight = (
            nn.Parameter(torch.empty(self.k_max, self.router_features, **kwargs))
            if self.router_features
            else None
        )
        self.bias = nn.Parameter(torch.empty(self.k_max, **kwargs)) if bias else None
        self.reset_parameters()

    @property
    def in_features(self) -> int:
        return self.hidden_size + self.router_features

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Uniform init in +-1/sqrt(in_features) (``nn.Linear``'s), from ``generator`` if given."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            for param in self.parameters():
                values = torch.rand(param.shape, generator=generator, dtype=torch.float32)
                param.copy_((values * 2 - 1) * bound)

    def features(self, hidden: torch.Tensor, ordered_probs: torch.Tensor | None) -> torch.Tensor:
        """The allocator's input (n, in_features) float32: hidden (..., hidden_size) [+ log P sorted].

        ``ordered_probs`` (n, >= router_features) are the router probabilities in ranking order
        (needed only when the allocator sees the router).
        """
        hidden = hidden.reshape(-1, self.hidden_size).float()
        if not self.router_features:
            return hidden
        if ordered_probs is None:
            raise ValueError("This allocator sees the router: pass the ordered router probabilities.")
        logp = ordered_probs[:, : self.router_features].float().clamp_min(1e-9).log()
        return torch.cat([hidden, logp.clamp_min(MIN_LOG_PROB)], dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (n, k_max) float32 for features (n, in_features) (see :meth:`features`)."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            features = features.float()
            logits = nn.functional.linear(features[:, : self.hidden_size], self.weight, self.bias)
            if self.router_weight is not None:
                logits = logits + nn.functional.linear(features[:, self.hidden_size :], self.router_weight)
            return logits

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, k_max={self.k_max}, "
            f"router_features={self.router_features}, bias={self.bias is not None}"
        )
