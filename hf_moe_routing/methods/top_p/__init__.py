from .config import TopPConfig
from .layer import TopPLayer
from .routing import slot_mask, to_sentinel, top_p_counts

__all__ = ["TopPConfig", "TopPLayer", "slot_mask", "to_sentinel", "top_p_counts"]
