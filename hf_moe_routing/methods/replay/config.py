"""Replay routing config: forwards take recorded experts as given (routing replay, R3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ...core.config import check_range
from ...core.context import RoutingContext
from ...families import MoEBlock, MoEModel
from ..base import RoutingConfig
from .layer import ReplayLayer


@dataclass
class ReplayConfig(RoutingConfig):
    """Routing replay: each real token uses the experts a recorded rollout chose for it.

    Weights are recomputed over those experts by the family's own rule from the current router
    (so gradients reach the router); padding, tokens past the record and forwards outside
    :func:`~hf_moe_routing.replay_routing` use the model's own Top-K. Use it through
    ``replay_routing(model, routed)``, which sets these fields from the record.

    Args:
        max_unrecorded: real tokens a row may have past its record (default 1: the last sampled
            token of a rollout is never forwarded, so the engine has no experts for it).
        sentinel_slots: the record has unused slots (recorded under a variable-k routing);
            the model then runs the sentinel-safe experts implementation.
    """

    routing_type: ClassVar[str] = "replay"
    max_unrecorded: int = 1
    sentinel_slots: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("ReplayConfig", "max_unrecorded", self.max_unrecorded, low=0)

    @property
    def variable_k(self) -> bool:  # type: ignore[override]
        """True when replayed tokens may use fewer experts than the slots (unused slots)."""
        return self.sentinel_slots

    def create_layer(self, block: MoEBlock, model: MoEModel, context: RoutingContext) -> ReplayLayer:
        return ReplayLayer(block, context)

    @classmethod
    def bad_settings(cls) -> Sequence[tuple[str, Any, type[Exception], str]]:
        return [
            ("max_unrecorded", -1, ValueError, r"must lie in \[0"),
            ("max_unrecorded", 1.5, TypeError, "integer"),
            ("max_unrecorded", True, TypeError, "integer"),
            ("sentinel_slots", "false", TypeError, "bool"),
        ]
