"""LoRA (PEFT) on patched models: exact forward, only LoRA trains, LoRA and routing adapters stack."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from hf_moe_routing import get_patch_state, patch_model, unpatch_model
from hf_moe_routing.hub import CONFIG_NAME, load_routing_adapter, save_routing_adapter
from hf_moe_routing.patching import routing_layers
from hf_moe_routing.testing import OffsetConfig, randomize_offsets, tiny_model

FAMILIES = ["mixtral", "qwen2_moe"]
TARGETS = ["q_proj", "v_proj"]


pytestmark = pytest.mark.usefixtures("offset_routing")


def routed_model(family):
    return randomize_offsets(patch_model(tiny_model(family), OffsetConfig(top_k=2)))


def lora(model, seed=3):
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.0)
    return get_peft_model(model, config)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_forward_equals_merged_weights(family, ids, tmp_path):
    model = lora(routed_model(family))
    assert get_patch_state(model) is not None  # the routing is still there through the wrapper
    routing = save_routing_adapter(model, tmp_path / "routing")

    # manual expectation: W + (alpha / r) * B @ A on a fresh copy with the same routing
    expected_model = load_routing_adapter(tiny_model(family), routing)
    scale = 8 / 4
    with torch.no_grad():
        for name, module in model.get_base_model().named_modules():
            if name.split(".")[-1] in TARGETS:
                delta = scale * module.lora_B["default"].weight @ module.lora_A["default"].weight
                expected_model.get_submodule(name).weight += delta
    torch.testing.assert_close(logits(model, ids), logits(expected_model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_training_step_changes_only_lora_weights(family, ids):
    model = lora(routed_model(family))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    routing_before = {
        i: {k: v.clone() for k, v in layer.routing_state().items()}
        for i, layer in routing_layers(model).items()
    }

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()

    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if "lora_" in k}
    for index, layer in routing_layers(model).items():
        for key, value in layer.routing_state().items():
            assert torch.equal(value, routing_before[index][key])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("same_folder", [False, True], ids=["separate", "same-folder"])
def test_lora_and_routing_adapters_save_load_and_stack_in_either_order(family, same_folder, ids, tmp_path):
    model = lora(routed_model(family))
    expected = logits(model, ids)
    lora_dir = tmp_path / "adapters" if same_folder else tmp_path / "lora"
    routing_dir = tmp_path / "adapters" if same_folder else tmp_path / "routing"
    model.save_pretrained(lora_dir)
    save_routing_adapter(model, routing_dir)
    if same_folder:  # saving again in the other order keeps the other adapter's files
        model.save_pretrained(lora_dir)
        assert (routing_dir / CONFIG_NAME).exists() and (lora_dir / "adapter_config.json").exists()

    # routing first, then LoRA
    base = load_routing_adapter(tiny_model(family), routing_dir)
    first = PeftModel.from_pretrained(base, lora_dir)
    torch.testing.assert_close(logits(first, ids), expected, rtol=0, atol=0)

    # LoRA first, then routing (through the PEFT wrapper)
    second = PeftModel.from_pretrained(tiny_model(family), lora_dir)
    assert get_patch_state(second) is None
    load_routing_adapter(second, routing_dir)
    torch.testing.assert_close(logits(second, ids), expected, rtol=0, atol=0)

    # each adapter alone differs from the stack
    assert not torch.equal(logits(PeftModel.from_pretrained(tiny_model(family), lora_dir), ids), expected)
    assert not torch.equal(logits(load_routing_adapter(tiny_model(family), routing_dir), ids), expected)


def test_patching_through_the_peft_wrapper_survives_merge_and_unload(ids, tmp_path):
    peft_model = lora(tiny_model("mixtral"))
    patch_model(peft_model, OffsetConfig())  # patched via the wrapper: state lives on the base model
    randomize_offsets(peft_model)
    expected = logits(peft_model, ids)
    merged = peft_model.merge_and_unload()
    assert get_patch_state(merged) is not None
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)
    save_routing_adapter(merged, tmp_path / "routing")
    unpatch_model(merged)
    assert not any(hasattr(m, "routing") for m in merged.modules())


def test_all_linear_lora_on_router_and_experts_keeps_the_routing_adapter_working(ids, tmp_path):
    """PEFT's "all-linear" also wraps the router and experts of MoE models (``target_parameters``)."""
    model = routed_model("mixtral")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(target_modules="all-linear", r=4, init_lora_weights=False))
    assert "gate.weight" in (peft_model.peft_config["default"].target_parameters or ())
    expected = logits(peft_model, ids)
    with peft_model.disable_adapter():
        assert not torch.equal(logits(peft_model, ids), expected)
    assert len(routing_layers(peft_model)) == 2
    save_routing_adapter(peft_model, tmp_path / "routing")
    peft_model.save_pretrained(tmp_path / "lora")

    first = PeftModel.from_pretrained(tiny_model("mixtral"), tmp_path / "lora")
    load_routing_adapter(first, tmp_path / "routing")
    second = PeftModel.from_pretrained(
        load_routing_adapter(tiny_model("mixtral"), tmp_path / "routing"), tmp_path / "lora"
    )
    assert torch.equal(logits(first, ids), expected) and torch.equal(logits(second, ids), expected)

    unpatch_model(peft_model)
    assert get_patch_state(peft_model) is None
    assert not any(hasattr(m, "routing") for m in peft_model.modules())
