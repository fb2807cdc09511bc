"""Where a model's decoder layers and attention modules are, and what their attention computes.

Used by FLOPs counting: the decoder layer list that holds the MoE blocks, each layer's attention
module with its heads and head dims, sliding windows, and linear-attention layers (MiniMax's
block-wise "lightning" attention).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

_LAYER_PATH = re.compile(r"^(.*?(?:layers|h|blocks|layer))\.(\d+)\.")


@dataclass(frozen=True)
class AttentionInfo:
    """What one decoder layer's attention is: its module, heads, head dims and kind."""

    name: str  # child name in the decoder layer
    module: nn.Module
    heads: int
    qk_head_dim: int
    v_head_dim: int
    kind: str  # "softmax", "lightning" (block-wise linear attention) or "linear" (other linear attention)
    block_size: int  # lightning attention's block length (0 otherwise)
    sliding_window: int | None


def decoder_layers(model: nn.Module, block_name: str) -> nn.ModuleList:
    """The decoder layer list holding the MoE block ``block_name`` (e.g. ``model.layers``).

    Raises ValueError if the block is not inside a ``layers``/``h``/``blocks``/``layer`` list.
    """
    match = _LAYER_PATH.match(block_name + ".")
    if match is None:
        raise ValueError(f"Cannot find the decoder layer list that holds {block_name}.")
    return model.get_submodule(match.group(1))


def attention_of(layer: nn.Module, config: Any, index: int) -> AttentionInfo:
    """The attention of decoder layer ``index`` (a child named ``*attn*`` / ``*attention*`` / ``mixer``)."""
    found = next(
        ((n, c) for n, c in layer.named_children() if "attn" in n or "attention" in n or n == "mixer"), None
    )
    if found is None:
        raise ValueError(
            f"{type(layer).__name__} has no attention submodule (a child named *attn* / *attention*)."
        )
    name, attn = found
    heads = int(
        getattr(attn, "num_heads", None)
        or getattr(attn, "num_attention_heads", None)
        or config.num_attention_heads
    )
    head_dim = (
        getattr(attn, "head_dim", None)
        or getattr(config, "head_dim", None)
        or config.hidden_size // config.num_attention_heads
    )
    lightning = hasattr(attn, "block_size") and hasattr(attn, "qkv_proj")  # MiniMax lightning attention
    kind = "lightning" if lightning else ("linear" if "linear" in type(attn).__name__.lower() else "softmax")
    return AttentionInfo(
        name=name,
        module=attn,
        heads=heads,
        qk_head_dim=int(getattr(attn, "qk_head_dim", None) or head_dim),
        v_head_dim=int(getattr(attn, "v_head_dim", None) or head_dim),
        kind=kind,
        block_size=int(getattr(attn, "block_size", 0)) if lightning else 0,
        sliding_window=_sliding_window(config, index),
    )


def _sliding_window(config: Any, index: int) -> int | None:
    """The sliding window of layer ``index``, as the model's mask functions read it."""
    if config is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is not None:
        return window if layer_types[index] == "sliding_attention" else None
    return window or None
