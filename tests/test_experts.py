"""The sentinel-safe experts implementation matches transformers' eager experts, forward and backward."""

import pytest
import torch

from hf_moe_routing import describe_model, patch_model, unpatch_model
from hf_moe_routing.core.experts import SENTINEL_EXPERTS
from hf_moe_routing.testing import (
    GENERIC_FAMILIES,
    REQUIRED_FAMILIES,
    TINY_CONFIGS,
    DropSlotsConfig,
    tiny_model,
)

ALL_FAMILIES = REQUIRED_FAMILIES + GENERIC_FAMILIES
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _variable_k_routing(num_tokens: int, top_k: int, num_experts: int, seed: int = 0):
    """Random index/weights with 0..top_k real slots per token (sentinel ``num_experts`` elsewhere).

    The last two experts never receive a token (empty experts); token 0 has only sentinel slots.
    """
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts - 2, generator=generator)
    index = scores.topk(top_k, dim=-1).indices
    kept = torch.randint(0, top_k + 1, (num_tokens,), generator=generator)
    kept[0] = 0
    kept[1] = top_k
    valid = torch.arange(top_k)[None, :] < kept[:, None]
    index = index.masked_fill(~valid, num_experts)
    weights = torch.rand(num_tokens, top_k, generator=generator).masked_fill(~valid, 0.0)
    return index, weights


def _run_experts(model, experts, implementation, hidden, index, weights, probe):
    model.set_experts_implementation(implementation)
    hidden = hidden.detach().clone().requires_grad_(True)
    weights = weights.detach().clone().requires_grad_(True)
    experts.zero_grad(set_to_none=True)
    out = experts(hidden, index, weights)
    (out.float() * probe).sum().backward()
    param_grads = {name: p.grad.detach().clone() for name, p in experts.named_parameters()}
    return out.detach(), hidden.grad, weights.grad, param_grads


def _check_matches_eager(family: str, dtype: torch.dtype, device: str = "cpu") -> None:
    """Sentinel experts vs transformers' eager experts of ``family``: outputs and every gradient."""
    model = tiny_model(family, dtype=dtype).to(device)
    blocks = describe_model(model).blocks
    experts = blocks[0].experts
    m, top_k = experts.num_experts, blocks[0].spec.top_k
    index, weights = _variable_k_routing(40, top_k, m)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, model.config.hidden_size, generator=generator).to(device, dtype)
    weights = weights.to(device, dtype)
    index = index.to(device)
    probe = torch.randn(40, model.config.hidden_size, generator=generator).to(device)

    eager = _run_experts(model, experts, "eager", hidden, index, weights, probe)
    ours = _run_experts(model, experts, SENTINEL_EXPERTS, hidden, index, weights, probe)
    tol = TOLERANCE[dtype]
    assert ours[0].dtype == eager[0].dtype == dtype
    torch.testing.assert_close(ours[0], eager[0], **tol)
    torch.testing.assert_close(ours[1], eager[1], **tol)  # d hidden states
    torch.testing.assert_close(ours[2], eager[2], **tol)  # d routing weights
    for name in eager[3]:
        torch.testing.assert_close(ours[3][name], eager[3][name], **tol)
    # all-sentinel token and empty experts: nothing computed, nothing back-propagated
    assert torch.all(ours[0][0] == 0) and torch.all(ours[1][0] == 0)
    assert torch.all(ours[2][index == m] == 0)
    for name, grad in ours[3].items():
        if grad.dim() == 3:
            assert torch.all(grad[-2:] == 0), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_matches_eager_forward_and_backward(family, dtype):
    _check_matches_eager(family, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_cuda_matches_eager_forward_and_backward(family, dtype):
    """On a GPU, bf16 goes through torch's grouped_mm kernel (the CPU runs a fallback loop)."""
    _check_matches_eager(family, dtype, "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_static_shape_path_matches_the_eager_path(family, dtype, monkeypatch):
    """The path taken under torch.compile (all slots sorted, sentinel rows masked), run eagerly.

    Same outputs and gradients as the eager path, and no NaN from the rows grouped_mm leaves
    uninitialised (the masks come before the routing weights multiply them).
    """
    if family not in TINY_CONFIGS:
        pytest.skip(f"no tiny {family} model yet")
    model = tiny_model(family, dtype=dtype)
    blocks = describe_model(model).blocks
    experts = blocks[0].experts
    index, weights = _variable_k_routing(40, blocks[0].spec.top_k, experts.num_experts)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, model.config.hidden_size, generator=generator).to(dtype)
    weights = weights.to(dtype)
    probe = torch.randn(40, model.config.hidden_size, generator=generator)
    dynamic = _run_experts(model, experts, SENTINEL_EXPERTS, hidden, index, weights, probe)
    calls = []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: calls.append(1) or True)
    static = _run_experts(model, experts, SENTINEL_EXPERTS, hidden, index, weights, probe)
    assert calls  # the static branch ran
    tol = TOLERANCE[dtype]
    for ours, reference in zip(static[:3], dynamic[:3]):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, reference, **tol)
    for name, grad in dynamic[3].items():
        assert torch.isfinite(static[3][name]).all(), name
        torch.testing.assert_close(static[3][name], grad, **tol)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_all_sentinel_batch_gives_zeros(family):
    model = tiny_model(family)
    model.set_experts_implementation(SENTINEL_EXPERTS)
    blocks = describe_model(model).blocks
    experts = blocks[0].experts
    hidden = torch.randn(5, model.config.hidden_size, requires_grad=True)
    index = torch.full((5, blocks[0].spec.top_k), experts.num_experts)
    weights = torch.zeros(index.shape, requires_grad=True)
    out = experts(hidden, index, weights)
    assert out.shape == hidden.shape and torch.all(out == 0)
    out.sum().backward()
    assert torch.all(hidden.grad == 0) and torch.all(weights.grad == 0)


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("previous", ["grouped_mm", "eager"])
def test_variable_k_patch_switches_and_restores_the_implementation(family, previous, ids):
    model = tiny_model(family)
    model.set_experts_implementation(previous)
    patch_model(model, DropSlotsConfig())
    assert model.config._experts_implementation == SENTINEL_EXPERTS
    with torch.no_grad():
        ours = model(ids).logits
        model.set_experts_implementation("eager")  # eager skips sentinel slots too: the reference
        reference = model(ids).logits
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    model.set_experts_implementation(SENTINEL_EXPERTS)
    unpatch_model(model)
    assert model.config._experts_implementation == previous


def test_backward_through_a_patched_model(ids):
    model = tiny_model("qwen2_moe").train()
    patch_model(model, DropSlotsConfig())
    loss = model(ids, labels=ids).loss
    loss.backward()
    expert_grad = model.model.layers[0].mlp.experts.gate_up_proj.grad
    router_grad = model.model.layers[0].mlp.gate.weight.grad
    assert torch.isfinite(loss) and expert_grad is not None and router_grad is not None
    assert expert_grad.abs().sum() > 0 and router_grad.abs().sum() > 0
