"""Loss-Controlled (auxiliary loss) and Loss-Free (selection bias) baselines on every family."""

import pytest
import torch

from hf_moe_routing import (
    LossControlledConfig,
    LossFreeConfig,
    TopKConfig,
    patch_model,
    routing_aux_loss,
    routing_layers,
)
from hf_moe_routing.core.ops import max_vio, tokens_per_expert
from hf_moe_routing.hub import load_routing_adapter, save_routing_adapter
from hf_moe_routing.methods.loss_controlled import load_balancing_loss
from hf_moe_routing.methods.loss_free.bias import bias_update
from hf_moe_routing.testing import REQUIRED_FAMILIES, tiny_model


def _ids(batch=4, length=32, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- Loss-Controlled ---------------------------------------------------------------------------


def test_aux_loss_is_one_when_perfectly_balanced_and_larger_when_not():
    m, k = 4, 2
    uniform = torch.full((8, m), 1 / m)
    balanced = torch.tensor([[0, 1], [2, 3]] * 4)
    assert load_balancing_loss(uniform, balanced).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 8)
    collapsed = torch.tensor([[0, 1]] * 8)
    assert load_balancing_loss(skewed, collapsed).item() == pytest.approx(m * (0.5 * 0.7 + 0.5 * 0.1))
    # sentinels and padding are excluded
    mask = torch.tensor([True] * 4 + [False] * 4)
    mixed = torch.cat([balanced[:4], collapsed[:4]])
    assert load_balancing_loss(uniform, mixed, mask).item() == pytest.approx(1.0)
    assert k == balanced.shape[1]


def test_per_sequence_loss_is_the_mean_of_sequence_losses():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(12, 8, generator=g).softmax(-1)
    index = scores.topk(2, 1).indices
    per_seq = load_balancing_loss(scores, index, num_sequences=3)
    parts = [load_balancing_loss(scores[i * 4 : (i + 1) * 4], index[i * 4 : (i + 1) * 4]) for i in range(3)]
    assert per_seq.item() == pytest.approx(sum(p.item() for p in parts) / 3)
    assert per_seq.item() != pytest.approx(load_balancing_loss(scores, index).item())


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_loss_controlled_keeps_routing_and_adds_a_differentiable_aux_loss(family):
    model = tiny_model(family)
    ids = _ids()
    with torch.no_grad():
        reference = model(ids).logits
    patch_model(model, LossControlledConfig(coefficient=0.05))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=0)
    assert routing_aux_loss(model) is None  # eval mode: no loss
    model.train()
    out = model(ids, labels=ids)
    aux = routing_aux_loss(model)
    assert aux is not None and aux.dim() == 0 and aux.item() >= 0.05 * len(routing_layers(model)) * 0.99
    (out.loss + aux).backward()
    gate = next(iter(routing_layers(model).values()))
    router = [b for b in model.modules() if getattr(b, "routing", None) is gate][0]
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert routing_aux_loss(model) is None  # reading it cleared it


def test_per_sequence_variant_sees_the_batch_shape_and_excludes_padding():
    model = tiny_model("mixtral")
    ids = _ids(batch=3, length=8)
    attention = torch.ones_like(ids)
    attention[2, 5:] = 0
    patch_model(model, LossControlledConfig(per_sequence=True))
    model.train()
    model(ids, attention_mask=attention)
    per_sequence = routing_aux_loss(model)
    assert all(layer.num_sequences == 3 for layer in routing_layers(model).values())
    patch_model(model, LossControlledConfig(), replace=True)
    model.train()
    model(ids, attention_mask=attention)
    assert routing_aux_loss(model).item() != pytest.approx(per_sequence.item())


def test_loss_controlled_training_reduces_imbalance():
    model = tiny_model("qwen3_moe")
    patch_model(model, LossControlledConfig(coefficient=1.0))
    model.train()
    ids = _ids(batch=2, length=16)
    gates = [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
    optimizer = torch.optim.SGD(gates, lr=0.5)
    losses = []
    for _ in range(4):
        model(ids)
        aux = routing_aux_loss(model)
        losses.append(aux.item())
        optimizer.zero_grad()
        aux.backward()
        optimizer.step()
    assert losses[-1] < 0.97 * losses[0]


def test_loss_controlled_bad_coefficient():
    with pytest.raises(ValueError, match="coefficient"):
        LossControlledConfig(coefficient=-1.0)


# ---- Loss-Free ---------------------------------------------------------------------------------


def test_bias_update_rule():
    loads = torch.tensor([10.0, 2.0, 6.0, 6.0])
    assert bias_update(loads, 1e-3).tolist() == pytest.approx([-1e-3, 1e-3, 0.0, 0.0])


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_loss_free_routes_like_the_model_first_then_updates_its_bias(family):
    model = tiny_model(family)
    ids = _ids()
    with torch.no_grad():
        reference = model(ids).logits
    patch_model(model, LossFreeConfig(update_rate=0.01))
    initial = {i: layer.selection_bias.clone() for i, layer in routing_layers(model).items()}
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference)  # the model's own b for the first batch
    for index, layer in routing_layers(model).items():
        bias = layer.selection_bias
        assert (bias - initial[index]).abs().max().item() == pytest.approx(0.01)  # one step of +-u
        state = layer.routing_state()
        assert set(state) == {"bias", "num_updates"} and int(state["num_updates"]) == 1
        if family == "deepseek_v3":  # the model's own bias is updated (from a float32 master copy)
            gate = model.model.layers[index].mlp.gate
            assert bias is gate.e_score_correction_bias
            assert torch.equal(state["bias"], gate.e_score_correction_bias.float())
    model.eval()
    before = {i: layer.selection_bias.clone() for i, layer in routing_layers(model).items()}
    with torch.no_grad():
        model(ids)
    assert all(torch.equal(layer.selection_bias, before[i]) for i, layer in routing_layers(model).items())


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_loss_free_balances_a_stream(family):
    model = tiny_model(family)
    ids = _ids(batch=4, length=32)
    seen = []

    def record(model_):
        for layer in routing_layers(model_).values():
            layer.register_forward_hook(
                lambda mod, args, out: seen.append(max_vio(tokens_per_expert(out[2], out[0].shape[-1])))
            )

    patch_model(model, TopKConfig())
    record(model)
    with torch.no_grad():
        model(ids)
    topk = sum(seen) / len(seen)
    patch_model(model, LossFreeConfig(update_rate=0.02), replace=True)
    model.train()
    with torch.no_grad():
        for _ in range(30):
            model(ids)
    seen.clear()
    record(model)
    with torch.no_grad():
        model(ids)
    assert sum(seen) / len(seen) < 0.6 * topk


def test_loss_free_padding_is_excluded():
    model = tiny_model("mixtral")
    patch_model(model, LossFreeConfig())
    model.train()
    with torch.no_grad():
        model(_ids(batch=2, length=6), attention_mask=torch.zeros(2, 6, dtype=torch.long))
    assert all(layer.bias.abs().max() == 0 for layer in routing_layers(model).values())


def test_loss_free_state_round_trips_through_the_routing_adapter(tmp_path):
    model = tiny_model("deepseek_v3")
    patch_model(model, LossFreeConfig(update_rate=0.01))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(_ids())
    save_routing_adapter(model, tmp_path / "lf")
    fresh = tiny_model("deepseek_v3")
    load_routing_adapter(fresh, tmp_path / "lf")
    for index, layer in routing_layers(fresh).items():
        assert torch.equal(
            fresh.model.layers[index].mlp.gate.e_score_correction_bias,
            model.model.layers[index].mlp.gate.e_score_correction_bias,
        )
        assert layer.selection_bias.abs().max() > 0


def test_loss_free_bad_rate():
    with pytest.raises(ValueError, match="update_rate"):
        LossFreeConfig(update_rate=0.0)
