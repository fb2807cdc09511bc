"""Per-forward information that routers need but ``router(hidden_states)`` does not receive.

The router sees only the flattened hidden states ``(n, h)``. Which of those n tokens are padding
lives in the model's ``attention_mask``; a forward pre-hook on the patched model stores it here,
flattened to the tokens of the current forward (the last ``seq_len`` columns during cached
generation), and every routing layer and statistics collector reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class RoutingContext:
    """Shared by the routing layers of one patched model."""

    #: (n,) bool, True for real tokens of the current forward; None = all tokens are real.
    token_mask: torch.Tensor | None = None
    #: While True, every patched router runs its original (unpatched) forward: the model's own
    #: Top-K, used for reference measurements without rebuilding the patch.
    original_routers: bool = False
    #: Free slots for methods (e.g. auxiliary losses collected during a forward).
    extras: dict[str, Any] = field(default_factory=dict)

    def add_aux_loss(self, loss: torch.Tensor) -> None:
        """Record an auxiliary training loss produced during the current forward."""
        self.extras.setdefault("aux_losses", []).append(loss)

    def pop_aux_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary losses recorded since the last call (None if there were none)."""
        losses = self.extras.pop("aux_losses", [])
        return torch.stack([loss.float() for loss in losses]).sum() if losses else None

    def mask_for(self, num_tokens: int) -> torch.Tensor | None:
        """The token mask if it describes ``num_tokens`` tokens, else None (all real)."""
        mask = self.token_mask
        return mask if mask is not None and mask.numel() == num_tokens else None


def is_recomputing() -> bool:
    """True while autograd runs a backward pass (so a forward now is checkpoint recomputation).

    Routers with state (BIP's q, Loss-Free's bias) must then route as in the original forward and
    must not update twice. Under ``torch.compile`` this returns False (dynamo cannot trace the
    autograd engine's state; compiled models are not recomputed by activation checkpointing of
    the routing layer itself), so callers in eval mode never reach it.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def flat_token_mask(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Flattened ``attention_mask`` of a causal-LM forward call, restricted to its current tokens."""
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    current = ids if isinstance(ids, torch.Tensor) else embeds
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or current is None:
        return None
    seq_len = current.shape[1]
    return mask[:, -seq_len:].reshape(-1).bool()


def install_mask_hooks(model: nn.Module, context: RoutingContext) -> list:
    """Keep ``context.token_mask`` in step with ``model``'s forward calls; returns the hook handles."""

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        context.token_mask = flat_token_mask(args, kwargs)

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        context.token_mask = None

    return [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after),
    ]
