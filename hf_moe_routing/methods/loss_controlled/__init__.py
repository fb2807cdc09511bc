"""Loss-Controlled balancing: the auxiliary load-balancing loss added to the training loss."""

from .config import LossControlledConfig
from .layer import LossControlledLayer
from .loss import load_balancing_loss

__all__ = ["LossControlledConfig", "LossControlledLayer", "load_balancing_loss"]
