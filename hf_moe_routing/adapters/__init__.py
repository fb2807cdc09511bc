"""Model-family adapters: where a family's MoE blocks are and how its router scores experts.

One small module per family; :func:`get_adapter` picks the one for a model, falling back to the
generic softmax-top-k adapter for other transformers MoE families.
"""

from __future__ import annotations

from torch import nn

from .base import MoEAdapter, MoEBlock, MoEShape
from .deepseek_v2 import DeepseekV2Adapter
from .deepseek_v3 import DeepseekV3Adapter
from .generic import GenericAdapter
from .mixtral import MixtralAdapter
from .qwen2_moe import Qwen2MoeAdapter
from .qwen3_moe import Qwen3MoeAdapter

#: family name -> adapter class (the required families; others go through GenericAdapter)
ADAPTERS: dict[str, type[MoEAdapter]] = {}


def register_adapter(cls: type[MoEAdapter]) -> type[MoEAdapter]:
    """Register an adapter class for the ``config.model_type`` values it lists."""
    for model_type in (cls.family, *cls.model_types):
        ADAPTERS[model_type] = cls
    return cls


for _cls in (MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter, DeepseekV2Adapter, DeepseekV3Adapter):
    register_adapter(_cls)


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return str(getattr(text_config, "model_type", None) or getattr(config, "model_type", "unknown"))


def get_adapter(
    model: nn.Module, adapter: str | MoEAdapter | None = None
) -> tuple[MoEAdapter, list[MoEBlock]]:
    """The adapter for ``model`` and its MoE blocks, checked.

    ``adapter`` forces a family name (``"generic"`` for the probing adapter) or an instance.
    Raises ValueError for a model without MoE blocks and TypeError for routers no adapter reproduces.
    """
    model_type = model_type_of(model)
    if isinstance(adapter, MoEAdapter):
        chosen = adapter
    elif adapter == "generic" or (adapter is None and model_type not in ADAPTERS):
        chosen = GenericAdapter(model_type)
    elif (adapter or model_type) in ADAPTERS:
        chosen = ADAPTERS[adapter or model_type]()
    else:
        raise ValueError(f"Unknown adapter {adapter!r}; choose one of {sorted(ADAPTERS)} or 'generic'.")
    blocks = chosen.find_blocks(model)
    if not blocks:
        moe_like = next(
            (
                (n, type(m).__name__)
                for n, m in model.named_modules()
                if isinstance(getattr(m, "experts", None), nn.Module)
            ),
            None,
        )
        if moe_like is not None:
            raise TypeError(
                f"{type(model).__name__} (model_type={model_type!r}) is a Mixture-of-Experts model, but its MoE blocks "
                f"({moe_like[0]}: {moe_like[1]}) do not use the standard `gate` router + `experts` interface that "
                f"hf-moe-routing patches. Supported families: {', '.join(sorted(ADAPTERS))}, and other transformers "
                "MoE families whose blocks have `gate` (softmax top-k router) and `experts` modules."
            )
        raise ValueError(
            f"{type(model).__name__} (model_type={model_type!r}) has no Mixture-of-Experts block: hf-moe-routing "
            f"patches MoE models only. Supported families: {', '.join(sorted(ADAPTERS))}, and other transformers "
            "MoE families whose blocks have `gate` (softmax top-k router) and `experts` modules."
        )
    for block in blocks:
        chosen.check_router(block)
    return chosen, blocks


__all__ = [
    "ADAPTERS",
    "DeepseekV2Adapter",
    "DeepseekV3Adapter",
    "GenericAdapter",
    "MixtralAdapter",
    "MoEAdapter",
    "MoEBlock",
    "MoEShape",
    "Qwen2MoeAdapter",
    "Qwen3MoeAdapter",
    "get_adapter",
    "model_type_of",
    "register_adapter",
]
