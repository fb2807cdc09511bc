"""The interface every routing method implements, and the registry that finds methods by name.

A method is a config dataclass (serialises to JSON) plus a per-block :class:`RoutingLayer`
(an ``nn.Module`` stored as ``block.gate.routing``) that maps hidden states to
``(router_logits, top_k_weights, top_k_index)`` through the family adapter.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters import MoEAdapter, MoEBlock, MoEShape
from ..context import RoutingContext

#: routing_type -> config class
ROUTING_METHODS: dict[str, type[RoutingConfig]] = {}


def register_routing(cls: type[RoutingConfig]) -> type[RoutingConfig]:
    """Class decorator: make a routing config available by its ``routing_type`` name."""
    ROUTING_METHODS[cls.routing_type] = cls
    return cls


@dataclasses.dataclass
class RoutingConfig(abc.ABC):
    """Base class of routing configs (PEFT-style dataclasses that round-trip through JSON)."""

    routing_type: ClassVar[str] = ""
    #: True if tokens may use fewer experts than the model's top-k (needs sentinel-safe experts).
    variable_k: ClassVar[bool] = False

    def validate(self, shape: MoEShape) -> None:
        """Raise ValueError if the config cannot be applied to a model of this shape."""

    @abc.abstractmethod
    def create_layer(
        self, adapter: MoEAdapter, block: MoEBlock, shape: MoEShape, context: RoutingContext
    ) -> RoutingLayer:
        """The routing module for one MoE block."""

    def to_dict(self) -> dict[str, Any]:
        return {"routing_type": self.routing_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoutingConfig:
        """Build the right config subclass from :meth:`to_dict` output."""
        data = dict(data)
        name = data.pop("routing_type", cls.routing_type)
        target = get_routing_class(name)
        known = {f.name for f in dataclasses.fields(target)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"Unknown {name} routing settings {sorted(unknown)}; expected some of {sorted(known)}."
            )
        return target(**data)


def get_routing_class(name: str) -> type[RoutingConfig]:
    """The config class registered as ``name`` (ValueError listing the known names otherwise)."""
    if name not in ROUTING_METHODS:
        raise ValueError(f"Unknown routing {name!r}. Known routings: {', '.join(sorted(ROUTING_METHODS))}.")
    return ROUTING_METHODS[name]


class RoutingLayer(nn.Module, metaclass=abc.ABCMeta):
    """Routes the tokens of one MoE block. Subclasses implement :meth:`forward`.

    The adapter, block name and shared context are plain attributes (not submodules), so the
    layer's state dict holds only the method's own state (allocator weights, BIP duals, ...).
    """

    def __init__(self, adapter: MoEAdapter, block: MoEBlock, context: RoutingContext) -> None:
        super().__init__()
        self.adapter = adapter
        self.block_name = block.name
        self.layer_index = block.layer_index
        self.context = context

    @abc.abstractmethod
    def forward(
        self, gate: nn.Module, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(router_logits, top_k_weights, top_k_index)``; unused slots hold index m and weight 0."""

    def routing_state(self) -> dict[str, torch.Tensor]:
        """The state a routing adapter file stores for this layer (default: the layer's state dict)."""
        return dict(self.state_dict())

    def load_routing_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`routing_state` (strict: every key must match)."""
        self.load_state_dict(state, strict=True)

    def extra_repr(self) -> str:
        return f"layer={self.layer_index}, family={self.adapter.family}"
