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
eager and SDPA attention compute (and what FlopCounterMode measures). Chunked attention (Llama 4)
averages the keys of each query's chunk. MiniMax lightning (linear) attention layers count their
block-wise products: ``4 H d ctx_b + 4 H d^2`` with ``ctx_b`` the block length (full) or the causal
average within a block.

Token mixers whose cost depends on their implementation (state-space and linear-attention mixers,
short convolutions, attention with an indexer: kind ``"other"`` in
:mod:`hf_moe_routing.families.structure`) are *measured*: on a model with weights, one forward of
``seq_len`` token ids runs under ``torch.utils.flop_counter.FlopCounterMode`` (the model's own routing,
no gradients) and each such mixer counts what it computed, whatever ``causal`` says. On the meta
device (a config only) they count their projections only, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import PretrainedConfig

from ..families import MoEBlock, text_config
from ..families.structure import attention_of, decoder_layers_name, experts_compute_all, is_linear_only
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
    attention_kind: str  # "softmax", "lightning", "other" or "none" (families.structure)
    lightning_block_size: int
    sliding_window: int | None
    chunk_size: int | None
    dense_mlp: float
    moe: bool
    mixer_name: str  # module path of the layer's token mixer ("" if none)
    measured_parts: tuple[str, ...]  # other parts with non-linear matmuls (module paths), measured
    measured_fallback: float  # their linear layers' FLOPs (what the meta device counts)
    dense_experts: bool  # the experts module runs every expert on every token (Llama 4)
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


def causal_context(seq_len: int, window: int | None = None, chunk: int | None = None) -> float:
    """Mean number of keys a causal query attends to: ``mean_{i=1..L} min(i, w)``, or with chunked
    attention (chunks of ``chunk`` tokens) ``mean_i ((i - 1) mod chunk) + 1``."""
    if chunk is not None and chunk < seq_len:
        full, rest = divmod(seq_len, chunk)
        return (full * chunk * (chunk + 1) / 2 + rest * (rest + 1) / 2) / seq_len
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
    layers_name = decoder_layers_name(described.blocks[0].name)
    layer_list = model.get_submodule(layers_name)
    moe_by_layer: dict[int, MoEBlock] = {b.layer_index: b for b in described.blocks}
    config = text_config(model)

    layers = []
    for index, layer in enumerate(layer_list):
        block = moe_by_layer.get(index)
        # the MoE block is a child of the decoder layer, or the layer itself (Gemma 4)
        in_layer = block is not None and block.block is layer
        moe_parts = () if block is None else _moe_parts(block)
        attn = attention_of(layer, config, index, exclude=() if block is None or in_layer else (block.block,))
        skip = {id(attn.module)} | ({id(m) for m in moe_parts} if in_layer else set())
        if block is not None and not in_layer:
            skip.add(id(block.block))
        rest = [(n, m) for n, m in layer.named_children() if id(m) not in skip]
        mlp = sum(linear_flops(m) for _, m in rest if is_linear_only(m))
        measured_parts = tuple(f"{layers_name}.{index}.{n}" for n, m in rest if not is_linear_only(m))
        fallback = sum(linear_flops(m) for _, m in rest if not is_linear_only(m))
        if block is None:
            shared = router = expert = 0.0
            top_k = num_experts = 0
        else:
            shared = (
                0.0
                if in_layer
                else sum(
                    linear_flops(c) for c in block.block.children() if not any(c is p for p in moe_parts)
                )
            )
            router = 2.0 * block.spec.num_experts * block.spec.hidden_size
            expert = expert_flops(block.experts)
            top_k, num_experts = block.spec.top_k, block.spec.num_experts
        layers.append(
            LayerStructure(
                index=index,
                attention_projections=linear_flops(attn.module) if attn.module is not None else 0.0,
                attention_heads=attn.heads,
                qk_head_dim=attn.qk_head_dim,
                v_head_dim=attn.v_head_dim,
                attention_kind=attn.kind,
                lightning_block_size=attn.block_size,
                sliding_window=attn.sliding_window,
                chunk_size=attn.chunk_size,
                dense_mlp=mlp,
                moe=block is not None,
                mixer_name=f"{layers_name}.{index}.{attn.name}" if attn.name else "",
                measured_parts=measured_parts,
                measured_fallback=fallback,
                dense_experts=block is not None and experts_compute_all(block.experts),
                shared_experts=shared,
                router=router,
                expert=expert,
                num_experts=num_experts,
                top_k=top_k,
            )
        )
    return layers


def _moe_parts(block: MoEBlock) -> tuple[nn.Module, ...]:
    """The router and experts of a block (as the block holds them, and inside PEFT wrappers)."""
    return (block.router, getattr(block.block, block.router_attr), block.experts, block.block.experts)


@contextmanager
def counting_flops(model: nn.Module) -> Iterator[FlopCounterMode]:
    """``FlopCounterMode`` (no display) and ``torch.no_grad()`` around forwards of ``model``.

    The parameters' ``requires_grad`` is switched off meanwhile and restored afterwards (also on an
    error). FlopCounterMode tracks modules with autograd hooks on every module input that requires
    gradients; a view of a parameter made under ``no_grad`` (``conv1d.weight.squeeze(1)``) still
    requires gradients but has no autograd node, and torch raises "Expected gradient function to be
    set" when such a view is passed to a module. transformers 5.25 runs the state-space and
    convolution functions of its hybrid families (Jamba, Qwen3-Next, Nemotron-H, ...) as modules of
    the ``kernels`` package, with exactly such views as inputs.
    """
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for parameter in frozen:
            parameter.requires_grad_(False)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            yield counter
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)


def measured_mixer_flops(model: nn.Module, names: Sequence[str], seq_len: int) -> dict[str, float]:
    """FLOPs per token of the token mixers ``names`` (module paths), measured by ``FlopCounterMode``.

    One forward of ``seq_len`` token ids (batch 1) runs with the model's own routing and no
    gradients; each mixer counts the matmul FLOPs it computed, divided by ``seq_len``.
    """
    from ..core.batching import model_device
    from ..patching import original_routing

    vocab = int(getattr(text_config(model), "vocab_size", 0) or 2)
    ids = (torch.arange(seq_len) % vocab).unsqueeze(0).to(model_device(model))
    with original_routing(model), counting_flops(model) as counter:
        model(input_ids=ids)
    counts = counter.get_flop_counts()
    root = type(model).__name__

    def measured(name: str) -> float:
        module = model.get_submodule(name)
        if isinstance(
            module, (nn.ModuleList, nn.ModuleDict)
        ):  # never called itself (LongCat-Flash's 2 attentions)
            return sum(measured(f"{name}.{child}") for child, _ in module.named_children())
        return sum(counts.get(f"{root}.{name}", {}).values())

    return {name: measured(name) / seq_len for name in names}


def _outside_layers_flops(model: nn.Module) -> float:
    """Linear layers outside the decoder layers other than the LM head (Gemma 4's per-layer input projection)."""
    described = describe(model)
    layers_name = decoder_layers_name(described.blocks[0].name)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    total = 0.0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head and not name.startswith(layers_name + "."):
            total += 2.0 * module.in_features * module.out_features
    return total


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
            MoE layer (in layer order), or None for each layer's top-k. Llama 4's experts module in
            transformers multiplies every routed expert on every token (zero weights for the unchosen;
            ``LayerStructure.dense_experts``): pass the number of routed experts to count what it computes.
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

    other = [layer.mixer_name for layer in layers if layer.attention_kind == "other"]
    other += [name for layer in layers for name in layer.measured_parts]
    measured: dict[str, float] = {}
    if other and not any(p.device.type == "meta" for p in model.parameters()):
        measured = measured_mixer_flops(model, other, seq_len)
    elif other:
        warnings.warn(
            f"{len(other)} modules multiply by more than linear layers in ways that depend on their "
            f"implementation (e.g. {type(model.get_submodule(other[0])).__name__}); on the meta device only "
            "their linear layers are counted. Pass a model with weights to measure them.",
            stacklevel=2,
        )
    dense = _outside_layers_flops(model)
    for layer in layers:
        dense += layer.dense_mlp
        if layer.measured_parts and measured:
            dense += sum(measured[name] for name in layer.measured_parts)
        else:
            dense += layer.measured_fallback
    attention = 0.0
    for layer in layers:
        if layer.mixer_name in measured:
            attention += measured[layer.mixer_name]
            continue
        attention += layer.attention_projections
        if layer.attention_kind == "lightning":
            ctx = lightning_context(seq_len, layer.lightning_block_size, causal)
            attention += 4.0 * layer.attention_heads * layer.qk_head_dim * (ctx + layer.qk_head_dim)
        elif layer.attention_kind == "softmax":
            ctx = (
                causal_context(seq_len, layer.sliding_window, layer.chunk_size) if causal else float(seq_len)
            )
            attention += 2.0 * layer.attention_heads * ctx * (layer.qk_head_dim + layer.v_head_dim)
    return FlopsBreakdown(
        attention=attention,
        dense_mlp=dense,
        shared_experts=sum(layer.shared_experts for layer in moe_layers),
        routed_experts=sum(a * layer.expert for a, layer in zip(per_moe, moe_layers, strict=True)),
        router=sum(layer.router for layer in moe_layers),
        lm_head=_lm_head_flops(model),
    )
