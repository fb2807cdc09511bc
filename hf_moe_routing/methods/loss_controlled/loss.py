"""The auxiliary load-balancing loss (Switch Transformer / Mixtral style)."""

from __future__ import annotations

import torch


def load_balancing_loss(
    scores: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None = None, num_sequences: int = 1
) -> torch.Tensor:
    """``L = mean over sequences b of  m * sum_j f_bj P_bj``  (1 at perfectly even routing).

    With ``n_b`` real tokens in sequence b, k experts per token and m experts:

        f_bj = count of (token, slot) pairs of b routed to j / (k n_b)     (no gradient)
        P_bj = mean over real tokens i of b of  s_ij / sum_j' s_ij'        (differentiable)

    ``num_sequences=1`` is the batch-level loss of Switch/Mixtral (their f counts assignments per
    slot; this one divides by k, so the value does not grow with k). With ``num_sequences = B``
    the n = B * L tokens are split into B sequences of equal length (the per-sequence variant of
    DeepSeek-V3). The score normalisation makes sigmoid scores comparable to softmax ones.
    """
    n, m = scores.shape
    k = index.shape[1]
    if n == 0:
        return scores.sum() * 0.0
    weight = scores.new_ones(n) if mask is None else mask.to(scores.device, scores.dtype)
    probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    probs = probs.view(num_sequences, -1, m)
    weight = weight.view(num_sequences, -1)
    tokens = weight.sum(dim=1).clamp_min(1.0)  # (B,)
    mean_prob = (probs * weight.unsqueeze(-1)).sum(dim=1) / tokens.unsqueeze(-1)  # (B, m)
    slots = index.clamp(max=m - 1).view(num_sequences, -1)
    slot_weight = (weight.unsqueeze(-1) * (index < m).view(num_sequences, -1, k)).reshape(num_sequences, -1)
    counts = torch.zeros(num_sequences, m, device=scores.device, dtype=scores.dtype)
    counts.scatter_add_(1, slots, slot_weight.to(scores.dtype))
    fraction = (counts / (k * tokens.unsqueeze(-1))).detach()
    per_sequence = m * (fraction * mean_prob).sum(dim=-1)  # (B,)
    has_tokens = (weight.sum(dim=1) > 0).to(per_sequence.dtype)
    return (per_sequence * has_tokens).sum() / has_tokens.sum().clamp_min(1.0)


class AuxLossScaler(torch.autograd.Function):
    """Identity on ``output`` whose backward also sends gradient 1 into ``aux_loss``.

    Attaching a loss to a tensor of the main graph makes its gradient flow without adding it to the
    training loss (Megatron-LM's ``MoEAuxLossAutoScaler``): used when a forward is recomputed by
    reentrant activation checkpointing, whose original forward had no graph to add the loss to.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(aux_loss)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: ANN001, ANN205
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.ones_like(aux_loss)
