"""Analytic FLOPs per token agree with torch's FlopCounterMode (matmul FLOPs) on every family."""

import pytest
import torch
from transformers import AutoConfig, LlamaConfig

from hf_moe_routing import TopKConfig, patch_model
from hf_moe_routing.evaluation import RoutingStats
from hf_moe_routing.evaluation.flops import causal_context, counting_flops, flops_per_token
from hf_moe_routing.testing import (
    GENERIC_FAMILIES,
    REQUIRED_FAMILIES,
    DropSlotsConfig,
    tiny_config,
    tiny_model,
)

SEQ_LEN = 20
VARIANTS = [(f, {}) for f in REQUIRED_FAMILIES + GENERIC_FAMILIES] + [
    ("deepseek_v2", dict(q_lora_rank=24, first_k_dense_replace=1)),  # MLA with a query LoRA, a dense layer
    ("qwen2_moe", dict(mlp_only_layers=[0])),  # a dense layer, gated shared expert in the other
    ("qwen3_moe", dict(decoder_sparse_step=2)),  # MoE every other layer
    (
        "minimax",
        dict(layer_types=["linear_attention", "full_attention"], block_size=8),
    ),  # lightning attention
]


def _measured_flops_per_token(model, ids) -> float:
    model.set_experts_implementation("eager")  # per-expert matmuls that FlopCounterMode sees
    with counting_flops(model) as counter:
        model(ids)
    return counter.get_total_flops() / ids.numel()


def _ids(batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 128, (batch, SEQ_LEN), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("family", "overrides"), VARIANTS, ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("top_k", [None, 1], ids=["model-k", "static-k1"])
def test_flops_match_flop_counter(family, overrides, top_k):
    model = tiny_model(family, **overrides)
    if top_k is not None:
        patch_model(model, TopKConfig(top_k=top_k))
    measured = _measured_flops_per_token(model, _ids())
    predicted = flops_per_token(model, SEQ_LEN, activated=top_k, causal=False)
    assert predicted.total == pytest.approx(measured, rel=0.02)
    # the config alone (built on the meta device) gives the same numbers
    assert flops_per_token(model.config, SEQ_LEN, activated=top_k, causal=False) == predicted


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe"])
def test_measured_activated_experts_give_the_counted_flops(family):
    """Variable k: FLOPs from RoutingStats' per-layer activated counts match what eager experts compute."""
    model = tiny_model(family)
    patch_model(model, DropSlotsConfig())
    ids = _ids(batch=3)
    with RoutingStats(model) as stats:
        measured = _measured_flops_per_token(model, ids)
    activated = stats.last.activated.tolist()
    top_k = model.config.num_experts_per_tok
    assert all(1 < a < top_k for a in activated)
    predicted = flops_per_token(model, SEQ_LEN, activated=activated, causal=False)
    assert predicted.total == pytest.approx(measured, rel=0.02)
    assert predicted.routed_experts < flops_per_token(model, SEQ_LEN, causal=False).routed_experts


def test_mixtral_breakdown_by_hand():
    # hidden 64, 4 heads of 16, 2 KV heads, 8 experts of 96 (gated), top-2, vocab 128, 2 layers
    f = flops_per_token(tiny_config("mixtral"), SEQ_LEN, causal=False)
    projections = 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64)
    scores = 2 * 4 * SEQ_LEN * (16 + 16)
    assert f.attention == 2 * (projections + scores)
    assert f.router == 2 * (2 * 64 * 8)
    assert f.routed_experts == 2 * 2 * (2 * (64 * 2 * 96 + 96 * 64))
    assert f.lm_head == 2 * 64 * 128
    assert f.dense_mlp == f.shared_experts == 0
    assert f.total == 225280
    causal = flops_per_token(tiny_config("mixtral"), SEQ_LEN)
    assert f.attention - causal.attention == 2 * 2 * 4 * (SEQ_LEN - (SEQ_LEN + 1) / 2) * 32


def test_causal_context_with_sliding_window():
    assert causal_context(4) == 2.5  # (1 + 2 + 3 + 4) / 4
    assert causal_context(5, window=2) == (1 + 2 + 2 + 2 + 2) / 5
    assert causal_context(3, window=8) == 2.0


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_full_size_config_is_twice_the_active_matmul_parameters(family):
    """On the default (full-size) configs: FLOPs at one token = 2 x active matmul weights + 2 x scores."""
    config = AutoConfig.for_model(family)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    f = flops_per_token(model, 1)
    active = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or "embed_tokens" in name or "norm" in name:
            continue
        if p.dim() == 3:  # routed experts: top-k of num_experts are active
            active += p.numel() * config.num_experts_per_tok / p.shape[0]
        else:
            active += p.numel()
    attn = model.model.layers[0].self_attn
    qk = getattr(attn, "qk_head_dim", None) or attn.head_dim
    v = getattr(attn, "v_head_dim", None) or attn.head_dim
    scores = config.num_hidden_layers * 2 * config.num_attention_heads * (qk + v)
    assert f.total == pytest.approx(2 * active + scores, rel=1e-9)


def test_bad_input():
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(model, 0)
    with pytest.raises(ValueError, match="2 MoE layers"):
        flops_per_token(model, 8, activated=[1.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="must lie in 0..8"):
        flops_per_token(model, 8, activated=-1)
    with pytest.raises(ValueError, match="must lie in 0..8"):
        flops_per_token(model, 8, activated=[2.0, 9.0])
    with pytest.raises(TypeError, match="model or a transformers config"):
        flops_per_token("mixtral", 8)
    llama = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(ValueError, match="no Mixture-of-Experts block"):
        flops_per_token(llama, 8)


def test_flops_of_a_peft_model_count_the_lora_matmuls():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("mixtral")
    expected = flops_per_token(model, 32)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    got = flops_per_token(wrapped, 32)
    # LoRA adds its rank-2 matmuls to the q (64 -> 64) and v (64 -> 32) projections of the 2 layers
    lora = 2 * 2 * ((64 + 64) + (64 + 32)) * 2
    assert got.attention == expected.attention + lora
    assert got.routed_experts == expected.routed_experts and got.lm_head == expected.lm_head


class _MixerTakingAWeightView(torch.nn.Module):
    """As transformers 5.25's hybrid families call their convolution: a no-grad view of a parameter
    (``conv1d.weight.squeeze(1)``) passed to a module (a ``kernels`` layer)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(6, 1, 4))
        self.inner = _MatMul()

    def forward(self, x):
        return self.inner(x, self.weight.squeeze(1))


class _MatMul(torch.nn.Module):
    def forward(self, x, weight):
        return x @ weight


def test_counting_flops_takes_parameter_views_as_module_inputs_and_restores_requires_grad():
    model = _MixerTakingAWeightView()
    model.weight.requires_grad_(True)
    frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)
    model.register_parameter("frozen", frozen)
    with counting_flops(model) as counter:
        out = model(torch.randn(3, 6))
    assert counter.get_total_flops() == 2 * 3 * 6 * 4  # one (3, 6) x (6, 4) matmul
    assert not out.requires_grad  # no gradients recorded
    assert model.weight.requires_grad and not model.frozen.requires_grad  # each flag as it was
    with pytest.raises(RuntimeError, match="boom"), counting_flops(model):
        raise RuntimeError("boom")
    assert model.weight.requires_grad  # restored after an error too
