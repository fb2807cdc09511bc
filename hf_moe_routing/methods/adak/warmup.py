"""Warm starts for Ada-K allocators (P-Warm, K-Warm, Skip-Warm), as pure tensor functions.

P-Warm (the paper's default, Yue et al. 2025 Sec. 3.3) trains each allocator with cross-entropy on

    n_i(p) = min { n : sum_{j <= n} P_i,(j) >= p }

where ``P_i,(1), P_i,(2), ...`` are token i's router probabilities in the router's own order of
choice, normalised to sum to 1 (sigmoid routers such as DeepSeek-V3 are divided by their sum); p is
chosen so that the mean of n_i(p) on calibration tokens is closest to a target (the model's k).

K-Warm labels every token with the model's top-k. Skip-Warm labels token i with the experts that
dynamic skipping (Lu et al. 2024) keeps: the leading ranks j whose log-probability gap to the best
expert ``d_ij = log P_i,(j) - log P_i,(1)`` stays above ``log beta_l``, with ``beta_l`` calibrated per
layer so that the mean label is the target.

An allocator with a bias and router inputs (``"hidden+router"``) represents both exactly, with no
training: :func:`k_warm_init` (``z_k = s [k = top_k]``) and :func:`skip_warm_init`
(``z_k = s sum_{j=2..k} (d_j - log beta)``, whose argmax is the dynamic-skipping count whenever
``d_j`` decreases along the ranking, as it does for every softmax router). The paper's bias-free
allocator on the hidden state learns the same labels by cross-entropy (:func:`warmup_loss`).
"""

from __future__ import annotations

import torch

from .allocator import Allocator

#: Warm-start methods.
WARMUP_METHODS = ("k-warm", "skip-warm", "p-warm", "random")


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


# ---- Skip-Warm -----------------------------------------------------------------------------------
def _gaps(ordered_probs: torch.Tensor) -> torch.Tensor:
    """(n, k - 1) running minima of ``log P_(j) - log P_(1)``, j = 2..k (label >= j iff gap >= log beta)."""
    logp = ordered_probs.float().clamp_min(1e-9).log()
    gaps = logp[:, 1:] - logp[:, :1]
    return torch.cummin(gaps, dim=-1).values if gaps.shape[-1] else gaps


def skip_labels(ordered_probs: torch.Tensor, log_beta: float) -> torch.Tensor:
    """Dynamic-skipping counts (n,) in 1..k: the leading ranks whose gap to the best stays >= log beta."""
    return 1 + (_gaps(ordered_probs) >= log_beta).sum(dim=-1)


def calibrate_skip_threshold(ordered_probs: torch.Tensor, target_k: float) -> float:
    """``log beta`` whose :func:`skip_labels` have mean ``target_k`` on these tokens (up to ties).

    ``ordered_probs`` (n, k) in ranking order. ``target_k <= 1`` gives +inf-like (every label 1),
    ``target_k >= k`` -inf-like (every label k). Raises ValueError for no tokens.
    """
    if ordered_probs.shape[0] == 0:
        raise ValueError("No calibration tokens: Skip-Warm needs at least one real token.")
    values = _gaps(ordered_probs).reshape(-1).sort(descending=True).values
    count = int(round((target_k - 1.0) * ordered_probs.shape[0]))
    if count <= 0 or values.numel() == 0:
        return 1e4
    if count >= values.numel():
        return float(values[-1]) - 1.0
    return float(values[count - 1] + values[count]) / 2.0


# ---- exact closed-form starts ----------------------------------------------------------------------
def _require_bias(allocator: Allocator, name: str) -> None:
    if allocator.bias is None:
        raise ValueError(
            f"The exact {name} start needs an allocator with a bias (AdaKConfig(allocator_bias=True)); "
            "the paper's bias-free allocator learns it by cross-entropy (warmup_steps > 0)."
        )


def k_warm_init(allocator: Allocator, k: int, scale: float) -> None:
    """Set the allocator to ``z = scale * onehot(k)`` for every token: greedy k is exactly ``k``."""
    _require_bias(allocator, "K-Warm")
    if not 1 <= k <= allocator.k_max:
        raise ValueError(f"k={k} is outside the allocator's choices 1..{allocator.k_max}.")
    with torch.no_grad():
        for param in allocator.parameters():
            param.zero_()
        allocator.bias[k - 1] = scale


def skip_warm_init(allocator: Allocator, log_beta: float, scale: float) -> None:
    """Set ``z_k = scale * sum_{j=2..k} (log P_(j) - log P_(1) - log beta)`` (z_1 = 0).

    The greedy choice is then the dynamic-skipping count of :func:`skip_labels`. Needs router inputs
    covering all k_max ranks and a bias (ValueError otherwise).
    """
    _require_bias(allocator, "Skip-Warm")
    if allocator.router_features < allocator.k_max:
        raise ValueError(
            "The exact Skip-Warm start needs an allocator that sees the router (allocator_input="
            "'hidden+router'); the paper's allocator learns Skip-Warm labels by cross-entropy."
        )
    k_max = allocator.k_max
    with torch.no_grad():
        for param in allocator.parameters():
            param.zero_()
        for k in range(2, k_max + 1):
            allocator.router_weight[k - 1, 0] = -scale * (k - 1)
            allocator.router_weight[k - 1, 1:k] = scale
            allocator.bias[k - 1] = -scale * (k - 1) * log_beta
