"""Dynamic expert skipping math (Lu et al. 2024, "Not All Experts are Equal: Efficient Expert Pruning
and Skipping for Mixture-of-Experts Large Language Models").

Each token first takes the family's top-k experts with routing scores ``w_(1) >= ... >= w_(k)``.
Expert j > 1 is skipped when its score is small next to the token's best one::

    keep_j = w_j >= beta_l * max_j' w_j'          (the best expert is always kept)

``beta_l`` is calibrated per MoE layer as a quantile (the paper: the median) of the ratios
``w_j / w_(1)``, j > 1, over calibration tokens, so that about that share of the non-top slots is skipped.
Ratios are scale-free: they are the same for raw scores and renormalised or scaled weights.
"""

from __future__ import annotations

import torch


def score_ratios(selected: torch.Tensor) -> torch.Tensor:
    """(n, k - 1) ratios ``w_j / w_(1)`` of each token's non-top selected scores to its top score."""
    ordered = selected.sort(dim=-1, descending=True).values
    return ordered[:, 1:] / ordered[:, :1].clamp_min(torch.finfo(ordered.dtype).tiny)


def skip_mask(selected: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """(n, k) bool, True for kept slots: ``w_j >= beta * max_j' w_j'`` (the best slot is always kept)."""
    top = selected.max(dim=-1, keepdim=True)
    keep = selected >= beta * top.values
    return keep.scatter(1, top.indices, True)


def calibrate_beta(ratios: torch.Tensor, quantile: float = 0.5) -> float:
    """``beta_l``: the ``quantile`` of the calibration ratios (0.5 = the median, as in the paper)."""
    flat = ratios.reshape(-1).float()
    if flat.numel() == 0:
        raise ValueError("No calibration tokens reached this layer: pass non-empty calibration data.")
    rank = min(flat.numel() - 1, max(0, int(round(quantile * (flat.numel() - 1)))))
    return float(flat.kthvalue(rank + 1).values)
