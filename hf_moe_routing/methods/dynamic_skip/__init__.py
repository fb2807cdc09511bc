from .calibrate import beta_for_budget, calibrate, calibrate_to_budget, collect_ratios
from .config import DynamicSkipConfig
from .layer import DynamicSkipLayer
from .routing import calibrate_beta, score_ratios, skip_mask

__all__ = [
    "DynamicSkipConfig",
    "DynamicSkipLayer",
    "beta_for_budget",
    "calibrate",
    "calibrate_to_budget",
    "collect_ratios",
    "calibrate_beta",
    "score_ratios",
    "skip_mask",
]
