"""Ada-K routing: allocator layers, sentinel routing, generation, warm-up labels and PPO math."""

import json
import math

import pytest
import torch

from hf_moe_routing import get_patch_state, is_patched, patch_model, routing_layers, unpatch_model
from hf_moe_routing.methods.adak import (
    AdaKConfig,
    AdaKLayer,
    Allocator,
    adak_layers,
    default_routing,
    recording,
)
from hf_moe_routing.methods.adak.ppo import (
    action_log_probs,
    choose_k,
    clipped_surrogate,
    entropy,
    expected_k,
    expected_k_penalty,
    layer_advantages,
    leave_one_out_advantages,
    normalize_advantages,
    policy_gradient_snr,
    ppo_clipped_objective,
    token_log_likelihood,
)
from hf_moe_routing.methods.adak.warmup import (
    calibrate_skip_threshold,
    choose_threshold,
    k_warm_init,
    ordered_probabilities,
    skip_labels,
    skip_warm_init,
    threshold_labels,
    warmup_loss,
)
from hf_moe_routing.methods.base import RoutingConfig
from hf_moe_routing.methods.topk import TopKLayer
from hf_moe_routing.testing import GENERIC_FAMILIES, REQUIRED_FAMILIES, tiny_model

ALL_FAMILIES = REQUIRED_FAMILIES + GENERIC_FAMILIES


pytestmark = pytest.mark.usefixtures("one_thread")


def _force_k(model, k: int) -> None:
    """Make every allocator choose k (a very large logit on k), whatever the input."""
    for layer in adak_layers(model).values():
        with torch.no_grad():
            layer.allocator.weight.zero_()

        def fixed(hidden, layer=layer):
            logits = torch.full((hidden.shape[0], layer.k_max), -30.0)
            logits[:, k - 1] = 30.0
            return logits.to(hidden.device)

        layer.allocator.forward = fixed


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


# ---- config and allocator ------------------------------------------------------------------------
def test_config_round_trips_through_json():
    config = AdaKConfig(k_max=4, decision="sample", layers=[1, 0], renormalize=False)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["routing_type"] == "adak" and data["layers"] == [0, 1]
    assert RoutingConfig.from_dict(data) == config
    assert AdaKConfig.variable_k


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(k_max=9), ValueError, "outside 1..8"),
        (dict(k_max=0), ValueError, r"must lie in \[1, inf\]"),
        (dict(layers=[0, 5]), ValueError, r"MoE layers of this model are \[0, 1\]"),
    ],
)
def test_bad_config_raises_and_leaves_model_unpatched(kwargs, error, match):
    model = tiny_model("mixtral")
    with pytest.raises(error, match=match):
        patch_model(model, AdaKConfig(**kwargs))
    assert not is_patched(model)


def test_bad_config_values_raise_at_construction():
    with pytest.raises(ValueError, match="greedy"):
        AdaKConfig(decision="best")
    with pytest.raises(TypeError, match="k_max"):
        AdaKConfig(k_max=2.5)


def test_k_max_above_group_limited_choice_raises():
    # DeepSeek-V3 tiny: 16 experts in 4 groups, 2 groups per token -> 8 selectable experts
    model = tiny_model("deepseek_v3")
    patch_model(model, AdaKConfig())  # default: the model's top-k
    assert {layer.k_max for layer in adak_layers(model).values()} == {4}
    unpatch_model(model)
    patch_model(model, AdaKConfig(k_max=8))
    unpatch_model(model)
    with pytest.raises(ValueError, match="group-limited"):
        patch_model(model, AdaKConfig(k_max=12))
    assert not is_patched(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_allocator_shapes_and_dtype(dtype):
    model = tiny_model("qwen3_moe", dtype=dtype)
    patch_model(model, AdaKConfig(k_max=4))
    layers = adak_layers(model)
    assert list(layers) == [0, 1]
    for layer in layers.values():
        shapes = {k: tuple(v.shape) for k, v in layer.routing_state().items()}
        assert shapes == {
            "allocator.weight": (4, 64),
            "allocator.router_weight": (4, 4),
            "allocator.bias": (4,),
        }
        assert all(v.dtype == torch.float32 for v in layer.routing_state().values())
        features = layer.allocator.features(torch.randn(2, 5, 64, dtype=dtype), torch.rand(10, 8).softmax(-1))
        out = layer.allocator(features)
        assert features.shape == (10, 68) and out.shape == (10, 4) and out.dtype == torch.float32
    paper = patch_model(tiny_model("qwen3_moe", dtype=dtype), AdaKConfig.paper(k_max=8))
    assert {k: tuple(v.shape) for k, v in adak_layers(paper)[0].routing_state().items()} == {
        "allocator.weight": (8, 64)
    }
    with pytest.raises(ValueError, match="k_max"):
        Allocator(64, 0)


def test_allocator_state_of_another_model_gives_clear_error():
    model = patch_model(tiny_model("mixtral"), AdaKConfig(k_max=4))
    layer = adak_layers(model)[0]
    good = {k: v.clone() for k, v in layer.routing_state().items()}
    with pytest.raises(ValueError, match="another model"):  # hidden size 32, not 64
        layer.load_routing_state({**good, "allocator.weight": torch.zeros(4, 32)})
    with pytest.raises(ValueError, match="another model"):  # k_max 3, not 4
        layer.load_routing_state({**good, "allocator.weight": torch.zeros(3, 64)})
    with pytest.raises(ValueError, match="not an Ada-K checkpoint"):
        layer.load_routing_state({"duals": torch.zeros(8)})
    with pytest.raises(ValueError, match="allocator_input"):  # a paper allocator into a router-aware one
        layer.load_routing_state({"allocator.weight": torch.zeros(4, 64)})
    with pytest.raises(ValueError, match="NaN"):
        layer.load_routing_state({**good, "allocator.bias": torch.full((4,), float("nan"))})


def test_adapters_saved_before_allocator_inputs_load_as_the_paper_allocator(tmp_path, ids):
    """An adapter of the previous format (paper allocator, one row per expert, no allocator_input key)."""
    from hf_moe_routing.hub import load_routing_adapter, save_routing_adapter

    model = patch_model(tiny_model("mixtral"), AdaKConfig.paper(k_max=8))
    torch.nn.init.normal_(adak_layers(model)[0].allocator.weight, std=0.5)
    save_routing_adapter(model, tmp_path / "old")
    config = json.loads((tmp_path / "old" / "routing_config.json").read_text())
    config["routing"] = {
        "routing_type": "adak",
        "k_max": None,
        "decision": "greedy",
        "layers": None,
        "renormalize": True,
    }
    (tmp_path / "old" / "routing_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="keeping k <= 2"):
        fresh = load_routing_adapter(tiny_model("mixtral"), tmp_path / "old")
    state = get_patch_state(fresh).config
    assert (state.allocator_input, state.allocator_bias, state.renormalize) == ("hidden", False, True)
    layer = adak_layers(fresh)[0]
    assert torch.equal(layer.allocator.weight, adak_layers(model)[0].allocator.weight[:2])


def test_only_chosen_layers_get_allocators():
    model = patch_model(tiny_model("qwen2_moe"), AdaKConfig(layers=[1]))
    layers = routing_layers(model)
    assert isinstance(layers[0], TopKLayer) and isinstance(layers[1], AdaKLayer)
    assert list(adak_layers(model)) == [1]


# ---- routing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_routing_takes_top_k_in_router_order_with_sentinels(family):
    """A token given k experts keeps its k best by the family's choice scores; the first top_k slots are
    the family's own top-k (same experts, same slot order), so at k = top_k nothing changes."""
    model = patch_model(tiny_model(family), AdaKConfig(k_max=4, renormalize=True))
    block_gate = get_patch_state(model).blocks[0].router
    layer = block_gate.routing
    torch.manual_seed(0)
    hidden = torch.randn(20, 64)
    with recording(model):
        logits, weights, index = block_gate(hidden)
        k = layer.last.actions
    spec, m = layer.spec, layer.num_experts
    scores = spec.scores(logits)
    choice = spec.choice(logits, scores)
    family_topk = spec.topk(choice, spec.top_k)
    ranked = torch.topk(choice, layer.k_max, dim=-1).indices
    assert index.shape == weights.shape == (20, layer.k_max)
    assert k.min() >= 1 and k.max() <= layer.k_max
    scale = spec.scaling or 1.0
    for i in range(20):
        n = int(k[i])
        kept = index[i][index[i] < m]
        assert sorted(kept.tolist()) == sorted(ranked[i, :n].tolist())
        head = index[i, : spec.top_k]
        assert torch.equal(head[head < m], family_topk[i][head < m])  # family slot order
        assert (weights[i][index[i] == m] == 0).all()
        chosen = scores[i, index[i][index[i] < m]]
        torch.testing.assert_close(
            weights[i][index[i] < m].float(), chosen / chosen.sum() * scale, atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_sentinel_experts_match_eager_experts(family, ids):
    model = patch_model(tiny_model(family), AdaKConfig(k_max=4))
    for layer in adak_layers(model).values():
        torch.nn.init.normal_(layer.allocator.weight, std=0.5)  # a spread of k values, up to k_max = 4
    with recording(model) as layers:
        fast = _logits(model, ids)
        counts = torch.cat([layer.last.activated for layer in layers.values()])
    assert counts.unique().numel() > 1  # tokens really use different numbers of experts
    model.set_experts_implementation("eager")
    assert torch.allclose(_logits(model, ids), fast, atol=1e-5)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_forcing_default_k_reproduces_the_model(family, ids):
    model = tiny_model(family)
    ref = _logits(model, ids)
    shape_top_k = model.config.num_experts_per_tok
    patch_model(model, AdaKConfig(renormalize=None))  # the family's own weighting rule
    _force_k(model, shape_top_k)
    assert torch.allclose(_logits(model, ids), ref, atol=1e-5)
    with default_routing(model):  # the PPO baseline: the model's own Top-K without re-patching
        assert torch.allclose(_logits(model, ids), ref, atol=1e-5)


def test_fewer_experts_change_the_output_and_shared_experts_always_run(ids):
    model = tiny_model("qwen2_moe")
    calls = []
    shared = model.model.layers[0].mlp.shared_expert
    shared.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    ref = _logits(model, ids)
    patch_model(model, AdaKConfig())
    _force_k(model, 1)
    with recording(model) as layers:
        out = _logits(model, ids)
        assert all((layer.last.activated == 1).all() for layer in layers.values())
    assert not torch.allclose(out, ref, atol=1e-4)
    assert calls == [ids.numel(), ids.numel()]  # every token, with and without allocators


def test_training_mode_samples_and_eval_mode_is_greedy(ids):
    model = patch_model(tiny_model("mixtral"), AdaKConfig())
    layer = adak_layers(model)[0]
    torch.nn.init.normal_(layer.allocator.weight, std=0.05)  # a flat distribution over k
    with recording(model):
        _logits(model, ids)
        greedy = layer.last.actions.clone()
        _logits(model, ids)
        assert torch.equal(layer.last.actions, greedy)
        layer.train()
        _logits(model, ids)
        sampled = layer.last.actions.clone()
        assert not torch.equal(sampled, greedy)
        logits = layer.allocator(layer.last.states)
        assert torch.allclose(layer.last.log_probs, action_log_probs(logits, sampled))
    assert layer.last is None  # records are dropped when recording ends (no leak)
    layer.eval()
    layer.decision = "sample"
    with recording(model):
        _logits(model, ids)
        assert not torch.equal(layer.last.actions, greedy)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_generate_with_kv_cache(family, ids):
    model = patch_model(tiny_model(family), AdaKConfig())
    for layer in adak_layers(model).values():
        torch.nn.init.normal_(layer.allocator.weight, std=0.5)
    cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (2, ids.shape[1] + 6)
    assert torch.equal(cached, uncached)  # the decode path routes one token at a time, identically


def test_padding_mask_reaches_the_layers_during_generation():
    model = patch_model(tiny_model("qwen3_moe"), AdaKConfig())
    ids = torch.tensor([[0, 0, 5, 6, 7], [4, 5, 6, 7, 8]])
    mask = (ids != 0).long()
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0
    )
    assert out.shape == (2, 8)


def test_adapter_round_trip_through_hub_files(tmp_path, ids):
    from hf_moe_routing.hub import load_routing_adapter, save_routing_adapter

    model = patch_model(tiny_model("deepseek_v2"), AdaKConfig(k_max=6))
    for layer in adak_layers(model).values():
        torch.nn.init.normal_(layer.allocator.weight, std=0.5)
    expected = _logits(model, ids)
    save_routing_adapter(model, tmp_path / "adapter")
    fresh = load_routing_adapter(tiny_model("deepseek_v2"), tmp_path / "adapter")
    assert torch.equal(_logits(fresh, ids), expected)
    with pytest.raises(ValueError):  # a different model (hidden size) is refused with a clear error
        load_routing_adapter(tiny_model("deepseek_v2", hidden_size=32), tmp_path / "adapter")


# ---- warm-up labels --------------------------------------------------------------------------------
def test_threshold_labels_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.9, 0.05, 0.03, 0.02], [0.25, 0.25, 0.25, 0.25]])
    assert threshold_labels(probs, 0.5).tolist() == [1, 1, 2]
    assert threshold_labels(probs, 0.8).tolist() == [2, 1, 4]
    assert threshold_labels(probs, 0.96).tolist() == [4, 3, 4]
    assert threshold_labels(probs[:, :2], 0.95).tolist() == [2, 2, 2]  # capped at k_max


def test_choose_threshold_matches_default_k():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.9, 0.05, 0.03, 0.02], [0.25, 0.25, 0.25, 0.25]])
    p, mean = choose_threshold(probs, 2.0)
    assert mean == pytest.approx(2.0)
    assert threshold_labels(probs, p).float().mean() == pytest.approx(2.0)
    p1, mean1 = choose_threshold(probs, 1.0)
    assert mean1 == pytest.approx(1.0) and p1 <= 0.25 + 1e-6
    with pytest.raises(ValueError, match="calibration"):
        choose_threshold(torch.zeros(0, 4), 2.0)


def test_ordered_probabilities_normalise_sigmoid_scores():
    scores = torch.tensor([[0.9, 0.6, 0.3, 0.2]])  # sigmoid scores do not sum to 1
    order = torch.tensor([[1, 0]])
    out = ordered_probabilities(scores, order)
    assert torch.allclose(out, torch.tensor([[0.3, 0.45]]))


def test_warmup_loss_is_cross_entropy_on_k_minus_one():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([1, 5])  # 5 > k_max clamps to 3
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2]))
    assert torch.allclose(warmup_loss(logits, labels), expected)
    masked = warmup_loss(logits, labels, torch.tensor([True, False]))
    assert torch.allclose(masked, torch.nn.functional.cross_entropy(logits[:1], torch.tensor([0])))


# ---- PPO math ------------------------------------------------------------------------------------
def test_layer_advantages_by_hand():
    rewards = torch.tensor([-1.0, -2.0])
    baseline = torch.tensor([-1.5, -1.0])
    adv = layer_advantages(rewards, baseline, num_layers=3, gamma=0.5)
    assert torch.allclose(adv, torch.tensor([[0.125, -0.25], [0.25, -0.5], [0.5, -1.0]]))
    with pytest.raises(ValueError, match="gamma"):
        layer_advantages(rewards, baseline, 3, 0.0)


def test_ppo_clipped_objective_by_hand():
    old = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    new = torch.log(torch.tensor([0.75, 0.25, 0.55, 0.5]))  # ratios 1.5, 0.5, 1.1, 1.0
    adv = torch.tensor([1.0, 1.0, -2.0, 3.0])
    mask = torch.tensor([True, True, True, False])
    loss, clip_fraction = ppo_clipped_objective(new, old, adv, mask, clip_epsilon=0.2)
    # min(r A, clip(r) A): 1.2 (clipped), 0.5 (unclipped is smaller), -2.2; the masked entry is ignored
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 2.2) / 3, abs=1e-6)
    assert clip_fraction.item() == pytest.approx(2 / 3)
    new.requires_grad_(True)
    loss, _ = ppo_clipped_objective(new, old, adv, mask, 0.2)
    loss.backward()
    # gradient flows only where the unclipped term is active: entries 2 and 3 (r = 0.5 and 1.1)
    assert new.grad[0] == 0 and new.grad[3] == 0 and new.grad[1] != 0 and new.grad[2] != 0


def test_ppo_clips_both_sides():
    """Negative advantage with r < 1 - eps is clipped (no gradient), as is positive advantage with r > 1 + eps;
    the same ratios with the other sign of advantage are not clipped."""
    old = torch.log(torch.full((4,), 0.5))
    new = torch.log(torch.tensor([0.25, 0.25, 0.75, 0.75])).requires_grad_(True)  # r = 0.5, 0.5, 1.5, 1.5
    adv = torch.tensor([-1.0, 1.0, 1.0, -1.0])
    objective = clipped_surrogate(new, old, adv, 0.2)
    # A < 0, r = 0.5: min(-0.5, -0.8) = -0.8 (clipped at 1 - eps); A > 0, r = 0.5: 0.5 (unclipped)
    # A > 0, r = 1.5: min(1.5, 1.2) = 1.2 (clipped at 1 + eps); A < 0, r = 1.5: -1.5 (unclipped)
    assert objective.tolist() == pytest.approx([-0.8, 0.5, 1.2, -1.5])
    objective.sum().backward()
    assert new.grad[0] == 0 and new.grad[2] == 0
    assert new.grad[1] == pytest.approx(0.5) and new.grad[3] == pytest.approx(-1.5)  # d(r A)/d log pi = r A


def test_leave_one_out_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 3.0]])
    assert leave_one_out_advantages(rewards).tolist() == [[-3.0, -1.5], [0.0, -1.5], [3.0, 3.0]]
    with pytest.raises(ValueError, match=">= 2"):
        leave_one_out_advantages(rewards[:1])


def test_policy_gradient_snr_matches_per_token_autograd():
    torch.manual_seed(0)
    n, f, k = 50, 6, 3
    features, weight = torch.randn(n, f), torch.randn(k, f, requires_grad=True)
    actions, adv = torch.randint(1, k + 1, (n,)), torch.randn(n)
    mask = torch.rand(n) > 0.2
    grads = []
    for i in range(n):
        if mask[i]:
            (g,) = torch.autograd.grad(
                action_log_probs(features[i : i + 1] @ weight.T, actions[i : i + 1])[0], weight
            )
            grads.append((adv[i] * g).reshape(-1))
    grads = torch.stack(grads).double()
    mean = grads.mean(0)
    noise = (grads - mean).pow(2).sum(1).sum() / (len(grads) - 1) / len(grads)  # tr Cov / n, unbiased
    expected = ((mean.pow(2).sum() - noise).clamp(min=0) / noise).sqrt()
    got = policy_gradient_snr(features, features @ weight.detach().T, actions, adv, mask)
    assert got == pytest.approx(float(expected), rel=1e-6)
    # pure noise (advantages independent of everything) is estimated near 0; a consistent signal far above 1
    noise_only = [
        policy_gradient_snr(features, features @ weight.detach().T, actions, torch.randn(n), mask)
        for _ in range(20)
    ]
    assert sum(noise_only) / 20 < 0.7
    signal = torch.where(actions == 1, 1.0, -1.0)
    constant = torch.ones(n, f)  # a feature every token shares (like a bias)
    assert policy_gradient_snr(constant, torch.zeros(n, k), actions, signal, mask) > 2


def test_choose_k_by_inverse_cdf_is_per_token():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]] * 4))
    u = torch.tensor([0.1, 0.3, 0.69, 0.75])
    assert choose_k(logits, "sample", uniforms=u).tolist() == [1, 2, 2, 3]
    # each token's draw depends only on its own uniform: any subset of rows gives the same k
    assert choose_k(logits[1:3], "sample", uniforms=u[1:3]).tolist() == [2, 2]
    torch.manual_seed(0)
    draws = choose_k(logits[:1].expand(20000, 3), "sample", uniforms=torch.rand(20000))
    assert torch.bincount(draws, minlength=4)[1:].float().div(20000).tolist() == pytest.approx(
        [0.2, 0.5, 0.3], abs=0.015
    )


# ---- exact warm starts -----------------------------------------------------------------------------
def test_skip_labels_and_their_calibration_by_hand():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.45, 0.05], [0.9, 0.05, 0.05]])
    # gaps log(P_j / P_1): row 0: log .5, log(1/6); row 1: log .9, log .1; row 2: log(1/18) twice
    assert skip_labels(probs, math.log(0.4)).tolist() == [2, 2, 1]
    assert skip_labels(probs, math.log(0.05)).tolist() == [3, 3, 3]
    assert skip_labels(probs, math.log(0.99)).tolist() == [1, 1, 1]
    for target in (1.0, 4 / 3, 5 / 3, 2.0, 7 / 3, 3.0):
        log_beta = calibrate_skip_threshold(probs, target)
        assert skip_labels(probs, log_beta).float().mean().item() == pytest.approx(target)
    with pytest.raises(ValueError, match="calibration"):
        calibrate_skip_threshold(torch.zeros(0, 3), 2.0)


def test_exact_starts_choose_top_k_and_the_dynamic_skipping_count():
    torch.manual_seed(0)
    allocator = Allocator(16, 4, router_features=4, bias=True)
    hidden = torch.randn(500, 16)
    probs = (torch.randn(500, 8) * 2).softmax(-1).sort(descending=True).values
    features = allocator.features(hidden, probs)
    k_warm_init(allocator, 3, scale=4.0)
    assert (allocator(features).argmax(-1) + 1 == 3).all()
    skip_warm_init(allocator, math.log(0.3), scale=4.0)
    greedy = allocator(features).argmax(-1) + 1
    assert torch.equal(greedy, skip_labels(probs[:, :4], math.log(0.3)))
    assert greedy.unique().numel() == 4  # a real spread of counts
    with pytest.raises(ValueError, match="bias"):
        k_warm_init(Allocator(16, 4), 2, 4.0)
    with pytest.raises(ValueError, match="sees the router"):
        skip_warm_init(Allocator(16, 4, bias=True), 0.0, 4.0)


def test_non_finite_hidden_states_give_a_clear_error_where_k_is_drawn(ids):
    model = patch_model(tiny_model("mixtral"), AdaKConfig(decision="sample"))
    model.model.embed_tokens.weight.data[ids[0, 0]] = float("nan")
    with pytest.raises(ValueError, match=r"layer 0 \(model.layers.0.mlp\).*allocator logits.*NaN"):
        _logits(model, ids)


def test_paper_settings_and_legacy_configs():
    paper = AdaKConfig.paper()
    assert (paper.allocator_input, paper.allocator_bias, paper.renormalize) == ("hidden", False, True)
    assert AdaKConfig().renormalize is None and AdaKConfig().allocator_input == "hidden+router"
    legacy = RoutingConfig.from_dict({"routing_type": "adak", "k_max": 4})
    assert (legacy.allocator_input, legacy.allocator_bias) == ("hidden", False)
    assert RoutingConfig.from_dict(AdaKConfig().to_dict()) == AdaKConfig()
    with pytest.raises(ValueError, match="allocator_input"):
        AdaKConfig(allocator_input="router")


def test_expected_k_entropy_and_penalty_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1.0, 1e-12, 1e-12]]))
    assert torch.allclose(expected_k(logits), torch.tensor([1.75, 1.0]), atol=1e-6)
    assert torch.allclose(entropy(logits)[0], torch.tensor(1.5 * math.log(2)), atol=1e-6)
    layers = [logits, logits + 0.0]
    masks = [torch.tensor([True, False]), torch.tensor([True, True])]
    # lambda * (1/L) * sum_l mean_i E[k]: (1.75 + 1.375) / 2 * 0.1
    assert expected_k_penalty(layers, masks, 0.1).item() == pytest.approx(0.15625, abs=1e-6)


def test_choose_k_and_log_probs():
    logits = torch.tensor([[0.0, 5.0, 0.0], [9.0, 0.0, 0.0]])
    assert choose_k(logits, "greedy").tolist() == [2, 1]
    torch.manual_seed(0)
    samples = torch.stack([choose_k(logits, "sample") for _ in range(200)])
    assert set(samples.unique().tolist()) <= {1, 2, 3} and (samples[:, 0] == 2).float().mean() > 0.9
    assert torch.allclose(
        action_log_probs(logits, torch.tensor([2, 1])), torch.log_softmax(logits, -1)[[0, 1], [1, 0]]
    )
    with pytest.raises(ValueError, match="greedy"):
        choose_k(logits, "max")


def test_token_rewards_skip_masked_labels_and_padding():
    logits = torch.log_softmax(torch.randn(1, 4, 5), dim=-1)
    labels = torch.tensor([[1, 2, -100, 4]])
    mask = torch.tensor([[1, 1, 1, 0]])
    rewards, valid = token_log_likelihood(logits, labels, mask)
    # position 0 predicts label[1]=2; position 1 predicts -100 (no reward); position 2 predicts a token
    # after which is padding -> still rewarded (its own token is real); position 3 is the last
    assert valid.tolist() == [[True, False, True, False]]
    assert rewards[0, 0] == pytest.approx(logits[0, 0, 2].item(), abs=1e-6)
    assert rewards[0, 2] == pytest.approx(logits[0, 2, 4].item(), abs=1e-6)
    assert rewards[0, 1] == 0 and rewards[0, 3] == 0
    _, valid = token_log_likelihood(logits, torch.tensor([[1, 2, 3, 4]]), torch.tensor([[0, 1, 1, 1]]))
    assert valid.tolist() == [[False, True, True, False]]  # a padding position gives no reward


def test_normalize_advantages():
    adv = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(normalize_advantages(adv, mask, "none"), adv)
    scaled = normalize_advantages(adv, mask, "scale")
    assert scaled[0, :2].tolist() == pytest.approx([1 / math.sqrt(2), 3 / math.sqrt(2)])
    standard = normalize_advantages(adv, mask, "standardize")
    assert standard[0, :2].tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])
    with pytest.raises(ValueError, match="advantage normalization"):
        normalize_advantages(adv, mask, "whiten")
