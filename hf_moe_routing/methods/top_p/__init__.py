"""Top-p routing (Huang et al. 2024): the fewest experts whose probability mass reaches p."""

from .config import TopPConfig
from .layer import TopPLayer
from .routing import top_p_counts

__all__ = ["TopPConfig", "TopPLayer", "top_p_counts"]
