"""Top-p routing (Huang et al. 2024): the fewest experts whose probability mass reaches p."""

from .calibrate import calibrate_to_budget, collect_probs, p_for_budget, set_p
from .config import TopPConfig
from .layer import TopPLayer
from .routing import top_p_counts

__all__ = [
    "TopPConfig",
    "TopPLayer",
    "calibrate_to_budget",
    "collect_probs",
    "p_for_budget",
    "set_p",
    "top_p_counts",
]
