"""Routing replay (R3): record the experts of a rollout, replay them in the training forward.

Record-then-replay must reproduce the recorded forward bit for bit (fp32 and bf16) on one family
per router kind (every supported family with HF_MOE_REPLAY_ALL=1), with gradients reaching the
router; records must survive save / load and the engines' layouts; batches that do not match the
record, and records that do not fit the model, are refused.
"""

import base64
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from family_expectations import expected_for

from hf_moe_routing import (
    RoutedExperts,
    describe_model,
    get_patch_state,
    patch_model,
    record_routing,
    replay_routing,
    unpatch_model,
)
from hf_moe_routing.evaluation import RoutingStats
from hf_moe_routing.patching import is_patched, routing_layers
from hf_moe_routing.testing import OffsetConfig, randomize_offsets, tiny_model

EXPECTED = expected_for()[1]["supported"]


def _one_per_kind() -> list[str]:
    chosen: dict[str, str] = {}
    for name in sorted(EXPECTED):
        chosen.setdefault(EXPECTED[name]["kind_key"], name)
    return sorted(chosen.values())


FAMILIES = sorted(EXPECTED) if os.environ.get("HF_MOE_REPLAY_ALL") else _one_per_kind()


def _batch(rows: int = 3, seq: int = 10, seed: int = 0):
    """Token ids with left padding of 0, 3 and 1 tokens (rows beyond 3 unpadded)."""
    ids = torch.randint(3, 128, (rows, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 3, 1][:rows]):
        mask[row, :pad] = 0
    return ids, mask


def _other_routing_record(model):
    """The model's batch, its logits and a record of another routing (offset top-2), with the model left unpatched."""
    ids, mask = _batch()
    patch_model(model, OffsetConfig(top_k=2))
    randomize_offsets(model)
    with torch.no_grad(), record_routing(model) as routed:
        logits = model(ids, attention_mask=mask).logits
    unpatch_model(model)
    return ids, mask, logits, routed


def _router_weights(model):
    return [b.spec.weight(b.router) for b in describe_model(model).blocks]


# ---- bit-exact replay, gradients -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_replay_reproduces_the_recorded_forward_bit_for_bit(family, dtype):
    model = tiny_model(family, dtype=dtype)
    ids, mask = _batch()
    with torch.no_grad(), record_routing(model) as routed:
        reference = model(ids, attention_mask=mask).logits
    assert not is_patched(model)  # patched for the recording only
    assert routed.lengths == mask.sum(dim=1).tolist()  # real tokens only
    assert routed.num_slots == describe_model(model).shape.top_k
    with torch.no_grad(), replay_routing(model, routed):
        replayed = model(ids, attention_mask=mask).logits
    assert not is_patched(model)
    assert torch.equal(replayed, reference)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text"])
def test_gradients_reach_the_router_and_match_the_models_own(family):
    """At the model's own routing, replay gives the same loss and router gradients as a plain forward."""
    model = tiny_model(family).train()
    ids, mask = _batch()
    with torch.no_grad(), record_routing(model) as routed:
        model(ids, attention_mask=mask)

    def grads():
        model.zero_grad()
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        return loss.detach(), [w.grad.clone() for w in _router_weights(model)]

    loss, own = grads()
    with replay_routing(model, routed):
        replay_loss, replayed = grads()
    assert torch.equal(loss, replay_loss)
    for theirs, ours in zip(own, replayed, strict=True):
        assert ours.abs().sum() > 0 and torch.equal(theirs, ours)


def test_replay_forces_the_recorded_experts_with_weights_from_the_current_router():
    """A record of another routing is routed as recorded, weighed by the family's rule (an independent check)."""
    model = tiny_model("qwen3_moe")
    ids, mask, reference, routed = _other_routing_record(model)
    seen = {}
    blocks = describe_model(model).blocks
    with torch.no_grad(), replay_routing(model, routed):
        handles = [
            b.router.register_forward_hook(
                lambda m, a, out, b=b: seen.__setitem__(b.layer_index, (a[0], out))
            )
            for b in blocks
        ]
        out = model(ids, attention_mask=mask).logits
        for h in handles:
            h.remove()
    # OffsetConfig weighs by the family's rule too; its padding was routed by the offsets (the model's
    # top-k now: other tokens per expert, other matmul shapes, so real tokens agree up to rounding)
    real_rows = mask.bool()
    torch.testing.assert_close(out[real_rows], reference[real_rows], rtol=1e-5, atol=1e-6)
    real = mask.reshape(-1).bool()
    for j, block in enumerate(blocks):
        hidden, (logits, weights, index) = seen[block.layer_index]
        recorded = torch.cat([routed.experts(r)[:, j] for r in range(len(routed))]).long()
        assert torch.equal(index[real], recorded)
        # Qwen3-MoE: softmax over all experts (float32), gathered, renormalised over the chosen ones
        probs = torch.softmax(hidden.reshape(-1, hidden.shape[-1]) @ block.spec.weight(block.router).T, -1)
        expected = probs.gather(1, index)
        expected = expected / expected.sum(-1, keepdim=True)
        torch.testing.assert_close(weights, expected.to(weights.dtype), rtol=1e-5, atol=1e-6)


def test_a_patched_model_keeps_its_routing_and_its_state():
    model = tiny_model("mixtral")
    ids, mask = _batch()
    patch_model(model, OffsetConfig(top_k=2))
    randomize_offsets(model)
    layers = routing_layers(model)
    state = {i: {k: v.clone() for k, v in layer.state_dict().items()} for i, layer in layers.items()}
    with torch.no_grad(), record_routing(model) as routed:
        reference = model(ids, attention_mask=mask).logits
    with torch.no_grad(), replay_routing(model, routed):
        assert all(type(x).__name__ == "ReplayLayer" for x in routing_layers(model).values())
        real = mask.bool()  # padding: see the test above
        torch.testing.assert_close(
            model(ids, attention_mask=mask).logits[real], reference[real], rtol=1e-5, atol=1e-6
        )
    assert get_patch_state(model).config == OffsetConfig(top_k=2)
    for i, layer in routing_layers(model).items():
        assert layer is layers[i]
        assert all(torch.equal(v, state[i][k]) for k, v in layer.state_dict().items())


def test_a_variable_k_record_replays_its_unused_slots():
    from hf_moe_routing.testing import DropSlotsConfig

    model = tiny_model("qwen3_moe")
    ids, mask = _batch()
    patch_model(model, DropSlotsConfig())
    with torch.no_grad(), record_routing(model) as routed:
        model(ids, attention_mask=mask)
    unpatch_model(model)
    assert routed.has_unused_slots
    with torch.no_grad(), replay_routing(model, routed), record_routing(model) as again:
        out = model(ids, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    assert again.compare(routed).decision_share == 0.0
    for row in range(len(routed)):
        assert torch.equal(again.experts(row), routed.experts(row))
    assert model.config._experts_implementation != "sentinel_grouped_mm"  # restored


# ---- generate: prefill + decode steps ------------------------------------------------------------
def test_generate_records_prefill_and_every_decode_step_and_replays_onto_the_full_sequences():
    model = tiny_model("qwen3_moe")
    prompts, mask = _batch(rows=3, seq=6)
    new = 5
    with torch.no_grad(), record_routing(model) as routed:
        sequences = model.generate(
            prompts,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    full_mask = torch.cat([mask, torch.ones(3, new, dtype=mask.dtype)], dim=1)
    # prompt tokens + one per decode step; the last sampled token is never forwarded
    assert routed.lengths == (mask.sum(dim=1) + new - 1).tolist()
    with torch.no_grad(), replay_routing(model, routed), record_routing(model) as training:
        model(sequences, attention_mask=full_mask)
    assert training.lengths == [n + 1 for n in routed.lengths]
    recorded = routed.compare(training.select(range(3)))  # over the recorded tokens; hashes must agree
    assert recorded.num_tokens == sum(routed.lengths) and recorded.decision_share == 0.0
    refused = pytest.raises(ValueError, match="real tokens, its record")
    with refused, torch.no_grad(), replay_routing(model, routed, max_unrecorded=0):
        model(sequences, attention_mask=full_mask)


# ---- refused batches -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded():
    model = tiny_model("qwen3_moe")
    ids, mask = _batch()
    with torch.no_grad(), record_routing(model) as routed:
        model(ids, attention_mask=mask)
    return model, ids, mask, routed


def test_a_batch_in_another_order_is_refused(recorded):
    model, ids, mask, routed = recorded
    order = [1, 0, 2]
    refused = pytest.raises(
        ValueError, match=r"batch row 0 .* tokens of record row 1: the batch is in another order"
    )
    with refused, torch.no_grad(), replay_routing(model, routed):
        model(ids[order], attention_mask=mask[order])
    assert not is_patched(model)
    with torch.no_grad(), replay_routing(model, routed.select(order)):  # the remedy the message names
        model(ids[order], attention_mask=mask[order])


def test_other_padding_or_tokens_or_rows_are_refused(recorded):
    model, ids, mask, routed = recorded
    cases = {
        "other padding": (ids, torch.ones_like(mask)),
        "other tokens": (ids.index_put((torch.tensor([2]), torch.tensor([5])), torch.tensor(99)), mask),
        "other rows": (ids[:2], mask[:2]),
    }
    for what, (bad_ids, bad_mask) in cases.items():
        with (
            pytest.raises(ValueError, match="replay_routing"),
            torch.no_grad(),
            replay_routing(model, routed),
        ):
            model(bad_ids, attention_mask=bad_mask)
        assert not is_patched(model), what


def test_a_shorter_row_replays_a_prefix(recorded):
    """Tokens after EOS masked out in the training forward: the row replays a prefix of its record."""
    model, ids, mask, routed = recorded
    short = mask.clone()
    short[0, -3:] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=short).logits
    with torch.no_grad(), replay_routing(model, routed):
        assert torch.equal(model(ids, attention_mask=short).logits, expected)


# ---- records that do not fit ---------------------------------------------------------------------
def test_records_that_do_not_fit_the_model_are_refused(recorded):
    model, ids, mask, routed = recorded
    for record, message in [
        (RoutedExperts([0, 7], routed.num_experts), r"layer 7 is not an MoE layer"),
        (RoutedExperts(routed.layers, 16), r"16 experts per layer, the model has 8"),
    ]:
        with pytest.raises(ValueError, match=message), replay_routing(model, record):
            pass
    bad = routed.experts(0).clone()
    bad[2, 1, 0] = 8 + 3
    with pytest.raises(ValueError, match=r"Row 0, token 2, MoE layer 1: expert id 11 is outside 0..7"):
        RoutedExperts(routed.layers, 8, [bad], [routed.token_hashes(0)])
    bad[2, 1] = torch.tensor([4, 4])
    with pytest.raises(ValueError, match=r"MoE layer 1: the same expert appears twice"):
        RoutedExperts(routed.layers, 8, [bad], [routed.token_hashes(0)])
    assert not is_patched(model)


# ---- files and engines ---------------------------------------------------------------------------
def test_save_and_load_round_trip_and_refuse_other_files(recorded, tmp_path):
    model, ids, mask, routed = recorded
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
    loaded = RoutedExperts.load(routed.save(tmp_path / "rollout.safetensors"))
    assert loaded.layers == routed.layers and loaded.lengths == routed.lengths
    for row in range(len(routed)):
        assert torch.equal(loaded.experts(row), routed.experts(row))
        assert torch.equal(loaded.token_hashes(row), routed.token_hashes(row))
    with torch.no_grad(), replay_routing(model, loaded):
        assert torch.equal(model(ids, attention_mask=mask).logits, reference)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a routed-experts file"):
        RoutedExperts.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        RoutedExperts.load(tmp_path / "missing.safetensors")


def _engine_sample(family: str):
    """A rollout in the engines' layout: (tokens - 1, num_hidden_layers, top_k) int32, dense layers 0."""
    model = tiny_model(family)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), record_routing(model) as routed:
        reference = model(ids).logits
    shape = describe_model(model).shape
    arrays = []
    for row in range(2):
        full = np.zeros((ids.shape[1] - 1, shape.num_hidden_layers, shape.top_k), dtype=np.int32)
        full[:, list(routed.layers)] = routed.experts(row)[:-1].numpy().transpose(0, 1, 2)
        arrays.append(full)
    return model, ids, reference, routed, arrays


def test_vllm_routed_experts_are_read_at_the_moe_layers():
    model, ids, reference, routed, arrays = _engine_sample("deepseek_v3")
    shape = describe_model(model).shape
    assert shape.num_hidden_layers > len(
        routed.layers
    )  # a dense first layer: the layer axis is decoder layers
    prompt_len = 4
    outputs = [
        SimpleNamespace(
            prompt_token_ids=ids[r, :prompt_len].tolist(),
            outputs=[SimpleNamespace(token_ids=ids[r, prompt_len:].tolist(), routed_experts=arrays[r])],
        )
        for r in range(2)
    ]
    imported = RoutedExperts.from_vllm(outputs, model)
    assert imported.lengths == [ids.shape[1] - 1] * 2
    assert imported.compare(routed).decision_share == 0.0
    with torch.no_grad(), replay_routing(model, imported):  # the last token: the model's own choice
        assert torch.equal(model(ids).logits, reference)
    outputs[0].outputs[0].routed_experts = None
    with pytest.raises(ValueError, match="enable_return_routed_experts=True"):
        RoutedExperts.from_vllm(outputs, model)
    wrong = shape.num_hidden_layers + 1
    with pytest.raises(ValueError, match=f"layer axis has {wrong} entries"):
        RoutedExperts.from_vllm([(ids[0].tolist(), np.zeros((8, wrong, shape.top_k), np.int32))], model)
    with pytest.raises(ValueError, match="8 tokens of routed experts for 7"):
        RoutedExperts.from_vllm([(ids[0, :-2].tolist(), arrays[0])], model)


def test_sglang_base64_routed_experts_are_read():
    model, ids, reference, routed, arrays = _engine_sample("deepseek_v3")
    responses = [
        (ids[r].tolist(), {"meta_info": {"routed_experts": base64.b64encode(arrays[r].tobytes()).decode()}})
        for r in range(2)
    ]
    imported = RoutedExperts.from_sglang(responses, model)
    with torch.no_grad(), replay_routing(model, imported):
        assert torch.equal(model(ids).logits, reference)
    narrow = [
        (
            i,
            {
                "meta_info": {
                    "routed_experts": base64.b64encode(a.astype(np.uint8).tobytes()).decode(),
                    "routed_experts_dtype": "uint8",
                }
            },
        )
        for (i, _), a in zip(responses, arrays)
    ]
    assert RoutedExperts.from_sglang(narrow, model).lengths == imported.lengths


# ---- statistics ----------------------------------------------------------------------------------
def test_routing_stats_report_how_often_the_router_would_change_the_replayed_experts():
    model = tiny_model("qwen3_moe")
    ids, mask, _, rollout = _other_routing_record(model)
    with torch.no_grad(), record_routing(model) as own:  # the model's own routing of the same batch
        model(ids, attention_mask=mask)
    expected = rollout.compare(own)
    assert 0 < expected.token_share <= 1 and 0 < expected.decision_share < 1
    with torch.no_grad(), replay_routing(model, rollout), RoutingStats(model) as stats:
        model(ids, attention_mask=mask)
    changes = stats.summary()["replay_changes"]
    assert changes["num_tokens"] == expected.num_tokens == int(mask.sum())
    # the first MoE layer sees the same hidden states in both forwards: the same disagreement
    assert changes["per_layer"][0] == pytest.approx(expected.per_layer[0])
    assert 0 < changes["token_share"] <= 1 and changes["decision_share"] > 0
    with torch.no_grad(), replay_routing(model, own), RoutingStats(model) as stats:
        model(ids, attention_mask=mask)
    assert stats.replay_changes["token_share"] == 0.0  # at the model's own routing nothing changes
    with torch.no_grad(), RoutingStats(model) as stats:
        model(ids, attention_mask=mask)
    assert stats.summary()["replay_changes"] is None
