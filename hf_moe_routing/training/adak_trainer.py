"""Compatibility module: the Ada-K trainer now lives in :mod:`hf_moe_routing.training.adak`."""

from .adak.checkpoint import (
    ALLOCATORS_NAME,
    CHECKPOINT_PREFIX,
    LOG_NAME,
    OPTIMIZER_NAME,
    STATE_NAME,
    CheckpointError,
    allocator_state,
    latest_checkpoint,
    load_allocator_state,
)
from .adak.config import MIXED_PRECISIONS, AdaKTrainingConfig, TrainerState
from .adak.data import prepare_dataset
from .adak.trainer import AdaKTrainer, AdaKTrainOutput
from .adak.update import AllocatorBank

__all__ = [
    "ALLOCATORS_NAME",
    "CHECKPOINT_PREFIX",
    "LOG_NAME",
    "MIXED_PRECISIONS",
    "OPTIMIZER_NAME",
    "STATE_NAME",
    "AdaKTrainOutput",
    "AdaKTrainer",
    "AdaKTrainingConfig",
    "AllocatorBank",
    "CheckpointError",
    "TrainerState",
    "allocator_state",
    "latest_checkpoint",
    "load_allocator_state",
    "prepare_dataset",
]
