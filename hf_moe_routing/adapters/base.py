"""What every model-family adapter provides.

transformers 5.x gives every MoE family one plug point::

    router_logits, top_k_weights, top_k_index = block.gate(hidden)
    out = block.experts(hidden, top_k_index, top_k_weights)

Families differ only in how the router turns hidden states into scores and weights.
An adapter splits the family's router forward into four steps, so that routing methods
can change the *selection* while keeping the family's own scoring and weighting::

    logits  = adapter.logits(gate, hidden)                  # (n, m), family dtype rules
    scores  = adapter.scores(gate, logits)                  # (n, m) float32: softmax or sigmoid
    choice  = adapter.choice_scores(gate, scores, offset)   # what top-k selects on
    weights = adapter.weights(gate, scores, index, valid)   # family (re)normalisation and scaling

With ``offset=None`` and ``valid=None`` the four steps reproduce the family's router bit for bit
(tested for every family).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def peft_base_layer(module: nn.Module) -> nn.Module:
    """The module a PEFT tuner layer wraps, else ``module``.

    PEFT >= 0.17 can put LoRA on a router's or experts' weights (``target_parameters``, which
    ``target_modules="all-linear"`` fills in for MoE models) by wrapping ``block.gate`` /
    ``block.experts``; routing is patched on, and read from, the wrapped module.
    """
    get_base_layer = getattr(module, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) else module


@dataclass(frozen=True)
class MoEBlock:
    """One MoE block of a model: where it is and what it holds."""

    name: str  # module path of the block, e.g. "model.layers.3.mlp"
    layer_index: int  # decoder layer index
    block: nn.Module

    @property
    def gate(self) -> nn.Module:
        return peft_base_layer(self.block.gate)

    @property
    def experts(self) -> nn.Module:
        return peft_base_layer(self.block.experts)


@dataclass(frozen=True)
class MoEShape:
    """The MoE shape of a model: enough to check that an adapter or allocator fits it."""

    family: str
    num_hidden_layers: int
    moe_layers: tuple[int, ...]
    hidden_size: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    shared_intermediate_size: int  # summed over shared experts, 0 if none

    def fingerprint(self) -> dict:
        """JSON-serialisable identity of the shape (stored with routing adapters)."""
        out = asdict(self)
        out["moe_layers"] = list(self.moe_layers)
        return out


class MoEAdapter:
    """Family knowledge for softmax-top-k routers (Mixtral, Qwen-MoE, OLMoE, ...).

    Subclasses set the class attributes below and override only the steps their family does
    differently (DeepSeek: float32 logits, group-limited selection, sigmoid scores).
    """

    family: ClassVar[str] = "generic"
    #: ``config.model_type`` values served by this adapter.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: Router class names of the family (checked so that a custom model gets a clear error).
    router_classes: ClassVar[tuple[str, ...]] = ()
    #: Whether ``torch.topk`` in the family's router returns sorted results.
    topk_sorted: ClassVar[bool] = True
    #: Top-k weights divided by their sum: True, False, or None = read ``gate.norm_topk_prob``.
    normalize: ClassVar[bool | None] = None
    #: Added to the renormalisation denominator (DeepSeek-V3 uses 1e-20).
    norm_eps: ClassVar[float] = 0.0
    #: Whether the family casts its weights back to the logits' dtype.
    cast_weights: ClassVar[bool] = True
    #: Attribute names of the block's always-on shared expert(s).
    shared_expert_attrs: ClassVar[tuple[str, ...]] = ("shared_expert", "shared_experts")

    # ---- routing steps ---------------------------------------------------------------------
    def logits(self, gate: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits ``h W^T`` of shape (n, m) in the family's dtype."""
        hidden = hidden.reshape(-1, self.hidden_dim(gate))
        return nn.functional.linear(hidden, gate.weight)

    def scores(self, gate: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """Routing scores s (n, m) in float32: ``softmax(logits)``."""
        return nn.functional.softmax(logits, dtype=torch.float, dim=-1)

    def choice_scores(
        self,
        gate: nn.Module,
        scores: torch.Tensor,
        offset: torch.Tensor | None = None,
        *,
        limit_groups: bool = True,
    ) -> torch.Tensor:
        """Scores that top-k selects on: ``s + offset`` (offset is (m,), e.g. ``-q`` for BIP).

        ``limit_groups=False`` skips a family's group limiting (DeepSeek), keeping its other rules.
        """
        return scores if offset is None else scores + offset

    def limits_groups(self, gate: nn.Module) -> bool:
        """Whether selection keeps only some expert groups per token (DeepSeek's group-limited top-k)."""
        return False

    def weights(
        self,
        gate: nn.Module,
        scores: torch.Tensor,
        index: torch.Tensor,
        valid: torch.Tensor | None = None,
        normalize: bool | None = None,
        logits_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Gating weights of the chosen experts.

        ``g_ij = s_ij`` (optionally ``/ sum_j' s_ij'`` over the chosen, valid slots), times the
        family's scaling. Slots where ``valid`` is False (sentinel slots) get weight 0.
        ``normalize`` overrides the family default (Ada-K always renormalises).
        """
        if valid is None:
            w = scores.gather(1, index)
        else:  # sentinel slots hold index m: gather anything, then zero them
            w = scores.gather(1, index.clamp(max=scores.shape[-1] - 1)).masked_fill(~valid, 0.0)
        if self.normalizes(gate) if normalize is None else normalize:
            denominator = w.sum(dim=-1, keepdim=True)
            w = w / (denominator + self.norm_eps if self.norm_eps else denominator)
        scale = self.scaling(gate)
        if scale is not None:
            w = w * scale
        if self.cast_weights and logits_dtype is not None:
            w = w.to(logits_dtype)
        return w

    # ---- family facts ----------------------------------------------------------------------
    def normalizes(self, gate: nn.Module) -> bool:
        """Whether the family renormalises its top-k weights."""
        if self.normalize is not None:
            return self.normalize
        return bool(getattr(gate, "norm_topk_prob", True))

    def scaling(self, gate: nn.Module) -> float | None:
        """Factor applied to the routed experts' weights (DeepSeek's ``routed_scaling_factor``)."""
        return None

    def hidden_dim(self, gate: nn.Module) -> int:
        """Width of the hidden states the router reads (its weight is (m, h))."""
        return int(gate.weight.shape[-1])

    def top_k(self, gate: nn.Module) -> int:
        return int(gate.top_k)

    def num_experts(self, gate: nn.Module) -> int:
        return int(gate.num_experts)

    def topk(self, gate: nn.Module, choice: torch.Tensor, k: int) -> torch.Tensor:
        """Indices of the k best experts by ``choice``, in the family's order."""
        return torch.topk(choice, k, dim=-1, sorted=self.topk_sorted).indices

    def route(self, gate: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The family's own top-k routing rebuilt from the steps (bit-identical to ``gate.forward``)."""
        logits = self.logits(gate, hidden)
        scores = self.scores(gate, logits)
        index = self.topk(gate, self.choice_scores(gate, scores), self.top_k(gate))
        return logits, self.weights(gate, scores, index, logits_dtype=logits.dtype), index

    # ---- model structure -------------------------------------------------------------------
    def is_moe_block(self, module: nn.Module) -> bool:
        gate = getattr(module, "gate", None)
        experts = getattr(module, "experts", None)
        return (
            isinstance(gate, nn.Module)
            and isinstance(experts, nn.Module)
            and hasattr(peft_base_layer(experts), "num_experts")
            and isinstance(getattr(peft_base_layer(gate), "weight", None), torch.Tensor)
        )

    def find_blocks(self, model: nn.Module) -> list[MoEBlock]:
        """All MoE blocks of ``model`` in layer order."""
        blocks = []
        for name, module in model.named_modules():
            if self.is_moe_block(module):
                match = _LAYER_INDEX.search(name + ".")
                blocks.append(MoEBlock(name, int(match.group(1)) if match else len(blocks), module))
        return blocks

    def check_router(self, block: MoEBlock) -> None:
        """Raise a TypeError if ``block``'s router is not one this adapter knows."""
        name = type(block.gate).__name__
        if self.router_classes and name not in self.router_classes:
            raise TypeError(
                f"{block.name}.gate is a {name}, but the {self.family!r} adapter expects one of "
                f"{list(self.router_classes)}. The model was modified or is a different family; "
                "pass adapter='generic' to patch_model to try the generic softmax-top-k adapter."
            )

    def shared_intermediate_size(self, block: nn.Module) -> int:
        """Intermediate size of the block's always-on shared expert(s), 0 if none."""
        for attr in self.shared_expert_attrs:
            shared = getattr(block, attr, None)
            if shared is not None:
                return int(getattr(shared, "intermediate_size", 0))
        return 0

    def shape(self, model: nn.Module, blocks: list[MoEBlock] | None = None) -> MoEShape:
        """The MoE shape of ``model`` (raises ValueError if it has no MoE block)."""
        blocks = self.find_blocks(model) if blocks is None else blocks
        if not blocks:
            raise ValueError(
                f"{type(model).__name__} has no MoE block (no module with `gate` and `experts`)."
            )
        gate, experts = blocks[0].gate, blocks[0].experts
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return MoEShape(
            family=self.family,
            num_hidden_layers=int(getattr(text_config, "num_hidden_layers", len(blocks))),
            moe_layers=tuple(b.layer_index for b in blocks),
            hidden_size=self.hidden_dim(gate),
            num_experts=self.num_experts(gate),
            top_k=self.top_k(gate),
            expert_intermediate_size=int(getattr(experts, "intermediate_dim", 0)),
            shared_intermediate_size=self.shared_intermediate_size(blocks[0].block),
        )
