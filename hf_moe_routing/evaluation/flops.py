"""Analytic forward FLOPs per token of a transformers MoE model, split by component.

FLOPs are ``2 x multiply-accumulates`` of the matmuls (every ``nn.Linear``, the routed experts'
weight tensors, the attention score and value products); element-wise work (softmax, norms,
activations, rotary embeddings, residual adds, biases) is not counted, as in
``torch.utils.flop_counter.FlopCounterMode``. The structure is read from the instantiated model (a
config is built on the meta device), so MLA projections (DeepSeek ``q_lora_rank`` / ``kv_lora_rank``),
dense layers (DeepSeek ``first_k_dense_replace``, Qwen ``mlp_only_layers``) and gated shared experts
(Qwen2-MoE ``shared_expert_gate``) are counted as the model defines them. For one token::

    attention      = sum_layers [ projections + 2 H ctx (d_qk + d_v) ]
    dense_mlp      = sum_dense_layers  MLP linears
    shared_experts = sum_moe_layers  shared-expert linears (incl. their gate)
    router         = sum_moe_layers  2 h m
    routed_experts = sum_moe_layers  a_l * 2 * (#weights of one expert)     # a_l: activated experts
    lm_head        = 2 h V

``ctx`` is the number of keys a query attends to at sequence length L. ``causal=True`` (default)
counts the keys a causal query actually uses, averaged over the sequence: ``mean_i min(i, w)``
= (L + 1) / 2 without a sliding window w. ``causal=False`` counts L keys per query, which is what
eager and SDPA attention compute (and what FlopCounterMode measures). MiniMax lightning (linear)
attention layers count their block-wise products: ``4 H d ctx_b + 4 H d^2`` with ``ctx_b`` the
block length (full) or the causal average within a block.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from ..families import MoEBlock, text_config
from ..families.structure import attention_of, decoder_layers
from ..patching import describe, unwrap_model


@dataclass(frozen=True)
class FlopsBreakdown:
    """Forward FLOPs per token (2 x MACs), by component."""

    attention: float
    dense_mlp: float
    shared_experts: float
    routed_experts: float
    router: float
    lm_head: float

    @property
    def total(self) -> float:
        """FLOPs per token of all parts together."""
        return (
            self.attention
            + self.dense_mlp
            + self.shared_experts
            + self.routed_experts
            + self.router
            + self.lm_head
        )

    def to_dict(self) -> dict[str, float]:
        """Every part and ``total``, in FLOPs per token."""
        return {**asdict(self), "total": self.total}

    def __str__(self) -> str:
        rows = self.to_dict()
        return "\n".join(
            f"{name:<15} {value / 1e6:>14,.3f} MFLOPs  {100 * value / max(self.total, 1e-30):5.1f}%"
            for name, value in rows.items()
        )


@dataclass(frozen=True)
class LayerStructure:
    """What one decoder layer costs per token, apart from attention context and activated experts."""

    index: int
    attention_projections: float
    attention_heads: int
    qk_head_dim: int
    v_head_dim: int
    attention_kind: str  # "softmax" or "lightning"
    lightning_block_size: int
    sliding_window: int | None
    dense_mlp: float
    moe: bool
    shared_experts: float
    router: float
    expert: float  # one routed expert
    num_experts: int
    top_k: int


def linear_flops(module: nn.Module) -> float:
    """``sum 2 * in * out`` over the ``nn.Linear`` submodules of ``module`` (FLOPs per token)."""
    return float(
        sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
    )


def expert_flops(experts: nn.Module) -> float:
    """FLOPs of one routed expert for one token: ``2 * (weights of the expert's projections)``."""
    num_experts = int(experts.num_experts)
    weights = sum(p.numel() for p in experts.parameters(recurse=False) if p.dim() == 3)
    if weights == 0:
        weights = sum(p.numel() for p in experts.parameters() if p.dim() >= 2)
    return 2.0 * weights / num_experts


def causal_context(seq_len: int, window: int | None = None) -> float:
    """Mean number of keys a causal query attends to: ``mean_{i=1..L} min(i, w)``."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def lightning_context(seq_len: int, block_size: int, causal: bool) -> float:
    """Mean intra-block keys per query of block-wise linear attention (blocks of ``block_size``)."""
    blocks = [min(block_size, seq_len - start) for start in range(0, seq_len, block_size)]
    if causal:
        return sum(b * (b + 1) / 2 for b in blocks) / seq_len
    return sum(b * b for b in blocks) / seq_len


def _as_model(model_or_config: nn.Module | PretrainedConfig) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return unwrap_model(model_or_config)  # the transformers model inside a PEFT wrapper
    if isinstance(model_or_config, PretrainedConfig):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_or_config)
    raise TypeError(
        f"flops_per_token expects a model or a transformers config, got {type(model_or_config).__name__}."
    )


def model_structure(model_or_config: nn.Module | PretrainedConfig) -> list[LayerStructure]:
    """Per decoder layer costs of ``model_or_config`` (see the module docstring)."""
    model = _as_model(model_or_config)
    described = describe(model)
    layer_list = decoder_layers(model, described.blocks[0].name)
    moe_by_layer: dict[int, MoEBlock] = {b.layer_index: b for b in described.blocks}
    config = text_config(model)

    layers = []
    for index, layer in enumerate(layer_list):
        attn = attention_of(layer, config, index)
        block = moe_by_layer.get(index)
        others = [
            m
            for name, m in layer.named_children()
            if name != attn.name and (block is None or m is not block.block)
        ]
        mlp = sum(linear_flops(m) for m in others)
        if block is None:
            shared = router = expert = 0.0
            top_k = num_experts = 0
        else:
            routers = {block.router, getattr(block.block, block.router_attr)}
            shared = sum(
                linear_flops(child)
                for child in block.block.children()
                if child not in routers and child is not block.experts and child is not block.block.experts
            )
            router = 2.0 * block.spec.num_experts * block.spec.hidden_size
            expert = expert_flops(block.experts)
            top_k, num_experts = block.spec.top_k, block.spec.num_experts
        layers.append(
            LayerStructure(
                index=index,
                attention_projections=linear_flops(attn.module),
                attention_heads=attn.heads,
                qk_head_dim=attn.qk_head_dim,
                v_head_dim=attn.v_head_dim,
                attention_kind="lightning" if attn.kind == "lightning" else "softmax",
                lightning_block_size=attn.block_size,
                sliding_window=attn.sliding_window,
                dense_mlp=mlp,
                moe=block is not None,
                shared_experts=shared,
                router=router,
                expert=expert,
                num_experts=num_experts,
                top_k=top_k,
            )
        )
        if attn.kind == "linear":
            warnings.warn(
                f"Layer {index} uses {type(attn.module).__name__}: only its projections are modelled exactly.",
                stacklevel=2,
            )
    return layers


def _lm_head_flops(model: nn.Module) -> float:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return linear_flops(head) if isinstance(head, nn.Module) else 0.0


def flops_per_token(
    model_or_config: nn.Module | PretrainedConfig,
    seq_len: int,
    activated: float | Sequence[float] | None = None,
    *,
    causal: bool = True,
) -> FlopsBreakdown:
    """Forward FLOPs per token of a model (or config) at sequence length ``seq_len``.

    Args:
        model_or_config: a transformers MoE model (patched or not, any device incl. meta) or its config.
        seq_len: tokens per sequence (sets the attention context).
        activated: mean activated routed experts per token: one number for every MoE layer, one per
            MoE layer (in layer order), or None for each layer's top-k.
        causal: average the attention context over a causal sequence ((L + 1) / 2 keys per query) instead
            of counting all L keys that eager/SDPA attention multiply (see the module docstring).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}.")
    model = _as_model(model_or_config)
    layers = model_structure(model)
    moe_layers = [layer for layer in layers if layer.moe]
    if activated is None:
        per_moe = [float(layer.top_k) for layer in moe_layers]
    elif isinstance(activated, (int, float)) and not isinstance(activated, bool):
        per_moe = [float(activated)] * len(moe_layers)
    else:
        per_moe = [float(a) for a in activated]
        if len(per_moe) != len(moe_layers):
            raise ValueError(
                f"activated has {len(per_moe)} values but the model has {len(moe_layers)} MoE layers; "
                "pass one number, or one per MoE layer."
            )
    if any(not 0 <= a <= layer.num_experts for a, layer in zip(per_moe, moe_layers, strict=True)):
        raise ValueError(
            f"activated expert counts must lie in 0..{moe_layers[0].num_experts} (the routed experts per layer), "
            f"got {per_moe}."
        )

    attention = 0.0
    for layer in layers:
        attention += layer.attention_projections
        if layer.attention_kind == "lightning":
            ctx = lightning_context(seq_len, layer.lightning_block_size, causal)
            attention += 4.0 * layer.attention_heads * layer.qk_head_dim * (ctx + layer.qk_head_dim)
        else:
            ctx = causal_context(seq_len, layer.sliding_window) if causal else float(seq_len)
            attention += 2.0 * layer.attention_heads * ctx * (layer.qk_head_dim + layer.v_head_dim)
    return FlopsBreakdown(
        attention=attention,
        dense_mlp=sum(layer.dense_mlp for layer in layers),
        shared_experts=sum(layer.shared_experts for layer in moe_layers),
        routed_experts=sum(a * layer.expert for a, layer in zip(per_moe, moe_layers, strict=True)),
        router=sum(layer.router for layer in moe_layers),
        lm_head=_lm_head_flops(model),
    )
