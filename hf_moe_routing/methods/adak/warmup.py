"""Warm-start labels for Ada-K allocators (P-Warm, K-Warm), as pure tensor functions.

P-Warm (the paper's default) trains each allocator with cross-entropy on pseudo-labels

    n_i(p) = min { n : sum_{j <= n} P_i,(j) >= p }

where ``P_i,(1) >= P_i,(2) >= ...`` are token i's router probabilities in the router's own order of
choice, normalised to sum to 1 (softmax routers already do; sigmoid routers such as DeepSeek-V3 are
divided by their sum). The threshold p is chosen so that the mean of n_i(p) on calibration tokens is
closest to the model's default k. K-Warm labels every token with the default k.
"""

from __future__ import annotations

import torch

#: Warm-start methods.
WARMUP_METHODS = ("p-warm", "k-warm", "random")


def ordered_probabilities(scores: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Router probabilities (n, m) normalised to sum 1, gathered in the router's order ``order`` (n, k)."""
    probs = scores.float() / scores.float().sum(dim=-1, keepdim=True).clamp(min=1e-20)
    return probs.gather(-1, order)


def threshold_labels(ordered_probs: torch.Tensor, p: float) -> torch.Tensor:
    """``n_i(p)`` (n,) in 1..k: the fewest leading experts whose probabilities sum to at least p.

    ``ordered_probs`` (n, k) holds each token's probabilities in the router's order. If the first k
    never reach p (a cap k < m), the label is k.
    """
    cumulative = ordered_probs.float().cumsum(dim=-1)
    below = (cumulative < p).sum(dim=-1)
    return (below + 1).clamp(max=ordered_probs.shape[-1])


def label_means(ordered_probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Mean pseudo-label ``mean_i n_i(p)`` (C,) for each candidate threshold p (C,)."""
    if ordered_probs.numel() == 0:
        raise ValueError("No calibration tokens: the warm-up needs at least one real token.")
    return torch.stack([threshold_labels(ordered_probs, float(p)).float().mean() for p in candidates])


def pick_threshold(candidates: torch.Tensor, means: torch.Tensor, target_k: float) -> tuple[float, float]:
    """``argmin_p |mean n(p) - target_k|`` (ties go to the smallest p) and that mean."""
    best = int((means - target_k).abs().argmin())
    return float(candidates[best]), float(means[best])


def default_candidates() -> torch.Tensor:
    """Thresholds tried when choosing p: 0.01, 0.02, ..., 1.00."""
    return torch.linspace(0.01, 1.0, 100)


def choose_threshold(
    ordered_probs: torch.Tensor, target_k: float, candidates: torch.Tensor | None = None
) -> tuple[float, float]:
    """The p whose mean ``n_i(p)`` over the tokens (rows) is closest to ``target_k``, and that mean."""
    candidates = default_candidates() if candidates is None else candidates
    return pick_threshold(candidates, label_means(ordered_probs, candidates), target_k)


def constant_labels(num_tokens: int, k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """K-Warm labels: every token gets the default k."""
    return torch.full((num_tokens,), int(k), dtype=torch.long, device=device)


def warmup_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of allocator logits (n, k_max) on labels (n,) in 1..k_max (labels above k_max clamp)."""
    targets = labels.long().clamp(1, logits.shape[-1]) - 1
    losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    if mask is None:
        return losses.mean()
    mask = mask.to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)
