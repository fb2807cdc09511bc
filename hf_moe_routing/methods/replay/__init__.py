"""Routing replay (R3): record the experts of a rollout, replay them in the training forward."""

from .config import ReplayConfig
from .layer import ReplayLayer, ReplayPlan
from .record import RoutedExperts, RoutingChanges
from .session import Recorder, Replayer

__all__ = [
    "Recorder",
    "ReplayConfig",
    "ReplayLayer",
    "ReplayPlan",
    "Replayer",
    "RoutedExperts",
    "RoutingChanges",
]
