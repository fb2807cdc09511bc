"""Tiny random MoE models of every supported family, for tests, examples and benchmarks.

No download is needed: each model is built from a small config (hidden size 32-64, 2-3 layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .families import RouterOutput, describe_model
from .methods.base import RoutingConfig, RoutingLayer
from .patching import routing_layers

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

#: family -> config overrides (on top of _COMMON); names are transformers model types
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=128,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=96,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        intermediate_size=128,
        moe_intermediate_size=48,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        head_dim=16,
    ),
    "deepseek_v2": dict(
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=0,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=8,
        num_key_value_heads=4,
        qk_rope_head_dim=8,
        v_head_dim=16,
    ),
    "deepseek_v3": dict(
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        num_key_value_heads=4,
        v_head_dim=16,
        num_hidden_layers=3,
    ),
    # families served by the generic adapter
    "olmoe": dict(intermediate_size=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "minimax": dict(
        intermediate_size=64,
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        layer_types=["full_attention", "full_attention"],
    ),
}

REQUIRED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")
GENERIC_FAMILIES = ("olmoe", "minimax")


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    """A small config of ``family`` (a transformers model type) with eager attention."""
    if family not in TINY_CONFIGS:
        raise ValueError(f"No tiny config for {family!r}; known: {sorted(TINY_CONFIGS)}")
    kwargs = {**_COMMON, **TINY_CONFIGS[family], **overrides}
    config = AutoConfig.for_model(family, **kwargs)
    config._attn_implementation = "eager"
    return config


def tiny_model(
    family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> PreTrainedModel:
    """A randomly initialised tiny causal LM of ``family`` in eval mode.

    Router weights are drawn with a larger spread than the default init so that routing scores
    differ clearly between experts (as in trained models).
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    spread_router_weights(model)
    return model.eval()


def spread_router_weights(model: nn.Module, std: float = 0.5) -> nn.Module:
    """Draw every router weight from N(0, std^2) (a freshly initialised router scores experts alike)."""
    with torch.no_grad():
        for block in describe_model(model, verify=False).blocks:
            block.spec.weight(block.router).normal_(0.0, std)
    return model


@dataclass
class DropSlotsConfig(RoutingConfig):
    """A deterministic variable-k routing for tests: token t keeps the first ``1 + (t mod k)`` of its top-k slots.

    The other slots become sentinels (index = number of experts, weight 0). Not registered by name.
    """

    routing_type = "test_drop_slots"
    variable_k = True

    def create_layer(self, block, model, context) -> RoutingLayer:
        return _DropSlotsLayer(block, context)


class _DropSlotsLayer(RoutingLayer):
    def forward(self, router, hidden, *args):
        logits, weights, index = self.spec.route(router, hidden)
        n, k = index.shape
        keep = (
            torch.arange(k, device=index.device)[None, :]
            <= (torch.arange(n, device=index.device) % k)[:, None]
        )
        return RouterOutput(
            logits,
            weights.masked_fill(~keep, 0.0),
            index.masked_fill(~keep, self.spec.num_experts),
        )


class OffsetLayer(RoutingLayer):
    """Top-k on ``choice + offset`` with a learned per-expert offset (stateful, like BIP / Loss-Free)."""

    def __init__(self, block, context, top_k):
        super().__init__(block, context)
        self.top_k = top_k
        self.register_buffer("offset", torch.zeros(block.spec.num_experts))
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, router, hidden_states, *args):
        spec = self.spec
        logits = spec.logits(router, hidden_states)
        scores = spec.scores(logits)
        index = spec.topk(spec.choice(logits, scores, self.offset * self.scale), self.top_k)
        return RouterOutput(
            logits, spec.weights(logits, scores, index, hidden_dtype=hidden_states.dtype), index
        )


@dataclass
class OffsetConfig(RoutingConfig):
    """Test routing with per-layer state (an expert offset buffer and a scale parameter)."""

    routing_type = "test-offset"
    top_k: int = 2

    def create_layer(self, block, model, context):
        return OffsetLayer(block, context, self.top_k)


def randomize_offsets(model, seed=1):
    """Give every routing layer a different, large offset so the routing differs from top-k."""
    gen = torch.Generator().manual_seed(seed)
    for layer in routing_layers(model).values():
        layer.offset.copy_(torch.randn(layer.offset.shape, generator=gen))
        layer.scale.data.fill_(float(torch.rand((), generator=gen)) + 0.5)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def tiny_checkpoint(
    folder: str | Path, family: str = "mixtral", *, lines: int = 30, seed: int = 0, **overrides: Any
) -> Path:
    """Save a tiny ``family`` model with a word-level tokenizer over its ids and a ``text.txt`` of random words.

    What a user's local checkpoint folder looks like (``config.json``, safetensors weights, tokenizer
    files), for command-line and README tests: ``lines`` lines of 20 words ``w0`` .. ``w119``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    words = [f"w{i}" for i in range(120)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(folder)
    tiny_model(family, seed=seed, **overrides).save_pretrained(folder)
    rng = torch.Generator().manual_seed(seed)
    text = [
        " ".join(words[int(i)] for i in torch.randint(0, 120, (20,), generator=rng)) for _ in range(lines)
    ]
    (folder / "text.txt").write_text("\n".join(text) + "\n")
    return folder
