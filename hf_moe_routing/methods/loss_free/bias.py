"""Loss-Free balancing (Wang et al., arXiv 2408.15664, Algorithm 1): a selection-only bias per expert,
nudged after each batch by the sign of its load error::

    b_j <- b_j + u * sign(mean_j' load_j' - load_j)
"""

from __future__ import annotations

import torch


def bias_update(loads: torch.Tensor, update_rate: float) -> torch.Tensor:
    """``delta_j = u * sign(mean load - load_j)`` (m,): raise under-loaded experts, lower over-loaded ones."""
    return update_rate * torch.sign(loads.mean() - loads)
