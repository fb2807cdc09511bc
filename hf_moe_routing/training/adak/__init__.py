"""The Ada-K trainer: warm start and PPO of allocators on a frozen MoE model.

Parts: :mod:`.config` (settings, run state), :mod:`.data` (batches, sampling noise), :mod:`.rollout`
(forwards, rewards, advantages), :mod:`.update` (losses, gradient sync, dual ascent),
:mod:`.warmstart`, :mod:`.steps` (warm-up, PPO and evaluation steps), :mod:`.checkpoint`,
:mod:`.distributed` (FSDP2) and :mod:`.trainer` (the control loop).
"""

from .checkpoint import CheckpointError, allocator_state, latest_checkpoint, load_allocator_state
from .config import BASELINES, AdaKTrainingConfig, TrainerState
from .data import prepare_dataset
from .distributed import shard_frozen_model
from .trainer import AdaKTrainer, AdaKTrainOutput
from .update import AllocatorBank

__all__ = [
    "BASELINES",
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
    "shard_frozen_model",
]
