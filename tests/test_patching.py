"""Patching is exact, reversible, and refuses bad input without touching the model."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_moe_routing import TopKConfig, get_patch_state, is_patched, patch_model, unpatch_model
from hf_moe_routing.testing import GENERIC_FAMILIES, REQUIRED_FAMILIES, tiny_model

ALL_FAMILIES = REQUIRED_FAMILIES + GENERIC_FAMILIES
VARIANTS = [(f, {}) for f in ALL_FAMILIES] + [
    (
        "deepseek_v2",
        dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0),
    ),
    ("qwen2_moe", dict(norm_topk_prob=True)),
    ("deepseek_v3", dict(norm_topk_prob=False)),
]


def _forward(model, ids, **kw):
    with torch.no_grad():
        return model(ids, output_router_logits=True, **kw)


@pytest.mark.parametrize(("family", "overrides"), VARIANTS, ids=lambda v: v if isinstance(v, str) else "")
def test_identity_patch_is_bit_exact_and_reversible(family, overrides, ids):
    model = tiny_model(family, **overrides)
    ref = _forward(model, ids)
    state_before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    gate_types = [type(m) for m in model.modules() if hasattr(m, "top_k") and hasattr(m, "weight")]

    patch_model(model, TopKConfig())
    assert is_patched(model)
    out = _forward(model, ids)
    assert torch.equal(out.logits, ref.logits)
    assert len(out.router_logits) == len(ref.router_logits) > 0
    for a, b in zip(out.router_logits, ref.router_logits):
        assert torch.equal(a, b)
    # the base model's state dict is untouched: same keys, same storage (no copies)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == state_before

    unpatch_model(model)
    assert not is_patched(model)
    assert [type(m) for m in model.modules() if hasattr(m, "top_k") and hasattr(m, "weight")] == gate_types
    assert not any(hasattr(m, "routing") for m in model.modules())
    assert torch.equal(_forward(model, ids).logits, ref.logits)


def test_patched_router_is_still_an_instance_of_the_original_class():
    model = tiny_model("mixtral")
    original = type(model.model.layers[0].mlp.gate)
    gate = model.model.layers[0].mlp.gate
    patch_model(model, TopKConfig())
    assert model.model.layers[0].mlp.gate is gate  # patched in place
    assert isinstance(gate, original) and type(gate) is not original
    assert gate.weight is model.model.layers[0].mlp.gate.weight


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_bf16_identity(family, ids):
    model = tiny_model(family, dtype=torch.bfloat16)
    ref = _forward(model, ids).logits
    patch_model(model, TopKConfig())
    assert torch.equal(_forward(model, ids).logits, ref)


def test_patch_twice_raises_unless_replace(ids):
    model = tiny_model("qwen3_moe")
    patch_model(model, TopKConfig())
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, TopKConfig(top_k=1))
    patch_model(model, TopKConfig(top_k=1), replace=True)
    assert get_patch_state(model).config.top_k == 1
    unpatch_model(model)
    assert not is_patched(model)


def test_static_k_changes_routing(ids):
    model = tiny_model("mixtral")
    ref = _forward(model, ids).logits
    patch_model(model, TopKConfig(top_k=1))
    out = _forward(model, ids)
    assert not torch.equal(out.logits, ref)


def test_save_pretrained_of_patched_model_writes_the_original_checkpoint(tmp_path, ids):
    model = tiny_model("deepseek_v3")
    ref = _forward(model, ids).logits
    patch_model(model, TopKConfig())
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded.model.layers[1].mlp.gate).__name__ == "DeepseekV3TopkRouter"
    assert torch.equal(_forward(reloaded, ids).logits, ref)


def test_patch_with_disk_offloading(tmp_path, ids):
    tiny_model("qwen2_moe").save_pretrained(tmp_path / "m")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "disk",
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", device_map=device_map, offload_folder=tmp_path / "off", attn_implementation="eager"
    )
    assert model.model.layers[0].mlp.gate.weight.device.type == "meta"
    ref = _forward(model, ids).logits
    patch_model(model, TopKConfig())
    assert torch.equal(_forward(model, ids).logits, ref)
    unpatch_model(model)
    assert torch.equal(_forward(model, ids).logits, ref)


def test_non_moe_model_gets_a_clear_error():
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="no Mixture-of-Experts block.*hf-moe-routing families"):
        patch_model(model, TopKConfig())
    assert not is_patched(model)


def test_unreproducible_router_is_refused_and_model_unchanged(ids):
    model = tiny_model("olmoe")  # served by the generic adapter

    class SqrtRouter(type(model.model.layers[0].mlp.gate)):
        def forward(self, hidden_states):
            logits, weights, index = super().forward(hidden_states)
            return logits, weights.sqrt(), index

    model.model.layers[1].mlp.gate.__class__ = SqrtRouter
    ref = _forward(model, ids).logits
    with pytest.raises(
        TypeError, match=r"model_type=.olmoe.*SqrtRouter.*no known rule reproduces its weights"
    ):
        patch_model(model, TopKConfig())
    assert not is_patched(model) and not any(hasattr(m, "routing") for m in model.modules())
    assert torch.equal(_forward(model, ids).logits, ref)


def test_modified_router_of_a_known_family_is_refused():
    model = tiny_model("mixtral")
    model.model.layers[0].mlp.gate.__class__ = type("MyRouter", (nn.Module,), {})
    with pytest.raises(TypeError, match="family=.generic."):
        patch_model(model, TopKConfig())


def test_k_larger_than_experts_is_refused():
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="outside 1..8"):
        patch_model(model, TopKConfig(top_k=9))
    assert not is_patched(model)


def test_wrong_config_type_is_refused():
    with pytest.raises(TypeError, match="routing config"):
        patch_model(tiny_model("mixtral"), {"routing_type": "topk"})


def test_unpatch_of_unpatched_model_is_a_clear_error():
    with pytest.raises(ValueError, match="not patched"):
        unpatch_model(tiny_model("mixtral"))


def test_token_mask_reaches_the_routing_layers():
    model = tiny_model("mixtral")
    patch_model(model, TopKConfig())
    context = get_patch_state(model).context
    seen = []
    layer = model.model.layers[0].mlp.gate.routing
    layer.register_forward_pre_hook(lambda mod, args: seen.append(mod.context.mask_for(args[1].shape[0])))
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with torch.no_grad():
        model(torch.randint(3, 128, (2, 3)), attention_mask=mask)
    assert seen[0].tolist() == [False, True, True, True, True, True]
    assert context.token_mask is None  # cleared after the forward


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("tensor", ["e_score_correction_bias", "weight"])
def test_a_non_finite_router_tensor_of_the_checkpoint_is_refused_at_patch_time(family, bad, tensor, ids):
    from hf_moe_routing import BIPConfig, LossFreeConfig

    model = tiny_model(family)
    block = next(
        m for m in model.modules() if hasattr(m, "gate") and hasattr(m.gate, "e_score_correction_bias")
    )
    layer = next(i for i, lay in enumerate(model.model.layers) if lay.mlp is block)
    with torch.no_grad():
        getattr(block.gate, tensor)[1] = bad
    classes = {name: type(m) for name, m in model.named_modules()}
    for config in (TopKConfig(), BIPConfig(), LossFreeConfig()):
        with pytest.raises(ValueError, match=rf"Layer {layer}: .*gate\.{tensor} holds") as info:
            patch_model(model, config)
        assert ("NaN" if bad != bad else "infinite") in str(info.value) and "unpatched" in str(info.value)
        assert not is_patched(model) and {n: type(m) for n, m in model.named_modules()} == classes
    with torch.no_grad():  # repaired: patches
        getattr(block.gate, tensor)[1] = 0.0
    patch_model(model, LossFreeConfig())
    assert is_patched(model)
