"""``torch.compile(model, fullgraph=True)`` of patched models matches the eager model.

``fullgraph=True`` turns any graph break into an error, so a passing case shows that the routing
layer (and, for variable-k routings, the sentinel-safe experts) traces into one graph. Most cases
compile with dynamo's ``eager`` backend: it runs the captured graph op by op, so it checks the
capture (graph breaks, data-dependent shapes, the static-shape sentinel path that only runs under
compile) in a few seconds. A few cases go through inductor, the default backend users get. Every
compiled model sees several batch shapes (with left padding) under ``dynamic=True``, so one graph
serves all of them. Tests named ``test_cuda_*`` run on a GPU only (``scripts/gpu_check.py`` runs them).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_moe_routing import ROUTING_METHODS, DynamicSkipConfig, patch_model, routing_layers
from hf_moe_routing.testing import tiny_model

#: every registered method, with the settings it routes with unfitted (``RoutingConfig.example``)
CONFIGS = {name: ROUTING_METHODS[name].example() for name in ROUTING_METHODS}
VARIABLE_K = {name for name, config in CONFIGS.items() if config.variable_k}
#: one family of each router style: softmax top-k (Mixtral), softmax with shared experts and no
#: renormalisation (Qwen2-MoE), sigmoid with group limiting and a selection bias (DeepSeek-V3)
FAMILIES = ("mixtral", "qwen2_moe", "deepseek_v3")
#: fewer layers than the tiny defaults: dynamo traces every layer (compile time grows with depth)
LAYERS = {"mixtral": 1, "qwen2_moe": 1, "deepseek_v3": 2}  # DeepSeek-V3: one dense, one MoE layer
#: (batch, length): batch >= 2 and length >= 2, so that dynamo does not specialise on size 1
SHAPES = [(2, 9), (3, 5), (2, 12)]


def patched_model(family: str, name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A tiny ``family`` model patched with routing ``name``; stateful layers get non-trivial state."""
    model = tiny_model(family, dtype=dtype, num_hidden_layers=LAYERS.get(family, 2))
    patch_model(model, CONFIGS[name])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in routing_layers(model).values():
            for state in layer.buffers():  # unfitted state (BIP's prices, Loss-Free's bias): small values
                if state.is_floating_point() and not state.any():
                    state.copy_(0.05 * torch.randn(state.shape, generator=generator))
            for param in layer.parameters():  # learned state (Ada-K: varied k per token, sentinel slots)
                param.copy_(torch.randn(param.shape, generator=generator))
    return model.to(device).eval()


def batches(device: str = "cpu"):
    generator = torch.Generator().manual_seed(2)
    for batch, length in SHAPES:
        ids = torch.randint(3, 128, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, : length // 3] = 0  # left padding in the first sequence
        yield ids.to(device), mask.to(device)


def compare(model: nn.Module, compiled: nn.Module, device: str = "cpu", **tolerance) -> float:
    """Largest |compiled - eager| logit difference over :data:`SHAPES`; asserts closeness."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    worst = 0.0
    for ids, mask in batches(device):
        with torch.no_grad():
            expected = model(ids, attention_mask=mask).logits
            actual = compiled(ids, attention_mask=mask).logits
        torch.testing.assert_close(actual, expected, **tolerance)
        worst = max(worst, float((actual.float() - expected.float()).abs().max()))
    for key, value in model.state_dict().items():  # eval: frozen state stays frozen
        assert torch.equal(value, state[key]), key
    return worst


def sentinel_share(model: nn.Module) -> float:
    """Share of slots the routing left unused (sentinel) on the first test batch."""
    seen: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda mod, args, out: seen.append(out[2] == mod.num_experts))
        for layer in routing_layers(model).values()
    ]
    ids, mask = next(batches())
    with torch.no_grad():
        model(ids.cpu(), attention_mask=mask.cpu())
    for hook in hooks:
        hook.remove()
    return float(torch.cat([s.reshape(-1) for s in seen]).float().mean())


#: every method on Mixtral and on DeepSeek-V3 (selection bias and group limiting in the choice and
#: the ranking); on Qwen2-MoE (shared experts, weights without renormalisation) Top-K and the
#: variable-k methods
CASES = (
    [("mixtral", name) for name in CONFIGS]
    + [("deepseek_v3", name) for name in CONFIGS]
    + [("qwen2_moe", name) for name in CONFIGS if name == "topk" or name in VARIABLE_K]
)


@pytest.mark.parametrize("family,name", CASES)
def test_fullgraph_capture_matches_eager(family, name):
    torch._dynamo.reset()
    model = patched_model(family, name)
    if name in VARIABLE_K:  # the case must exercise the sentinel path
        assert 0.05 < sentinel_share(model) < 0.95
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    compare(model, compiled, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inductor_fullgraph_matches_eager():
    """The default backend (inductor) on a variable-k routing: generated kernels, static-shape experts.

    One case only: a cold inductor compile takes about a minute on a small CPU.
    """
    torch._dynamo.reset()
    model = patched_model("qwen2_moe", "adak")
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    compare(model, compiled, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,fullgraph", [("top_p", True), ("bip", False)])
def test_compiled_training_step_matches_eager(name, fullgraph):
    """Loss, every gradient and the routing state after a compiled training step equal eager ones.

    top-p: sentinel slots in the backward, in one graph. BIP: its q update is data-dependent (the
    dual rounds run until the overload is small), so BIP trains compiled with graph breaks only
    (``fullgraph=False``); the update must still see the padding mask and run once.
    """
    torch._dynamo.reset()
    results = []
    for compile_it in (False, True):
        model = patched_model("mixtral", name).train()  # a fresh copy each (deepcopy shares hooks)
        module = (
            torch.compile(model, fullgraph=fullgraph, dynamic=True, backend="aot_eager")
            if compile_it
            else model
        )
        ids, mask = next(batches())
        loss = module(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        state = {k: v.clone() for k, v in model.state_dict().items() if "routing" in k}
        results.append((loss.detach(), grads, state))
    (loss, grads, state), (loss_c, grads_c, state_c) = results
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads.keys() and any("experts" in k for k in grads)
    for key, grad in grads.items():
        assert torch.isfinite(grads_c[key]).all(), key
        torch.testing.assert_close(grads_c[key], grad, rtol=1e-4, atol=1e-6)
    for key, value in state.items():
        torch.testing.assert_close(state_c[key], value, rtol=0, atol=1e-7)
    if name == "bip":
        assert all(int(v) == 1 for k, v in state_c.items() if k.endswith("num_updates"))


def test_uncalibrated_dynamic_skip_raises_when_compiled():
    """No beta yet: the compiled model raises like the eager one (a runtime check inside the graph)."""
    torch._dynamo.reset()
    model = tiny_model("mixtral", num_hidden_layers=1)
    patch_model(model, DynamicSkipConfig())
    ids, mask = next(batches())
    with pytest.raises(ValueError, match="no beta yet"):
        model(ids, attention_mask=mask)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with pytest.raises(RuntimeError, match="no beta yet"), torch.no_grad():
        compiled(ids, attention_mask=mask)


CUDA_CASES = [("deepseek_v3", "bip"), ("qwen2_moe", "adak")]  # two: GPU compiles take ~30 s each


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family,name", CUDA_CASES)
def test_cuda_inductor_bf16_matches_eager(family, name):
    """bf16 on a GPU through inductor (Triton kernels, torch.grouped_mm for the experts)."""
    torch._dynamo.reset()
    model = patched_model(family, name, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    compare(model, compiled, device="cuda", rtol=5e-2, atol=5e-2)
