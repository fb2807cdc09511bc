from .calibrate import calibrate
from .config import DynamicSkipConfig
from .layer import DynamicSkipLayer
from .routing import calibrate_beta, score_ratios, skip_mask

__all__ = [
    "DynamicSkipConfig",
    "DynamicSkipLayer",
    "calibrate",
    "calibrate_beta",
    "score_ratios",
    "skip_mask",
]
