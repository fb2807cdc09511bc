"""BIP through patch_model on every family: balance, family weights, causality, state, bad input."""

import pytest
import torch

from hf_moe_routing import BIPConfig, TopKConfig, get_patch_state, patch_model, routing_layers, unpatch_model
from hf_moe_routing.core.ops import max_vio, tokens_per_expert
from hf_moe_routing.hub import load_routing_adapter, save_routing_adapter
from hf_moe_routing.methods.base import RoutingConfig
from hf_moe_routing.testing import REQUIRED_FAMILIES, tiny_model

VARIANTS = [(f, {}) for f in REQUIRED_FAMILIES] + [
    ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2)),
]


def _ids(batch=4, length=48, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _capture(model):
    """layer index -> (hidden, (logits, weights, index)) of the last forward, via hooks on the routing layers."""
    seen = {}
    for index, layer in routing_layers(model).items():
        layer.register_forward_hook(lambda mod, args, out, i=index: seen.__setitem__(i, (args[1], out)))
    return seen


def _mean_vio(seen, m):
    return sum(max_vio(tokens_per_expert(out[2], m)) for _, out in seen.values()) / len(seen)


@pytest.mark.parametrize(("family", "overrides"), VARIANTS, ids=lambda v: v if isinstance(v, str) else "")
def test_before_mode_balances_the_batch_and_keeps_family_weights(family, overrides):
    model = tiny_model(family, **overrides)
    ids = _ids()
    patch_model(model, TopKConfig())
    seen = _capture(model)
    with torch.no_grad():
        model(ids)
    m = next(iter(routing_layers(model).values())).spec.num_experts
    topk_vio = _mean_vio(seen, m)

    patch_model(model, BIPConfig(update="before", num_iters=4), replace=True)
    model.train()
    seen = _capture(model)
    with torch.no_grad():
        model(ids)
    assert _mean_vio(seen, m) < 0.5 * topk_vio
    for index, layer in routing_layers(model).items():
        hidden, (logits, weights, chosen) = seen[index]
        spec = layer.spec
        scores = spec.scores(logits)
        # selection by s - q through the family's rules; weights from the original scores
        expected = spec.topk(spec.choice(logits, scores, -layer.q), layer.top_k)
        assert torch.equal(chosen, expected)
        torch.testing.assert_close(weights, spec.weights(logits, scores, chosen))
        assert layer.q.dtype == torch.float32 and not layer.q.requires_grad and layer.q.max() > 0


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_after_mode_is_causal_and_balances_the_next_batches(family):
    model = tiny_model(family)
    ids = _ids()
    with torch.no_grad():
        reference = model(ids).logits
    patch_model(model, BIPConfig())  # update="after" is the default
    model.train()
    with torch.no_grad():
        first = model(ids).logits  # routed with q = 0: exactly the model's own routing
    torch.testing.assert_close(first, reference)
    assert all(layer.q.max() > 0 for layer in routing_layers(model).values())  # then q was updated
    seen = _capture(model)
    with torch.no_grad():
        for _ in range(3):
            model(ids)
    m = next(iter(routing_layers(model).values())).num_experts
    patch_model(model, TopKConfig(), replace=True)
    topk_seen = _capture(model)
    with torch.no_grad():
        model(ids)
    assert _mean_vio(seen, m) < _mean_vio(topk_seen, m)


def test_eval_mode_freezes_q_and_generation_with_cache_matches_full_forward():
    model = tiny_model("qwen2_moe")
    patch_model(model, BIPConfig())
    model.train()
    with torch.no_grad():
        model(_ids())
    model.eval()
    q = {i: layer.q.clone() for i, layer in routing_layers(model).items()}
    prompt = _ids(batch=1, length=6, seed=3)
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        full = model(generated).logits
        cached_tail = model.generate(
            prompt,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        ).logits
    for step, logits in enumerate(cached_tail):
        torch.testing.assert_close(logits[0], full[0, prompt.shape[1] - 1 + step], atol=1e-4, rtol=1e-4)
    assert all(torch.equal(layer.q, q[i]) for i, layer in routing_layers(model).items())


def test_update_in_eval_updates_q():
    model = tiny_model("mixtral")
    patch_model(model, BIPConfig(update_in_eval=True))
    with torch.no_grad():
        model(_ids())
    assert all(layer.q.max() > 0 for layer in routing_layers(model).values())


def test_padding_is_excluded_from_the_solve():
    model = tiny_model("mixtral")
    patch_model(model, BIPConfig(update="before"))
    layer = routing_layers(model)[0]
    layer.train()
    scores = torch.rand(40, 8).softmax(-1)
    mask = torch.rand(40, generator=torch.Generator().manual_seed(1)) > 0.3
    layer.update_duals(scores, mask)
    with_mask = layer.q.clone()
    layer.q.zero_()
    layer.update_duals(scores[mask], None)
    assert torch.equal(with_mask, layer.q)
    # a padded batch through the model: padding positions do not count
    padded = _ids(batch=2, length=10)
    attention = torch.ones_like(padded)
    attention[1, 6:] = 0
    layer.q.zero_()
    model.train()
    with torch.no_grad():
        model(padded, attention_mask=attention)
    assert layer.q.max() > 0


def test_only_padding_or_zero_tokens_leave_q_unchanged():
    model = tiny_model("deepseek_v3")
    patch_model(model, BIPConfig(update="before"))
    model.train()
    with torch.no_grad():
        model(_ids())
    q = {i: layer.q.clone() for i, layer in routing_layers(model).items()}
    with torch.no_grad():
        out = model(_ids(batch=2, length=5), attention_mask=torch.zeros(2, 5, dtype=torch.long))
    assert torch.isfinite(out.logits).all()
    assert all(torch.equal(layer.q, q[i]) for i, layer in routing_layers(model).items())
    layer, gate = routing_layers(model)[1], model.model.layers[1].mlp.gate
    logits, weights, index = layer(gate, torch.zeros(0, 64))
    assert logits.shape == (0, 16) and weights.shape == (0, 4) and index.shape == (0, 4)


def test_nan_scores_raise_a_clear_error():
    model = tiny_model("mixtral")
    patch_model(model, BIPConfig())
    model.train()
    layer, gate = routing_layers(model)[0], model.model.layers[0].mlp.gate
    hidden = torch.randn(6, 64)
    hidden[2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        layer(gate, hidden)
    assert torch.equal(layer.q, torch.zeros(8))


@pytest.mark.parametrize(
    ("family", "overrides", "grouped"),
    [*((f, {}, f == "deepseek_v3") for f in REQUIRED_FAMILIES), (*VARIANTS[-1], True)],
)
def test_demand_rounds_only_for_group_limited_routers(family, overrides, grouped):
    """DeepSeek's group-limited routers get demand scores (no group limit, with the selection bias)."""
    model = tiny_model(family, **overrides)
    patch_model(model, BIPConfig())
    block = get_patch_state(model).blocks[0]
    gate, spec = block.router, routing_layers(model)[block.layer_index].spec
    assert spec.limits_groups == grouped
    if hasattr(gate, "e_score_correction_bias"):
        with torch.no_grad():
            gate.e_score_correction_bias.normal_()
    m = spec.num_experts
    scores, offset = torch.rand(32, m), -torch.rand(m)
    demand = spec.choice(scores, scores, offset, limit_groups=False)
    choice = spec.choice(scores, scores, offset)
    kept = torch.isfinite(choice)
    assert torch.isfinite(demand).all() and torch.allclose(demand[kept], choice[kept])
    assert kept.all() != grouped


def test_gradients_reach_the_router_but_not_q():
    model = tiny_model("qwen3_moe")
    patch_model(model, BIPConfig(update="before"))
    model.train()
    out = model(_ids(), labels=_ids())
    out.loss.backward()
    gate = model.model.layers[0].mlp.gate
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    assert gate.routing.q.grad is None


def test_bf16_model():
    model = tiny_model("deepseek_v3", dtype=torch.bfloat16)
    patch_model(model, BIPConfig(update="before"))
    model.train()
    with torch.no_grad():
        out = model(_ids())
    assert torch.isfinite(out.logits.float()).all()
    assert all(
        layer.q.dtype == torch.float32 and layer.q.max() > 0 for layer in routing_layers(model).values()
    )


def test_q_is_saved_and_loaded_with_the_routing_adapter(tmp_path):
    model = tiny_model("deepseek_v3")
    patch_model(model, BIPConfig(num_iters=3, capacity_factor=1.1))
    model.train()
    with torch.no_grad():
        model(_ids())
    model.eval()
    save_routing_adapter(model, tmp_path / "bip")
    with torch.no_grad():
        expected = model(_ids(seed=5)).logits
    fresh = tiny_model("deepseek_v3")
    load_routing_adapter(fresh, tmp_path / "bip")
    for i, layer in routing_layers(fresh).items():
        assert torch.equal(layer.q, routing_layers(model)[i].q)
    assert get_patch_state(fresh).config == BIPConfig(num_iters=3, capacity_factor=1.1)
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids(seed=5)).logits, expected)
    unpatch_model(fresh)


def test_config_round_trip_and_bad_settings():
    config = BIPConfig(num_iters=6, update="before", top_k=1)
    assert RoutingConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="infeasible"):
        BIPConfig(capacity_factor=0.5)
    with pytest.raises(ValueError, match="choose one of 'after', 'before'"):
        BIPConfig(update="during")
    with pytest.raises(ValueError, match="num_iters"):
        BIPConfig(num_iters=0)
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="outside 1..8"):
        patch_model(model, BIPConfig(top_k=9))


# The fit (formerly balance) command is tested in tests/test_cli_train.py.
