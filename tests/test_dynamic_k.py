"""Dynamic-k baselines: top-p routing and dynamic skipping, against direct per-token references."""

import math

import pytest
import torch

from hf_moe_routing import (
    DynamicSkipConfig,
    TopKConfig,
    TopPConfig,
    describe_model,
    patch_model,
    unpatch_model,
)
from hf_moe_routing.methods import RoutingConfig
from hf_moe_routing.methods.dynamic_skip import calibrate
from hf_moe_routing.patching import routing_layers
from hf_moe_routing.testing import GENERIC_FAMILIES, REQUIRED_FAMILIES, tiny_model

VARIANTS = [(f, {}) for f in REQUIRED_FAMILIES + GENERIC_FAMILIES] + [
    (
        "deepseek_v2",
        dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0),
    ),
    ("qwen2_moe", dict(norm_topk_prob=True)),
]
IDS = lambda v: v if isinstance(v, str) else ""  # noqa: E731


def _eligible(gate, scores):
    """(n, m) bool: experts the family allows each token (DeepSeek group limits), computed directly."""
    n, m = scores.shape
    groups, keep = None, None
    if getattr(gate, "topk_method", None) == "group_limited_greedy":  # DeepSeek-V2: group score = max
        groups, keep = gate.num_group, gate.topk_group
        group_scores = scores.view(n, groups, m // groups).max(-1).values
    elif hasattr(gate, "e_score_correction_bias"):  # DeepSeek-V3: group score = sum of top-2 biased scores
        groups, keep = gate.num_group, gate.topk_group
        biased = (scores + gate.e_score_correction_bias).view(n, groups, m // groups)
        group_scores = biased.topk(2, dim=-1).values.sum(-1)
    if groups is None:
        return torch.ones(n, m, dtype=torch.bool)
    chosen = group_scores.topk(keep, dim=-1).indices
    mask = torch.zeros(n, groups, dtype=torch.bool).scatter(1, chosen, True)
    return mask.repeat_interleave(m // groups, dim=1)


def _dense(index, weights, m):
    """(n, m) weight matrix of a routing output (sentinel slots dropped)."""
    dense = torch.zeros(index.shape[0], m + 1, dtype=torch.float32)
    dense.scatter_add_(1, index, weights.float())
    return dense[:, :m]


def _reference_weights(spec, gate, scores, chosen, normalize=None):
    """Family weights of the chosen experts (bool (n, m)), computed by hand."""
    w = scores * chosen
    if spec.renorm if normalize is None else normalize:
        w = w / w.sum(-1, keepdim=True)
    scale = spec.scaling
    return w * (scale if scale is not None else 1.0)


def _reference_top_p(spec, gate, hidden, p, max_k):
    """Per-token loop: rank experts by the family's choice score, take ranks until the mass reaches p."""
    scores = spec.scores(spec.logits(gate, hidden))
    bias = getattr(gate, "e_score_correction_bias", None)
    ranking = scores + bias if bias is not None else scores
    eligible = _eligible(gate, scores)
    probs = scores / scores.sum(-1, keepdim=True)
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    for i in range(scores.shape[0]):
        order = [
            j for j in sorted(range(scores.shape[1]), key=lambda j: -float(ranking[i, j])) if eligible[i, j]
        ]
        mass = 0.0
        for j in order[:max_k]:
            if mass >= p:
                break
            chosen[i, j] = True
            mass += float(probs[i, j])
    return chosen, _reference_weights(spec, gate, scores, chosen)


@pytest.mark.parametrize(("family", "overrides"), VARIANTS, ids=IDS)
@pytest.mark.parametrize(("p", "max_k"), [(0.3, None), (0.7, None), (0.9, 3)])
@torch.no_grad()
def test_top_p_matches_direct_reference(family, overrides, p, max_k):
    model = tiny_model(family, **overrides)
    blocks = describe_model(model).blocks
    spec = blocks[0].spec
    torch.manual_seed(1)
    hidden = {b.layer_index: torch.randn(40, spec.hidden_size) for b in blocks}
    patch_model(model, TopPConfig(p=p, max_k=max_k))
    m = spec.num_experts
    for block in blocks:
        logits, weights, index = block.router(hidden[block.layer_index])
        assert index.shape[1] == (max_k or m)
        assert ((index == m) == (weights == 0)).all(), "sentinel slots, and only they, have weight 0"
        chosen, ref_w = _reference_top_p(block.spec, block.router, hidden[block.layer_index], p, max_k or m)
        assert torch.equal(_dense(index, weights, m) > 0, chosen)
        torch.testing.assert_close(_dense(index, weights, m), ref_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_variable_k_forward_matches_eager_experts(family, ids):
    model = tiny_model(family)
    for config in (TopPConfig(p=0.5), DynamicSkipConfig(beta=0.6)):
        patch_model(model, config, replace=True)
        with torch.no_grad():
            fast = model(ids).logits
            model.set_experts_implementation("eager")
            eager = model(ids).logits
            model.set_experts_implementation("sentinel_grouped_mm")
        torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-5)


def test_top_p_full_mass_with_cap_k_is_top_k(ids):
    model = tiny_model("mixtral")
    with torch.no_grad():
        ref = model(ids).logits
        patch_model(model, TopPConfig(p=1.0, max_k=2))
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
        # a tiny p gives every token exactly one expert
        patch_model(model, TopPConfig(p=1e-6), replace=True)
        _, _, index = model.model.layers[0].mlp.gate(torch.randn(30, 64))
        assert ((index < 8).sum(-1) == 1).all()


def _reference_skip(spec, gate, hidden, beta, renormalize):
    """Per-token loop: the family's top-k, then drop expert j when s_j < beta * max s."""
    _, _, index = spec.route(gate, hidden)
    scores = spec.scores(spec.logits(gate, hidden))
    kept = torch.zeros_like(scores, dtype=torch.bool)
    topk = torch.zeros_like(scores, dtype=torch.bool)
    for i in range(scores.shape[0]):
        sel = [int(j) for j in index[i]]
        best = max(float(scores[i, j]) for j in sel)
        for j in sel:
            topk[i, j] = True
            kept[i, j] = float(scores[i, j]) >= beta * best
    if renormalize:
        return kept, _reference_weights(spec, gate, scores, kept)
    return kept, _reference_weights(spec, gate, scores, topk) * kept


@pytest.mark.parametrize(("family", "overrides"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("renormalize", [False, True])
@torch.no_grad()
def test_dynamic_skip_matches_direct_reference(family, overrides, renormalize):
    model = tiny_model(family, **overrides)
    blocks = describe_model(model).blocks
    spec = blocks[0].spec
    torch.manual_seed(2)
    if renormalize and not (spec.renorm or spec.kind.score == "softmax_topk"):
        with pytest.raises(ValueError, match="has no effect"):  # per-expert weights: nothing to renormalise
            patch_model(model, DynamicSkipConfig(beta=0.5, renormalize=renormalize))
        return
    patch_model(model, DynamicSkipConfig(beta=0.5, renormalize=renormalize))
    m = spec.num_experts
    for block in blocks:
        hidden = torch.randn(40, spec.hidden_size)
        _, weights, index = block.router(hidden)
        kept, ref_w = _reference_skip(block.spec, block.router, hidden, 0.5, renormalize)
        assert torch.equal(_dense(index, weights, m) > 0, kept)
        assert ((index < m).sum(-1) >= 1).all()
        torch.testing.assert_close(_dense(index, weights, m), ref_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_calibration_sets_beta_to_the_median_ratio_and_excludes_padding(family):
    model = tiny_model(family)
    blocks = describe_model(model).blocks
    gen = torch.Generator().manual_seed(3)
    data = torch.randint(3, 128, (6, 16), generator=gen)
    # reference ratios w_(j)/w_(1) from the unpatched routers' own top-k weights
    ratios: dict[int, list[torch.Tensor]] = {b.layer_index: [] for b in blocks}
    hooks = [
        b.router.register_forward_hook(
            lambda mod, args, out, i=b.layer_index: ratios[i].append(
                (lambda w: w[:, 1:] / w[:, :1])(out[1].float().sort(-1, descending=True).values)
            )
        )
        for b in blocks
    ]
    with torch.no_grad():
        model(data)
    for h in hooks:
        h.remove()

    patch_model(model, DynamicSkipConfig())
    # the same tokens plus padded rows: padding must not change beta
    padded_ids = torch.cat([data, torch.zeros(1, 16, dtype=torch.long)])
    padded_mask = torch.ones_like(padded_ids)
    padded_mask[-1] = 0
    betas = calibrate(
        model, {"input_ids": padded_ids, "attention_mask": padded_mask}, batch_size=4, progress=False
    )
    assert set(betas) == {b.layer_index for b in blocks}
    for i, layer in routing_layers(model).items():
        flat = torch.cat(ratios[i]).reshape(-1).sort().values
        lo, hi = flat[(flat.numel() - 1) // 2], flat[flat.numel() // 2]
        assert float(lo) - 1e-6 <= betas[i] <= float(hi) + 1e-6
        assert float(layer.beta) == pytest.approx(betas[i])
    assert "beta" in routing_layers(model)[blocks[0].layer_index].routing_state()
    # ragged records: the short row is right-padded and its padding is not counted either
    records = [{"input_ids": row.tolist()} for row in data[:5]] + [{"input_ids": data[5, :9].tolist()}]
    ragged = calibrate(model, records, batch_size=6, progress=False)
    unpatch_model(model)
    expected = {i: [] for i in ratios}
    hooks = [
        b.router.register_forward_hook(
            lambda mod, args, out, i=b.layer_index: expected[i].append(
                (lambda w: w[:, 1:] / w[:, :1])(out[1].float().sort(-1, descending=True).values)
            )
        )
        for b in blocks
    ]
    with torch.no_grad():
        model(data[:5])
        model(data[5:, :9])
    for h in hooks:
        h.remove()
    for i, beta in ragged.items():
        flat = torch.cat([e.reshape(-1) for e in expected[i]]).sort().values
        assert float(flat[(flat.numel() - 1) // 2]) - 1e-6 <= beta <= float(flat[flat.numel() // 2]) + 1e-6


def test_calibrated_skipping_drops_about_half_of_the_second_experts_and_round_trips(ids):
    model = tiny_model("mixtral")
    data = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(4))
    patch_model(model, DynamicSkipConfig())
    with pytest.raises(ValueError, match="calibrate"):
        model(ids)
    calibrate(model, data, batch_size=4, progress=False)
    counts = []
    hook = model.model.layers[0].mlp.gate.register_forward_hook(
        lambda m, a, out: counts.append((out[2] < 8).sum(-1))
    )
    with torch.no_grad():
        logits = model(data).logits
    hook.remove()
    activated = torch.cat(counts).float().mean().item()
    assert 1.4 <= activated <= 1.6  # the median skips half of the second slots on the calibration tokens

    states = {i: layer.routing_state() for i, layer in routing_layers(model).items()}
    other = tiny_model("mixtral")
    patch_model(other, DynamicSkipConfig())
    for i, layer in routing_layers(other).items():
        layer.load_routing_state(states[i])
    with torch.no_grad():
        assert torch.equal(other(data).logits, logits)
    assert not math.isnan(float(routing_layers(other)[0].beta))


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "message"),
    [
        (TopPConfig, dict(p=0.0), ValueError, r"\(0\.0, 1\.0\]"),
        (TopPConfig, dict(p=1.5), ValueError, r"\(0\.0, 1\.0\]"),
        (TopPConfig, dict(p="0.5"), TypeError, "expected a number"),
        (TopPConfig, dict(max_k=0), ValueError, r"\[1, inf\]"),
        (TopPConfig, dict(max_k=9), ValueError, "outside 1..8"),
        (DynamicSkipConfig, dict(beta=1.5), ValueError, r"\[0\.0, 1\.0\]"),
        (DynamicSkipConfig, dict(quantile=1.0), ValueError, r"\(0\.0, 1\.0\)"),
    ],
)
def test_bad_configs_raise_clear_errors_and_leave_the_model_alone(cls, kwargs, error, message, ids):
    """Settings are checked at construction; model-dependent limits (max_k vs experts) at patch time."""
    model = tiny_model("mixtral")
    with pytest.raises(error, match=message):
        patch_model(model, cls(**kwargs))
    assert not hasattr(model, "_hf_moe_routing")


def test_dynamic_skip_refuses_top1_models():
    model = tiny_model("mixtral", num_experts_per_tok=1)
    with pytest.raises(ValueError, match="nothing to skip"):
        patch_model(model, DynamicSkipConfig(beta=0.5))


def test_calibrate_needs_a_dynamic_skip_model():
    model = tiny_model("qwen3_moe")
    patch_model(model, TopKConfig())
    with pytest.raises(ValueError, match="DynamicSkipConfig"):
        calibrate(model, torch.ones(1, 4, dtype=torch.long), progress=False)


def test_configs_round_trip_through_json():
    for config in (TopPConfig(p=0.4, max_k=3, normalize=True), DynamicSkipConfig(beta=0.3, renormalize=True)):
        assert RoutingConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_generate_with_variable_k(family):
    model = tiny_model(family)
    prompt = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(5))
    patch_model(model, TopPConfig(p=0.6))
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    # cached decoding routes one token at a time and gives the same logits as a full forward
    with torch.no_grad():
        full = model(out).logits[:, -1]
        step = model(out[:, :-1], use_cache=True)
        cached = model(out[:, -1:], past_key_values=step.past_key_values).logits[:, -1]
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
