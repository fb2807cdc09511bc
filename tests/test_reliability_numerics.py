"""Reliability, numerics: no 0/0 weights (issue 10, item 1), the run-time policy for non-finite hidden
states (item 2), and routing exactly as the model does at its own k, ties included (item 6).

Expected values are computed here independently: weights by the families' formulas in float64 with
0/0 replaced by 0, and routing decisions by the unpatched router's own forward.
"""

from __future__ import annotations

import pytest
import torch
from reliability_models import KIND_FAMILIES, RENORMALISING, make_model, scale_router_weights
from torch import nn

from hf_moe_routing import (
    AdaKConfig,
    BIPConfig,
    DynamicSkipConfig,
    LossControlledConfig,
    LossFreeConfig,
    TopKConfig,
    TopPConfig,
    patch_model,
    routing_layers,
)
from hf_moe_routing.families import describe_model
from hf_moe_routing.methods.adak import recording

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _reference_weights(spec, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The family's renormalised weights in float64, with a 0 denominator giving 0 (not NaN)."""
    scores = spec.scores(logits).double()
    chosen = scores.gather(1, index)
    total = chosen.sum(dim=-1, keepdim=True)
    if spec.kind.norm == "eps":
        total = total + spec.norm_value
    elif spec.kind.norm == "clamp":
        total = total.clamp(min=spec.norm_value)
    weights = torch.where(total > 0, chosen / torch.where(total > 0, total, 1.0), 0.0)
    return weights * (spec.scaling or 1.0)


# ---- item 1: weights are never 0/0 ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", RENORMALISING)
def test_bip_before_on_underflowing_probabilities_keeps_weights_and_loss_finite(family, dtype):
    """The issue's case: router weights x100 (softmax probabilities underflow to exactly 0), BIP
    "before", 3 training forwards. BIP moves tokens onto experts of probability 0; the family's
    renormalisation must give them weight 0, never NaN, and the loss must stay close to Top-K's."""
    batches = [torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    losses, zero_mass = {}, 0
    for name, config in (("topk", TopKConfig()), ("bip", BIPConfig(update="before"))):
        model = scale_router_weights(make_model(family, dtype=dtype), 100.0)
        model.config.use_cache = False
        patch_model(model, config)
        model.train()
        seen = []
        hooks = [
            b.router.register_forward_hook(
                lambda mod, args, out, seen=seen: seen.append((mod.routing.spec, out))
            )
            for b in describe_model(model).blocks
        ]
        losses[name] = []
        for ids in batches:
            out = model(ids, labels=ids)
            losses[name].append(float(out.loss.detach()))
        out.loss.backward()  # gradients of the last step stay finite too
        for hook in hooks:
            hook.remove()
        for p in model.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()
        if name == "bip":
            for spec, (logits, weights, index) in seen:
                expected = _reference_weights(spec, logits.detach(), index)
                assert torch.isfinite(weights).all()
                torch.testing.assert_close(weights.double(), expected, rtol=1e-2, atol=1e-3)
                chosen = spec.scores(logits.detach()).gather(1, index)
                zero_mass += int((chosen.sum(dim=-1) == 0).sum())
    assert all(torch.isfinite(torch.tensor(losses["bip"])))
    for bip, topk in zip(losses["bip"], losses["topk"], strict=True):
        assert abs(bip - topk) < 0.1, (losses["bip"], losses["topk"])
    if family in ("mixtral", "qwen3_moe", "ernie4_5_moe"):  # measured: BIP moves tokens onto 0-mass sets
        assert zero_mass > 0


def test_renormalize_is_bit_exact_where_defined_and_zero_where_the_mass_is_zero():
    from hf_moe_routing.core.ops import renormalize

    for dtype in DTYPES:
        w = torch.tensor([[0.25, 0.5], [0.0, 0.0], [1e-30, 3e-30]], dtype=torch.float32).to(dtype)
        out = renormalize(w)
        assert out.dtype == dtype
        torch.testing.assert_close(out[0], w[0] / w[0].sum())
        assert torch.equal(out[1], torch.zeros(2, dtype=dtype))
        assert torch.isfinite(out).all()
    w = torch.tensor([[0.0, 0.0], [0.2, 0.2]])
    assert torch.equal(renormalize(w, eps=1e-20)[1], w[1] / (w[1].sum() + 1e-20))
    assert torch.equal(renormalize(w, minimum=0.0), torch.tensor([[0.0, 0.0], [0.5, 0.5]]))
    assert torch.equal(renormalize(w, minimum=1.0)[1], w[1])  # clamp(0.4, min=1) = 1
    assert torch.isnan(renormalize(torch.tensor([[float("nan"), 1.0]]))).all()  # NaN is not hidden


# ---- item 2: non-finite hidden states at run time ------------------------------------------------
def _nan_embeds(model, ids, value=float("nan")):
    embeds = model.get_input_embeddings()(ids).detach().clone()
    embeds[0, 3, 5] = value
    return embeds


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize(
    ("config", "mode"),
    [
        (BIPConfig(), "train"),
        (BIPConfig(update="before"), "train"),
        (LossFreeConfig(), "train"),
        (AdaKConfig(), "train"),
        (AdaKConfig(decision="sample"), "eval"),
        (DynamicSkipConfig(), "fit"),
    ],
    ids=["bip-after", "bip-before", "loss-free", "adak-train", "adak-sample", "skip-calibration"],
)
def test_non_finite_hidden_states_that_would_reach_state_or_a_draw_raise_naming_the_layer(
    config, mode, value, ids
):
    model = make_model("mixtral")
    patch_model(model, config)
    layers = routing_layers(model)
    before = {i: {k: v.clone() for k, v in layer.state_dict().items()} for i, layer in layers.items()}
    embeds = _nan_embeds(model, ids, value)
    with pytest.raises(ValueError, match=r"routing of layer 0 \(model\.layers\.0\.mlp\).*NaN or infinite"):
        if mode == "fit":
            _calibrate(model, embeds)
        else:
            model.train(mode == "train")
            with torch.no_grad():
                model(inputs_embeds=embeds)
    for i, layer in layers.items():  # nothing was poisoned
        for key, old in before[i].items():
            torch.testing.assert_close(layer.state_dict()[key], old, rtol=0, atol=0, equal_nan=True)


def _calibrate(model, embeds):
    layers = routing_layers(model)
    for layer in layers.values():
        layer.begin_fit()
    try:
        with torch.no_grad():
            model(inputs_embeds=embeds)
    finally:
        for layer in layers.values():
            layer.abort_fit()


def test_ada_k_recording_refuses_non_finite_states_also_in_top_k_mode(ids):
    model = make_model("mixtral")
    patch_model(model, AdaKConfig())
    for layer in routing_layers(model).values():
        layer.use_topk = True
    with recording(model), pytest.raises(ValueError, match="layer 0.*recorded"), torch.no_grad():
        model(inputs_embeds=_nan_embeds(model, ids))


@pytest.mark.parametrize(
    "config",
    [
        TopKConfig(),
        TopKConfig(top_k=1),
        LossControlledConfig(),
        TopPConfig(p=0.7),
        DynamicSkipConfig(beta=0.5),
        DynamicSkipConfig(beta=0.5, renormalize=True),
        AdaKConfig(),
        AdaKConfig(renormalize=False),
        BIPConfig(),
        LossFreeConfig(),
    ],
    ids=lambda c: f"{type(c).__name__}{'-' + str(c.renormalize) if hasattr(c, 'renormalize') else ''}",
)
@pytest.mark.parametrize("family", KIND_FAMILIES)
def test_forwards_that_learn_and_draw_nothing_pass_nan_through_like_the_model(family, config):
    """Inference: no error, no extra sync; the NaN token stays NaN only where the model has it, every
    finite token routes as without the NaN, and unused slots keep index m and weight exactly 0."""
    model = make_model(family)
    try:
        patch_model(model, config)
    except ValueError as error:  # options that would do nothing here (tested in test_reliability_options)
        assert "no effect" in str(error) or "no meaning" in str(error)
        pytest.skip(f"refused on {family}")
    block = describe_model(model).blocks[-1]
    layer, router, m = block.router.routing, block.router, block.spec.num_experts
    layer.eval()
    hidden = torch.randn(6, block.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    clean = layer(router, hidden)
    for value in (float("nan"), float("inf"), -float("inf")):
        bad = hidden.clone()
        bad[2, 7] = value
        logits, weights, index = layer(router, bad)
        assert ((index >= 0) & (index <= m)).all()
        assert torch.equal(weights[index == m], torch.zeros_like(weights[index == m]))
        rows = torch.arange(6) != 2
        assert torch.equal(index[rows], clean.index[rows])
        assert torch.equal(weights[rows], clean.weights[rows])


# ---- item 6: at the model's own k, exactly the model's routing, ties included --------------------
class _ConstantAllocator(nn.Module):
    """Allocator logits that make every token choose ``k`` (Ada-K's decision, forced)."""

    def __init__(self, k_max: int, k: int) -> None:
        super().__init__()
        self.k_max, self.k = k_max, k

    def features(self, hidden: torch.Tensor, ordered_probs: torch.Tensor | None = None) -> torch.Tensor:
        return hidden.reshape(-1, hidden.shape[-1]).float()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(hidden.reshape(-1, hidden.shape[-1]).shape[0], self.k_max)
        logits[:, self.k - 1] = 1.0
        return logits


TIE_FAMILIES = {  # bf16 router logits (the families that compute them in the hidden states' dtype)
    "mixtral": dict(num_local_experts=64, num_experts_per_tok=8),
    "qwen2_moe": dict(num_experts=64, num_experts_per_tok=8),
    "gpt_oss": dict(num_local_experts=64, num_experts_per_tok=8),
    "llama4_text": dict(num_local_experts=64, num_experts_per_tok=8),
    "deepseek_v3": dict(n_routed_experts=64, num_experts_per_tok=8),
}


def _tied_inputs(block, n=512):
    """Coarse router weights and hidden states: many logits tie exactly (in bf16 and after softmax)."""
    gen = torch.Generator().manual_seed(0)
    weight = block.spec.weight(block.router)
    with torch.no_grad():
        weight.copy_(torch.randint(-2, 3, weight.shape, generator=gen).to(weight.dtype) / 4)
    return torch.randint(-1, 2, (n, block.spec.hidden_size), generator=gen).to(torch.bfloat16)


AT_MODEL_K = [
    ("topk", lambda top_k: TopKConfig()),
    ("topk-k", lambda top_k: TopKConfig(top_k=top_k)),
    ("adak-none", lambda top_k: AdaKConfig(renormalize=None)),
    ("top-p-1", lambda top_k: TopPConfig(p=1.0, max_k=top_k)),
    ("skip-beta-0", lambda top_k: DynamicSkipConfig(beta=0.0)),
    ("bip-q-0", lambda top_k: BIPConfig()),
    ("loss-free-b-0", lambda top_k: LossFreeConfig()),
    ("loss-controlled", lambda top_k: LossControlledConfig()),
]


@pytest.mark.parametrize("family", list(TIE_FAMILIES))
def test_every_routing_at_the_models_k_routes_exactly_as_the_model_ties_included(family):
    model = make_model(family, dtype=torch.bfloat16, **TIE_FAMILIES[family])
    block = describe_model(model).blocks[-1]
    spec, router = block.spec, block.router
    hidden = _tied_inputs(block)
    expected = router(hidden)  # the unpatched router's own output
    choice = spec.choice(spec.logits(router, hidden), spec.scores(spec.logits(router, hidden)))
    kth = choice.topk(spec.top_k + 1, dim=-1).values
    if family != "deepseek_v3":  # float32 sigmoid logits: ties are rarer; the others must have them
        assert (kth[:, -1] == kth[:, -2]).float().mean() > 0.1  # the k-th and (k+1)-th best tie
    for name, make in AT_MODEL_K:
        patch_model(model, make(spec.top_k), replace=True)
        layer = block.router.routing
        if name == "adak-none":
            layer.allocator = _ConstantAllocator(layer.k_max, spec.top_k)
        got = spec.decode(block.router(hidden))  # eval mode: no state changes
        want = spec.decode(expected)
        assert torch.equal(got.logits, want.logits)
        k = want.index.shape[1]
        extra_index, extra_weights = got.index[:, k:], got.weights[:, k:]  # variable-k: unused slots
        assert (extra_index == spec.num_experts).all() and (extra_weights == 0).all(), (family, name)
        assert torch.equal(got.index[:, :k], want.index), (family, name)  # same experts, same slots
        assert torch.equal(got.weights[:, :k], want.weights), (family, name)
