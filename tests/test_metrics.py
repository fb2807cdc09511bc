"""Routing metrics as offline ``evaluate`` modules, checked against RoutingStats and the FLOPs model."""

import json

import evaluate
import pytest
import torch

from hf_moe_routing import TopKConfig, patch_model
from hf_moe_routing.evaluation.flops import flops_per_token
from hf_moe_routing.evaluation.stats import RoutingStats
from hf_moe_routing.metrics import METRICS, load, metric_path, save_results
from hf_moe_routing.testing import tiny_model


def test_every_metric_loads_offline_by_path_and_by_folder():
    for name in METRICS:
        by_file = evaluate.load(metric_path(name))
        by_folder = evaluate.load(str(metric_path(name)).rsplit("/", 1)[0])
        assert by_file.name == by_folder.name == name
        assert by_file.description.strip() and by_file.inputs_description.strip()
    with pytest.raises(ValueError, match="Unknown routing metric 'nope'"):
        metric_path("nope")


def test_max_vio_values():
    metric = load("max_vio")
    # batch 1: layer loads [3, 1] -> (3 - 2) / 2 = 0.5 and [2, 2] -> 0; batch 2: [1, 3] -> 0.5, [4, 0] -> 1
    metric.add(loads=[[3, 1], [2, 2]])
    metric.add(loads=[[1, 3], [4, 0]])
    out = metric.compute()
    assert out["avg_max_vio"] == pytest.approx((0.25 + 0.75) / 2)
    assert out["sup_max_vio"] == pytest.approx(0.75)
    assert out["max_vio_global_per_layer"] == pytest.approx([0.0, (6 - 4) / 4])
    assert out["max_vio_global"] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        load("max_vio").compute(loads=[[[1, 2]], [[1, 2, 3]]])  # expert counts differ between batches


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_metrics_agree_with_routing_stats(family):
    model = patch_model(tiny_model(family), TopKConfig(top_k=1))
    max_vio, activated, flops = load("max_vio"), load("activated_experts"), load("flops_per_token")
    gen = torch.Generator().manual_seed(0)
    with RoutingStats(model) as stats, torch.no_grad():
        for length in (7, 11):
            ids = torch.randint(3, 128, (2, length), generator=gen)
            mask = torch.ones_like(ids)
            mask[1, :3] = 0  # padding is excluded by RoutingStats
            model(input_ids=ids, attention_mask=mask)
            last = stats.last
            max_vio.add(loads=last.loads.tolist())
            for metric in (activated, flops):
                metric.add(activated=last.activated.tolist(), num_tokens=last.num_tokens)
        summary = stats.summary()
    out = max_vio.compute()
    assert out["avg_max_vio"] == pytest.approx(summary["avg_max_vio"])
    assert out["sup_max_vio"] == pytest.approx(summary["sup_max_vio"])
    assert out["max_vio_global_per_layer"] == pytest.approx(summary["max_vio_global"])
    act = activated.compute()
    assert act["activated_per_layer"] == pytest.approx(summary["activated_per_layer"])
    assert act["mean_activated_experts"] == pytest.approx(1.0)
    fl = flops.compute(model_config=model.config, seq_len=11)
    assert fl["flops_per_token"] == pytest.approx(flops_per_token(model, 11, activated=1.0).total)
    assert fl["topk_flops_per_token"] == pytest.approx(flops_per_token(model, 11).total)
    assert 0 < fl["flops_reduction"] < 1
    assert fl["flops_reduction"] == pytest.approx(1 - fl["flops_per_token"] / fl["topk_flops_per_token"])


def test_flops_metric_accepts_config_dicts_and_explains_missing_arguments():
    config = tiny_model("mixtral").config
    metric = load("flops_per_token")
    top2 = metric.compute(activated=[[2.0, 2.0]], num_tokens=[5], model_config=config.to_dict(), seq_len=16)
    assert top2["flops_reduction"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="model_config=model.config, seq_len"):
        load("flops_per_token").compute(activated=[[1.0, 1.0]], num_tokens=[5])
    with pytest.raises(ValueError, match="one per MoE layer"):
        load("flops_per_token").compute(activated=[[1.0]], num_tokens=[5], model_config=config, seq_len=16)


def test_activated_metric_combines_with_other_evaluate_metrics():
    combined = evaluate.combine([metric_path("activated_experts"), metric_path("max_vio")])
    assert [m.name for m in combined.evaluation_modules] == ["activated_experts", "max_vio"]
    out = load("activated_experts").compute(activated=[[2.0, 1.0], [1.0, 1.0]], num_tokens=[1, 3])
    assert out == {
        "mean_activated_experts": pytest.approx(1.125),
        "activated_per_layer": pytest.approx([1.25, 1.0]),
    }
    with pytest.raises(ValueError, match="num_tokens"):
        load("activated_experts").compute(activated=[[1.0]], num_tokens=[0])


def test_results_are_saved_with_evaluate_conventions(tmp_path):
    results = {"perplexity": torch.tensor(12.5), "activated_per_layer": torch.tensor([1.5, 1.25])}
    path = save_results(tmp_path / "runs", results, model="tiny-mixtral", routing="topk")
    assert path.parent == tmp_path / "runs" and path.name.startswith("result-") and path.suffix == ".json"
    data = json.loads(path.read_text())
    assert data["perplexity"] == 12.5 and data["activated_per_layer"] == [1.5, 1.25]
    assert data["model"] == "tiny-mixtral" and data["routing"] == "topk"
    assert {"_timestamp", "_evaluate_version", "_python_version"} <= set(data)
    named = save_results(tmp_path / "eval.json", {"acc": 0.5})
    assert named == tmp_path / "eval.json" and json.loads(named.read_text())["acc"] == 0.5
