"""evaluate_routing / measure_speed / compare_speed and the evaluate and bench commands, on tiny models."""

import json
import math

import pytest
import torch

from hf_moe_routing import DynamicSkipConfig, TopKConfig, TopPConfig, get_patch_state, patch_model
from hf_moe_routing.cli.common import parse_routing
from hf_moe_routing.core.batching import iter_batches
from hf_moe_routing.evaluation.evaluate import evaluate_routing, topk_routing
from hf_moe_routing.evaluation.speed import compare_speed, measure_speed
from hf_moe_routing.patching import routing_layers
from hf_moe_routing.testing import REQUIRED_FAMILIES, tiny_model


@pytest.fixture
def data() -> torch.Tensor:
    return torch.randint(3, 128, (6, 12), generator=torch.Generator().manual_seed(0))


def _manual_perplexity(model, rows):
    """exp(mean NLL) over every predicted token of every row, one row at a time."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = model(row[None]).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
            count += row.numel() - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_topk_perplexity_is_the_manual_one_and_reductions_are_zero(family, data):
    model = tiny_model(family)
    expected = _manual_perplexity(model, data)
    plain = evaluate_routing(model, data, batch_size=4, progress=False)
    assert plain["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert plain["num_tokens"] == data.numel() - data.shape[0]
    patch_model(model, TopKConfig())
    patched = evaluate_routing(model, data, batch_size=4, progress=False)
    for result in (plain, patched):
        assert result["mean_activated"] == pytest.approx(result["top_k"])
        assert all(v == pytest.approx(result["top_k"]) for v in result["activated_per_layer"].values())
        assert result["flops_reduction"] == 0.0 and result["routed_flops_reduction"] == 0.0
        assert result["activation_reduction"] == pytest.approx(0.0)
        assert result["perplexity_change"] == pytest.approx(0.0, abs=1e-6)
    json.dumps(patched)  # JSON-ready


def test_padding_is_excluded_from_perplexity_and_statistics(data):
    model = tiny_model("qwen2_moe")
    expected = _manual_perplexity(model, [data[0], data[1, :7], data[2, :4]])
    ragged = [data[0].tolist(), data[1, :7].tolist(), data[2, :4].tolist()]
    result = evaluate_routing(model, ragged, batch_size=3, progress=False, topk_reference=False)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert result["num_tokens"] == 11 + 6 + 3
    assert result["mean_activated"] == pytest.approx(2.0)
    # the same through a packed-style dict with attention_mask and labels
    ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for i, row in enumerate(ragged):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    packed = evaluate_routing(
        model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, batch_size=2, progress=False
    )
    assert packed["perplexity"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_static_top1_halves_routed_flops(family, data):
    model = tiny_model(family)
    k = get_patch_state(patch_model(model, TopKConfig())).shape.top_k
    patch_model(model, TopKConfig(top_k=1), replace=True)
    result = evaluate_routing(model, data, batch_size=6, progress=False)
    assert result["mean_activated"] == pytest.approx(1.0)
    assert list(result["activated_per_layer"].values()) == pytest.approx(
        [1.0] * len(result["activated_per_layer"])
    )
    assert result["routed_flops_reduction"] == pytest.approx(1 - 1 / k)
    assert 0 < result["flops_reduction"] < result["routed_flops_reduction"]
    assert result["activation_reduction"] == pytest.approx(1 - 1 / k)
    assert result["topk"]["mean_activated"] == pytest.approx(k)
    assert result["perplexity"] != result["topk"]["perplexity"]
    assert get_patch_state(model).config == TopKConfig(top_k=1)  # the routing is back after the reference


def test_variable_k_activated_count_matches_the_routers(data):
    model = tiny_model("qwen3_moe")
    patch_model(model, TopPConfig(p=0.5))
    counts = {}
    hooks = [
        layer_gate.register_forward_hook(
            lambda m, a, out, i=i: counts.setdefault(i, []).append((out[2] < 8).sum(-1).float())
        )
        for i, layer_gate in ((i, r) for i, r in enumerate(m.mlp.gate for m in model.model.layers))
    ]
    result = evaluate_routing(model, data, batch_size=4, progress=False, topk_reference=False)
    for h in hooks:
        h.remove()
    per_layer = {str(i): float(torch.cat(v).mean()) for i, v in counts.items()}
    assert result["activated_per_layer"] == pytest.approx(per_layer)
    assert result["mean_activated"] == pytest.approx(sum(per_layer.values()) / len(per_layer))
    assert result["routed_flops_reduction"] == pytest.approx(1 - result["mean_activated"] / 2, rel=1e-6)


def test_topk_reference_keeps_the_callers_routing_layers(data):
    """The Top-K reference runs the original routers without unpatching: the layers the caller holds
    stay the model's layers, with their state, and the reference equals the unpatched model."""
    model = tiny_model("mixtral")
    with torch.no_grad():
        unpatched = model(data).logits
    patch_model(model, DynamicSkipConfig(beta=0.37))
    held = routing_layers(model)
    with torch.no_grad():
        before = model(data).logits
        with topk_routing(model):
            assert get_patch_state(model) is not None
            assert torch.equal(model(data).logits, unpatched)
    assert not torch.equal(before, unpatched)
    held[1].set_beta(0.81)
    evaluate_routing(model, data, batch_size=3, progress=False)
    assert routing_layers(model)[1] is held[1] and float(held[1].beta) == pytest.approx(0.81)
    held[1].set_beta(0.37)
    with torch.no_grad():
        assert torch.equal(model(data).logits, before)


def test_speed_helpers(data):
    model = tiny_model("mixtral")
    speed = measure_speed(model, data, repeats=3, warmup=1)
    assert speed["median_s"] > 0 and len(speed["times_s"]) == 3 and speed["tokens"] == data.numel()
    patch_model(model, TopPConfig(p=0.4))
    both = compare_speed(model, {"input_ids": data}, repeats=2, warmup=0)
    assert both["speedup"] == pytest.approx(both["topk"]["median_s"] / both["routing"]["median_s"])
    assert both["routing_name"].startswith("top_p")
    assert get_patch_state(model).config == TopPConfig(p=0.4)


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        ([], ValueError, "empty"),
        (torch.ones(5, dtype=torch.long), ValueError, "2-D"),
        ({"text": ["a"]}, ValueError, "input_ids"),
        ("some text", TypeError, "Unsupported"),
        (torch.ones(2, 1, dtype=torch.long), ValueError, "at least 2 tokens"),
    ],
)
def test_bad_data_raises_clear_errors(bad, error, message):
    with pytest.raises(error, match=message):
        list(iter_batches(bad, 2))


def test_parse_routing_specs(tmp_path):
    with pytest.raises(ValueError, match="'top_k' is given twice"):
        parse_routing("topk:top_k=1,top_k=2")
    assert parse_routing("topk") == TopKConfig()
    assert parse_routing("topk:top_k=1") == TopKConfig(top_k=1)
    assert parse_routing("top_p:p=0.6,max_k=3") == TopPConfig(p=0.6, max_k=3)
    assert parse_routing('{"routing_type": "dynamic_skip", "beta": 0.4}') == DynamicSkipConfig(beta=0.4)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(TopPConfig(p=0.3).to_dict()))
    assert parse_routing(str(path)) == TopPConfig(p=0.3)
    with pytest.raises(ValueError, match="Unknown routing"):
        parse_routing("nucleus:p=0.5")
    with pytest.raises(ValueError, match="key=value"):
        parse_routing("top_p:0.5")
    with pytest.raises(ValueError, match="Unknown TopPConfig settings"):
        parse_routing("top_p:q=0.5")


def test_token_expert_counts_follow_the_routers_and_skip_padding(data):
    from hf_moe_routing.evaluation.evaluate import token_expert_counts

    model = tiny_model("mixtral")
    patch_model(model, TopPConfig(p=0.5))
    mask = torch.ones_like(data)
    mask[0, 8:] = 0
    seen = []
    hook = model.model.layers[1].mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out[2]))
    out = token_expert_counts(model, {"input_ids": data, "attention_mask": mask}, batch_size=6)
    hook.remove()
    real = mask.reshape(-1).bool()
    assert torch.equal(out["input_ids"], data.reshape(-1)[real])
    assert torch.equal(out["counts"][1], (seen[0] < 8).sum(-1)[real])
    assert set(out["counts"]) == {0, 1}
    assert out["next_ids"][7] == -100 and out["next_ids"][0] == data[0, 1]
