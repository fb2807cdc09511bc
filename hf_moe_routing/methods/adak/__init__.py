"""Ada-K routing (Yue et al., ICLR 2025): learned per-token expert counts, trained with PPO."""

from ..routing import selectable_experts
from .allocator import ALLOCATOR_INPUTS, Allocator
from .config import AdaKConfig
from .layer import AdaKLayer, AllocatorRecord, adak_layers, default_routing, recording

__all__ = [
    "ALLOCATOR_INPUTS",
    "AdaKConfig",
    "AdaKLayer",
    "Allocator",
    "AllocatorRecord",
    "adak_layers",
    "default_routing",
    "recording",
    "selectable_experts",
]
