"""What a routing layer reports for ``export``: the changes a standard transformers checkpoint can hold.

A layer answers :meth:`~hf_moe_routing.methods.RoutingLayer.exported_routing` with an
:class:`ExportedRouting` (a new top-k, an offset to or a replacement of the family's selection bias),
or raises :class:`NotExportableError`; ``hub/export.py`` writes the checkpoint from those answers.
"""

from __future__ import annotations

import dataclasses

import torch


class NotExportableError(ValueError):
    """A routing that a standard transformers checkpoint cannot express exactly (per-token k, a
    router without a selection bias, a threshold); it can still be served through the vLLM plugin."""


@dataclasses.dataclass(frozen=True)
class ExportedRouting:
    """What one block's routing changes in a standard checkpoint (see :meth:`RoutingLayer.exported_routing`).

    Attributes:
        top_k: experts per token the exported config must hold, or None for the model's own.
        selection_offset: (m,) float32 added to the family's selection bias (BIP's ``-q``), or None.
        selection_bias: (m,) float32 that replaces the family's selection bias (Loss-Free), or None.
    """

    top_k: int | None = None
    selection_offset: torch.Tensor | None = None
    selection_bias: torch.Tensor | None = None
