"""The vLLM plugin's engine-independent part (no vLLM needed): the flow vLLM's Transformers backend
runs (HF model built on the meta device, patched, then its weights loaded), the version range, the
mismatch message and the dropped-slot mapping. ``tests_serving/`` serves real engines."""

import pytest
import torch

from hf_moe_routing import BIPConfig, LossFreeConfig, TopPConfig, load_routing_adapter, save_routing_adapter
from hf_moe_routing.integrations.vllm.routing import (
    ADAPTER_ENV,
    DROPPED_ENV,
    apply_adapter,
    check_vllm_version,
    dropped_mode,
    find_adapter,
    install_dropped_slot_hooks,
    reload_states,
    remap_dropped,
)
from hf_moe_routing.patching import patch_model, routing_layers
from hf_moe_routing.testing import tiny_model
from hf_moe_routing.testing.support import probe_ids


def _adapter(tmp_path, family, config):
    model = tiny_model(family)
    patch_model(model, config)
    for layer in routing_layers(model).values():
        for name in ("q", "bias"):
            if isinstance(getattr(layer, name, None), torch.Tensor):
                getattr(layer, name).copy_(torch.rand(layer.num_experts) * 0.3)
        if hasattr(layer, "num_updates"):
            layer.num_updates.fill_(1)
    folder = tmp_path / f"{family}-{config.routing_type}"
    save_routing_adapter(model, folder, model_card=False)
    return folder


def _as_vllm_builds_it(family):
    """Parameters on the meta device, buffers real (vLLM's ``init_on_device_without_buffers("meta")``)."""
    from accelerate import init_empty_weights

    config = tiny_model(family).config
    with init_empty_weights(include_buffers=False):
        return type(tiny_model(family))(config)


def _materialise(model):
    """vLLM's ``init_parameters``: every meta parameter becomes an empty CPU one (buffers untouched)."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type == "meta":
                setattr(module, name, torch.nn.Parameter(torch.empty_like(param, device="cpu")))


@pytest.mark.parametrize(
    "family, config",
    [("glm4_moe", LossFreeConfig()), ("mixtral", BIPConfig()), ("qwen2_moe", TopPConfig(p=0.5))],
)
def test_patching_on_meta_then_loading_weights_routes_as_the_patched_model(tmp_path, family, config):
    adapter = _adapter(tmp_path, family, config)
    reference = load_routing_adapter(tiny_model(family), adapter)
    served_model = _as_vllm_builds_it(family)
    served = apply_adapter(served_model, adapter, "tiny")
    _materialise(served_model)  # then vLLM loads the checkpoint (the base's)
    served_model.load_state_dict(tiny_model(family).state_dict(), strict=False)
    reload_states(served_model, served, torch.device("cpu"))  # Loss-Free's bias is written back
    served_model.eval()
    with torch.no_grad():
        want = reference(probe_ids()).logits
        got = served_model(probe_ids()).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if isinstance(config, TopPConfig):
        assert served.slots == 8  # top-p may use every expert: vLLM's fused experts get top_k = 8


def test_an_adapter_for_another_model_is_one_line_naming_both(tmp_path):
    adapter = _adapter(tmp_path, "qwen2_moe", BIPConfig())
    with pytest.raises(
        ValueError, match="saved for a qwen2_moe model with 8 experts, but vLLM serves my/mixtral"
    ) as e:
        apply_adapter(_as_vllm_builds_it("mixtral"), adapter, "my/mixtral")
    assert "\n" not in str(e.value) and "a mixtral model" in str(e.value)


def test_the_version_range_is_named_when_vllm_is_outside_it():
    check_vllm_version("0.32.0")
    check_vllm_version("0.34.1+cpu")
    for version in ("0.31.9", "0.35.0", "1.0.0"):
        with pytest.raises(RuntimeError, match=r"supports vllm >=0\.32\.0,<0\.35\.0, but vllm"):
            check_vllm_version(version)


def test_the_adapter_comes_from_the_environment_or_the_served_folder(tmp_path, monkeypatch):
    adapter = _adapter(tmp_path, "mixtral", BIPConfig())
    monkeypatch.delenv(ADAPTER_ENV, raising=False)
    assert find_adapter(adapter) == adapter
    assert find_adapter(tmp_path) is None
    monkeypatch.setenv(ADAPTER_ENV, str(adapter))
    assert find_adapter(tmp_path) == adapter
    monkeypatch.setenv(ADAPTER_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a routing adapter folder"):
        find_adapter(None)


def test_dropped_slots_map_to_a_real_expert_or_to_minus_one(monkeypatch):
    index = torch.tensor([[3, 8, 8], [5, 1, 8]])
    assert remap_dropped(index, 8).tolist() == [[3, 3, 3], [5, 1, 5]]
    assert remap_dropped(index, 8, "skip").tolist() == [[3, -1, -1], [5, 1, -1]]
    monkeypatch.setenv(DROPPED_ENV, "bogus")
    with pytest.raises(ValueError, match="choose one of"):
        dropped_mode()


def test_the_dropped_slot_hook_keeps_the_output_and_removes_sentinels(tmp_path):
    adapter = _adapter(tmp_path, "qwen2_moe", TopPConfig(p=0.5))
    model = tiny_model("qwen2_moe")
    served = apply_adapter(model, adapter, "tiny")
    seen = []
    with torch.no_grad():
        want = model(probe_ids()).logits
    assert install_dropped_slot_hooks(model, served, "zero") == 2
    for module in model.modules():
        if hasattr(module, "routing"):
            module.register_forward_hook(lambda m, a, out: seen.append(out[2]))
    with torch.no_grad():
        got = model(probe_ids()).logits
    assert seen and all(int(i.max()) < 8 for i in seen)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
