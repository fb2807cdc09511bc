"""The names of earlier versions, where families were called "adapters" (kept importable).

``MoEAdapter`` is :class:`MoEFamily`, ``ADAPTERS`` is :data:`FAMILIES`, ``register_adapter`` is
:func:`register_family`; ``get_adapter(model)`` returns ``(family, blocks)`` like
``describe_model(model)`` does in one object.
"""

from __future__ import annotations

from torch import nn

from . import FAMILIES, MoEBlock, MoEFamily, describe_model, register_family

MoEAdapter = MoEFamily
ADAPTERS = FAMILIES
register_adapter = register_family


def get_adapter(model: nn.Module, adapter: str | MoEFamily | None = None) -> tuple[MoEFamily, list[MoEBlock]]:
    """``(family, blocks)`` of ``model``: :func:`describe_model` under its earlier name."""
    described = describe_model(model, adapter)
    return described.family, list(described.blocks)
