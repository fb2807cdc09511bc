"""RoutingStats: loads, MaxVio and activated experts, padding excluded, patched or not."""

import pytest
import torch

from hf_moe_routing import TopKConfig, describe_model, patch_model, unpatch_model
from hf_moe_routing.evaluation import RoutingStats, max_vio, tokens_per_expert
from hf_moe_routing.testing import GENERIC_FAMILIES, REQUIRED_FAMILIES, DropSlotsConfig, tiny_model

ALL_FAMILIES = REQUIRED_FAMILIES + GENERIC_FAMILIES


def _batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (3, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    return ids, mask


def _capture_indices(model):
    """Router indices of every MoE layer, captured independently of RoutingStats."""
    blocks = describe_model(model).blocks
    captured: dict[int, torch.Tensor] = {}
    handles = [
        b.router.register_forward_hook(lambda mod, a, out, i=i: captured.__setitem__(i, out[2]))
        for i, b in enumerate(blocks)
    ]
    return captured, handles


def _reference_loads(index: torch.Tensor, mask: torch.Tensor, m: int) -> torch.Tensor:
    real = index[mask.reshape(-1).bool()].reshape(-1)
    return torch.bincount(real[real < m], minlength=m).float()


def test_loads_and_max_violation_by_hand():
    index = torch.tensor([[0, 1], [0, 2], [3, 4]])  # 4 experts; 4 is the sentinel of an unused slot
    assert tokens_per_expert(index, 4, None).tolist() == [2.0, 1.0, 1.0, 1.0]
    assert tokens_per_expert(index, 4, torch.tensor([True, False, True])).tolist() == [1.0, 1.0, 0.0, 1.0]
    # mean 1.25, max 2 -> (2 - 1.25) / 1.25
    assert max_vio(torch.tensor([2.0, 1.0, 1.0, 1.0])).item() == pytest.approx(0.6)
    assert max_vio(torch.tensor([[3.0, 3.0], [0.0, 0.0]])).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_stats_match_router_outputs_and_exclude_padding(family):
    model = tiny_model(family)
    ids, mask = _batch()
    captured, handles = _capture_indices(model)
    with RoutingStats(model) as stats, torch.no_grad():
        model(ids, attention_mask=mask)
    for h in handles:
        h.remove()
    batch = stats.last
    m = stats.num_experts
    top_k = describe_model(model).blocks[0].spec.top_k
    assert batch.num_tokens == int(mask.sum()) == 23
    assert batch.loads.shape == (len(stats.layers), m)
    for row in range(len(stats.layers)):
        assert torch.equal(batch.loads[row], _reference_loads(captured[row], mask, m))
    assert torch.allclose(batch.activated, torch.full_like(batch.activated, float(top_k)))
    assert batch.loads.sum(dim=1).tolist() == [23.0 * top_k] * len(stats.layers)
    expected_vio = (batch.loads.max(1).values - batch.loads.mean(1)) / batch.loads.mean(1)
    assert torch.allclose(batch.max_vio.float(), expected_vio)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2", "olmoe"])
def test_padding_tokens_do_not_change_the_statistics(family):
    """The same real tokens with and without extra padding give identical loads."""
    model = tiny_model(family)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    with RoutingStats(model) as stats, torch.no_grad():
        model(ids)
        plain = stats.last.loads.clone()
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
        model(padded, attention_mask=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]]))
    assert stats.last.num_tokens == 6
    assert torch.equal(stats.last.loads, plain)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "minimax"])
def test_static_top1_versus_default(family):
    model = tiny_model(family)
    ids, mask = _batch()
    with RoutingStats(model) as stats, torch.no_grad():
        model(ids, attention_mask=mask)
        default = stats.last
        patch_model(model, TopKConfig(top_k=1))
        model(ids, attention_mask=mask)
        top1 = stats.last
        unpatch_model(model)
    assert default.activated.tolist() == [float(describe_model(model).blocks[0].spec.top_k)] * len(
        stats.layers
    )
    assert top1.activated.tolist() == [1.0] * len(stats.layers)
    assert top1.loads.sum().item() == 23 * len(stats.layers)
    summary = stats.summary()
    assert summary["num_batches"] == 2 and summary["num_tokens"] == 46
    assert summary["mean_activated"] == pytest.approx((default.activated.mean().item() + 1.0) / 2)


def test_sentinel_slots_are_not_counted():
    model = tiny_model("qwen3_moe")  # top-2
    ids, mask = _batch()
    patch_model(model, DropSlotsConfig())
    with RoutingStats(model) as stats, torch.no_grad():
        model(ids, attention_mask=mask)
    kept = 1 + torch.arange(ids.numel()) % 2
    expected = kept[mask.reshape(-1).bool()].float().mean().item()
    assert stats.last.activated.tolist() == pytest.approx([expected] * len(stats.layers))
    assert stats.last.loads.sum(1).tolist() == [float(kept[mask.reshape(-1).bool()].sum())] * len(
        stats.layers
    )


def test_accumulation_reset_and_detach():
    model = tiny_model("mixtral")
    ids, mask = _batch()
    stats = RoutingStats(model).attach()
    with torch.no_grad():
        model(ids, attention_mask=mask)
        first = stats.last
        model(ids[:, :5])
        second = stats.last
    summary = stats.summary()
    total = first.loads + second.loads
    assert summary["loads"] == total.long().tolist()
    assert summary["max_vio_global"] == pytest.approx(max_vio(total).tolist())
    per_batch = [first.max_vio.mean().item(), second.max_vio.mean().item()]
    assert summary["avg_max_vio"] == pytest.approx(sum(per_batch) / 2)
    assert summary["sup_max_vio"] == pytest.approx(max(per_batch))
    assert summary["num_tokens"] == 23 + 15
    stats.detach()
    with torch.no_grad():
        model(ids)
    assert stats.summary()["num_batches"] == 2  # detached: nothing new recorded
    stats.reset()
    assert stats.summary()["num_batches"] == 0 and stats.last is None


def test_generation_counts_every_new_token():
    model = tiny_model("mixtral")
    ids, mask = _batch()
    with RoutingStats(model) as stats, torch.no_grad():
        model.generate(
            ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0
        )
    # prompt forward (real tokens only) + two cached steps of one token per sequence
    assert stats.summary()["num_tokens"] == 23 + 2 * 3
    assert stats.summary()["num_batches"] == 3


def test_gradient_checkpointing_recomputation_is_not_counted():
    model = tiny_model("qwen2_moe").train()
    model.gradient_checkpointing_enable()
    ids, mask = _batch()
    with RoutingStats(model) as stats:
        model(ids, attention_mask=mask, labels=ids).loss.backward()  # backward re-runs every layer's forward
    summary = stats.summary()
    assert summary["num_batches"] == 1 and summary["num_tokens"] == 23
    assert summary["mean_activated"] == 2.0


def test_calls_of_a_submodule_are_not_recorded_and_warn():
    model = tiny_model("mixtral")
    ids, _ = _batch()
    with RoutingStats(model) as stats, torch.no_grad(), pytest.warns(UserWarning, match="outside a call"):
        model.model(ids)  # the inner model, not the one RoutingStats records
    assert stats.summary()["num_batches"] == 0
