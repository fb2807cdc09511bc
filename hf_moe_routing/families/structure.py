"""Where a model's decoder layers and token mixers are, and what their attention computes.

Used by FLOPs counting. Each decoder layer has at most one *token mixer*: its attention, or what a
hybrid family puts in its place (Mamba, gated DeltaNet, short convolutions, ...). A mixer is

* ``"softmax"``: plain softmax attention (multi-head, grouped-query, MLA; sliding-window or chunked
  masks) whose cost is its projections plus ``2 H ctx (d_qk + d_v)`` per token;
* ``"lightning"``: MiniMax's block-wise linear attention, counted in closed form;
* ``"other"``: anything else (state-space and linear-attention mixers, convolutions, attention with
  an indexer or other matmul-bearing submodules), whose exact cost depends on its implementation;
* ``"none"``: the layer has no token mixer (NemotronH's MoE or MLP layers).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

_LAYER_PATH = re.compile(r"^(.*?(?:layers|h|blocks|layer))\.(\d+)\.")
#: Child names under which a decoder layer holds its token mixer.
MIXER_NAMES = (
    "self_attn",
    "self_attention",
    "attention",
    "attn",
    "linear_attn",
    "linear_attention",
    "mamba",
    "mixer",
    "conv",
    "ssm",
)
#: Class-name parts of modules that are feed-forward blocks, not token mixers (NemotronH's ``mixer``).
_FEED_FORWARD = re.compile(r"(MLP|MoE|Moe|Experts|FeedForward|MoeBlock)$")
#: Submodules plain attention may hold (the rest are matmul-bearing parts such as indexers).
_PLAIN_PART = re.compile(r"(Norm|Rotary|Dropout|Identity|Activation|Act)")
_ATTENTION_CALL = ("attention_interface", "eager_attention_forward", "ALL_ATTENTION_FUNCTIONS")


@dataclass(frozen=True)
class AttentionInfo:
    """One decoder layer's token mixer: its module, heads, head dims and kind (module docstring)."""

    name: str  # child name in the decoder layer ("" if none)
    module: nn.Module | None
    heads: int
    qk_head_dim: int
    v_head_dim: int
    kind: str  # "softmax", "lightning", "other" or "none"
    block_size: int  # lightning attention's block length (0 otherwise)
    sliding_window: int | None
    chunk_size: int | None = None  # chunked attention (Llama 4): queries see keys of their chunk only


def decoder_layers_name(block_name: str) -> str:
    """Module path of the decoder layer list holding the MoE block ``block_name`` (e.g. ``model.layers``).

    Raises ValueError if the block is not inside a ``layers``/``h``/``blocks``/``layer`` list.
    """
    match = _LAYER_PATH.match(block_name + ".")
    if match is None:
        raise ValueError(f"Cannot find the decoder layer list that holds {block_name}.")
    return match.group(1)


def attention_of(
    layer: nn.Module, config: Any, index: int, exclude: tuple[nn.Module, ...] = ()
) -> AttentionInfo:
    """The token mixer of decoder layer ``index``: a child named in :data:`MIXER_NAMES` that is not a
    feed-forward block (nor one of ``exclude``, e.g. the layer's MoE block)."""
    found = next(
        (
            (n, c)
            for n, c in layer.named_children()
            if n in MIXER_NAMES
            and not any(c is e for e in exclude)
            and not _FEED_FORWARD.search(type(c).__name__)
        ),
        None,
    )
    if found is None:
        return AttentionInfo("", None, 0, 0, 0, "none", 0, None)
    name, attn = found
    lightning = hasattr(attn, "block_size") and hasattr(attn, "qkv_proj")  # MiniMax lightning attention
    kind = "lightning" if lightning else ("softmax" if _is_plain_attention(attn) else "other")
    heads = getattr(attn, "num_heads", None) or getattr(attn, "num_attention_heads", None)
    heads = int(heads or getattr(config, "num_attention_heads", 0) or 0)
    head_dim = getattr(attn, "head_dim", None) or getattr(config, "head_dim", None)
    if head_dim is None and heads:
        head_dim = config.hidden_size // config.num_attention_heads
    return AttentionInfo(
        name=name,
        module=attn,
        heads=heads,
        qk_head_dim=int(getattr(attn, "qk_head_dim", None) or head_dim or 0),
        v_head_dim=int(getattr(attn, "v_head_dim", None) or head_dim or 0),
        kind=kind,
        block_size=int(getattr(attn, "block_size", 0)) if lightning else 0,
        sliding_window=_sliding_window(config, index),
        chunk_size=_chunk_size(config, index),
    )


def _is_plain_attention(module: nn.Module) -> bool:
    """Softmax attention through transformers' attention interface, with only linear / norm parts."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    if not any(call in source for call in _ATTENTION_CALL):
        return False
    return all(
        isinstance(child, (nn.Linear, nn.Dropout, nn.Identity))
        or isinstance(getattr(child, "base_layer", None), nn.Linear)  # a PEFT adapter on a linear layer
        or _PLAIN_PART.search(type(child).__name__)
        for child in module.children()
    )


def _layer_type(config: Any, index: int) -> str | None:
    layer_types = getattr(config, "layer_types", None)
    return layer_types[index] if layer_types is not None and index < len(layer_types) else None


def _sliding_window(config: Any, index: int) -> int | None:
    """The sliding window of layer ``index``, as the model's mask functions read it."""
    if config is None:
        return None
    window = getattr(config, "sliding_window", None)
    if getattr(config, "layer_types", None) is not None:
        return window if _layer_type(config, index) == "sliding_attention" else None
    return window or None


def _chunk_size(config: Any, index: int) -> int | None:
    """The attention chunk of layer ``index`` (``"chunked_attention"`` layers), else None."""
    if config is None or _layer_type(config, index) != "chunked_attention":
        return None
    return getattr(config, "attention_chunk_size", None)


def is_linear_only(module: nn.Module) -> bool:
    """Whether every parameter of ``module`` sits in an ``nn.Linear`` or a norm (its matmul cost is
    then the sum of its linear layers'); False for modules that multiply by other parameters
    (hyper-connections, convolutions, state-space mixers)."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear) or _PLAIN_PART.search(type(sub).__name__):
            continue
        if any(p.dim() >= 2 for p in sub.parameters(recurse=False)):
            return False
    return True


def experts_compute_all(experts: nn.Module) -> bool:
    """Whether the experts module runs every expert on every token (its forward takes no expert
    index: Llama 4's ``Llama4TextExperts``), so its matmuls do not depend on the routing."""
    try:
        parameters = inspect.signature(type(experts).forward).parameters
    except (TypeError, ValueError):
        return False
    return len([p for p in parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]) <= 2
