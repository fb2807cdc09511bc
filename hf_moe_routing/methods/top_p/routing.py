"""Top-p routing math (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models").

Experts are ranked by the family's choice scores; a token takes the shortest prefix of that ranking
whose routing probability mass reaches the threshold ``p``::

    P_i      = s_i / sum_j s_j                        (softmax families: P = s; sigmoid scores are normalised)
    k(token) = min(k_max, #eligible, min{k : sum_{r<=k} P_(r) >= p})

Unused slots hold the sentinel index ``m`` (the number of experts) and weight 0.
"""

from __future__ import annotations

import torch


def top_p_counts(sorted_probs: torch.Tensor, p: float, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Experts per token: ``k = #{r : sum_{r' < r} P_(r') < p}``, at least 1.

    ``sorted_probs`` (n, S) holds each token's probabilities in ranking order (S slots); rank r is taken
    while the mass of the ranks before it is still below ``p``, so the kept prefix is the shortest whose
    sum reaches ``p`` (capped at S). ``eligible`` (n, S) bool marks ranks the family allows (DeepSeek's
    group limit); the count never exceeds the number of eligible ranks. ``p >= 1`` takes every
    eligible rank: the exact mass before the last rank is below 1, though in float32 it may round
    to 1 (a saturated softmax), which must not cut the ranking short.
    """
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the higher ranks
    take = before < p if p < 1.0 else torch.ones_like(before, dtype=torch.bool)
    if eligible is not None:
        take = take & eligible
    return take.sum(dim=-1).clamp(min=1)
