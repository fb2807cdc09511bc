"""Training loops: pre-training under any routing, small MoE builders and cached reference models."""

from .adak import AdaKTrainer, AdaKTrainingConfig
from .pretrain import PretrainConfig, PretrainResult, plot_max_vio, pretrain
from .reference import (
    MOE_SHAPES,
    REFERENCE_MODELS,
    build_moe_model,
    moe_config,
    reference_info,
    reference_model,
    reference_path,
)

__all__ = [
    "AdaKTrainer",
    "AdaKTrainingConfig",
    "MOE_SHAPES",
    "REFERENCE_MODELS",
    "PretrainConfig",
    "PretrainResult",
    "build_moe_model",
    "moe_config",
    "plot_max_vio",
    "pretrain",
    "reference_info",
    "reference_model",
    "reference_path",
]
