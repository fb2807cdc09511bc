"""Kept-expert weight gains (issue 19): fitting them lowers the loss of the routing they serve, touches nothing
else, is reproducible, and the gains travel in the routing adapter; the baselines get the same freedom."""

from __future__ import annotations

import pytest
import torch

from hf_moe_routing import AdaKConfig, fit_kept_weight_gains, patch_model
from hf_moe_routing.evaluation.matched import BudgetedBaseline
from hf_moe_routing.hub import load_routing_adapter, save_routing_adapter
from hf_moe_routing.methods.adak import adak_layers
from hf_moe_routing.methods.kept_gain import KeptWeightGain, fit_gains, kept_gains
from hf_moe_routing.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n: int = 16, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _model_keeping_fewer(family: str = "qwen2_moe", k: int = 1):
    """A tiny model patched with Ada-K + weight gains whose allocators give every token ``k`` experts."""
    model = patch_model(tiny_model(family), AdaKConfig(weight_gain=True))
    for layer in adak_layers(model).values():
        with torch.no_grad():
            layer.allocator.weight.zero_()
            layer.allocator.bias.fill_(-30.0)
            layer.allocator.bias[k - 1] = 30.0
        layer.num_updates.fill_(1)  # as if trained
    return model.eval()


def _loss(model, rows) -> float:
    with torch.no_grad():
        return float(model(input_ids=rows, labels=rows).loss)


def _base_sums(model) -> dict[str, float]:
    return {
        n: float(p.detach().double().sum())
        for n, p in model.named_parameters()
        if "kept_gain" not in n and "allocator" not in n
    }


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_fitting_lowers_the_loss_and_changes_nothing_else(family):
    model, rows = _model_keeping_fewer(family), _rows()
    before, base = _loss(model, rows), _base_sums(model)
    allocators = {i: layer.allocator.weight.clone() for i, layer in adak_layers(model).items()}
    stats = fit_kept_weight_gains(model, rows, max_steps=40, batch_size=8, learning_rate=0.05)
    after = _loss(model, rows)
    assert after < before - 1e-4 and stats["steps"] == 40 and stats["loss_last"] < stats["loss_first"]
    gains = kept_gains(model)
    assert all(not g.requires_grad and g.grad is None for g in gains)  # frozen again
    assert any(abs(float(g[0]) - 1.0) > 1e-3 for g in gains)  # the count every token keeps moved
    assert all(float(g[-1]) == 1.0 for g in gains)  # top-k's gain is never trained (its gradient is 0)
    assert _base_sums(model) == base
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(layer.allocator.weight, allocators[i]) for i, layer in adak_layers(model).items())


def test_fitting_is_reproducible_by_seed():
    fitted = []
    for seed in (0, 0, 1):
        model = _model_keeping_fewer()
        fit_kept_weight_gains(model, _rows(), max_steps=6, batch_size=4, learning_rate=0.05, seed=seed)
        fitted.append(torch.cat([g.detach().clone() for g in kept_gains(model)]))
    assert torch.equal(fitted[0], fitted[1]) and not torch.equal(fitted[0], fitted[2])


def test_gains_travel_in_the_routing_adapter(tmp_path):
    model, rows = _model_keeping_fewer(), _rows()
    fit_kept_weight_gains(model, rows, max_steps=10, batch_size=8, learning_rate=0.05)
    save_routing_adapter(model, tmp_path / "adapter")
    loaded = load_routing_adapter(tiny_model("qwen2_moe"), tmp_path / "adapter").eval()
    for a, b in zip(kept_gains(model), kept_gains(loaded), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(model(rows).logits, loaded(rows).logits)
    without = patch_model(tiny_model("qwen2_moe"), AdaKConfig())  # an adapter with gains into a layer without
    with pytest.raises(ValueError, match="weight_gain"):
        adak_layers(without)[0].load_routing_state(adak_layers(model)[0].routing_state())


def test_bad_settings_and_models_without_gains_are_refused():
    plain = patch_model(tiny_model("qwen2_moe"), AdaKConfig())
    with pytest.raises(ValueError, match=r"AdaKConfig\(weight_gain=True\)"):
        fit_kept_weight_gains(plain, _rows())
    model = _model_keeping_fewer()
    for bad, match in (({"max_steps": 0}, "max_steps"), ({"learning_rate": 0.0}, "learning_rate")):
        with pytest.raises(ValueError, match=match):
            fit_kept_weight_gains(model, _rows(), **bad)
    with pytest.raises(ValueError, match="no rows"):
        fit_kept_weight_gains(model, _rows()[:0])
    with pytest.raises(ValueError, match="no gain parameters"):
        fit_gains(model, [], _rows())
    with pytest.raises(ValueError, match="slots >= 1"):
        KeptWeightGain(0, 2)


def test_baselines_get_gains_of_their_own_fitted_from_one():
    """``BudgetedBaseline.fit_weight_gains``: the same weight rule on dynamic skipping, fitted at its current
    thresholds; it lowers the baseline's loss, and a second fit starts again from gains of 1 (same result)."""
    rows = _rows(24)
    baseline = BudgetedBaseline(tiny_model("qwen2_moe"), "dyn-skip", rows[:8], batch_size=8)
    baseline.set_budgets(1.5)
    before = _loss(baseline.model, rows)
    baseline.fit_weight_gains(rows, max_steps=20, batch_size=8, learning_rate=0.05)
    first = torch.cat([g.gain.detach().clone() for g in baseline.gains.values()])
    assert _loss(baseline.model, rows) < before - 1e-4 and not torch.equal(first, torch.ones_like(first))
    baseline.fit_weight_gains(rows, max_steps=20, batch_size=8, learning_rate=0.05)
    assert torch.equal(torch.cat([g.gain for g in baseline.gains.values()]), first)


def test_the_trainer_fits_the_gains_after_ppo_and_saves_them(tmp_path):
    """``AdaKConfig(weight_gain=True)``: the trainer fits the gains after the budget calibration (the base, and
    its unchanged-weights check, untouched), logs the fit and saves the gains in its adapter; with
    ``weight_gain_steps=0`` they stay 1."""
    from adak_helpers import adak_config, token_rows

    from hf_moe_routing import AdaKTrainer

    fitted = {}
    for steps in (30, 0):
        config = adak_config(
            tmp_path / str(steps),
            warmup="skip-warm",
            max_steps=1,
            batch_size=8,
            calibration_batches=2,
            target_experts=1.2,
            weight_gain_steps=steps,
            weight_gain_learning_rate=0.05,
        )
        trainer = AdaKTrainer(
            tiny_model("mixtral"), config, token_rows(length=16), adak_config=AdaKConfig(weight_gain=True)
        )
        trainer.train()  # verify_base_unchanged=True: the gains are not base weights
        fitted[steps] = torch.cat([g.detach().clone() for g in kept_gains(trainer.model)])
        phases = [e.get("phase") for e in trainer.state.log_history]
        assert ("weight-gain" in phases) == (steps > 0)
        assert (trainer.state.weight_gain_fit is not None) == (steps > 0)
        saved = load_routing_adapter(tiny_model("mixtral"), tmp_path / str(steps) / "run")
        assert torch.equal(torch.cat(list(kept_gains(saved))), fitted[steps])
    assert not torch.equal(fitted[30], torch.ones_like(fitted[30]))
    assert torch.equal(fitted[0], torch.ones_like(fitted[0]))


def test_the_learning_rate_sets_how_far_each_step_moves_the_gains():
    """Adam's first steps move each gain by about ``learning_rate``: 5 steps at 0.01 stay within 0.05 of 1,
    5 steps at 0.1 move the fitted gain further (``weight_gain_learning_rate`` in the trainer)."""
    moved = {}
    for lr in (0.01, 0.1):
        model = _model_keeping_fewer()
        fit_kept_weight_gains(model, _rows(), max_steps=5, batch_size=4, learning_rate=lr)
        moved[lr] = max(float((g - 1).abs().max()) for g in kept_gains(model))
    assert 0 < moved[0.01] <= 0.05 + 1e-6 and moved[0.1] > 2 * moved[0.01]


def test_routing_replay_applies_the_recorded_routing_gains():
    """``record_routing`` then ``replay_routing`` of a model with gains gives the rollout's logits exactly."""
    from hf_moe_routing import record_routing, replay_routing

    model, rows = _model_keeping_fewer("mixtral"), _rows(4, 16)
    for gain in kept_gains(model):
        with torch.no_grad():
            gain.fill_(1.8)
    with torch.no_grad(), record_routing(model) as routed:
        rollout = model(rows).logits
    with torch.no_grad(), replay_routing(model, routed):
        replayed = model(rows).logits
    torch.testing.assert_close(replayed, rollout, rtol=0, atol=1e-5)


def test_fit_takes_a_dict_of_columns_skips_padding_only_batches_and_refuses_an_infinite_step():
    rows = _rows(8, 16)
    mask = torch.ones_like(rows)
    mask[:4] = 0  # four rows of padding only: batches of them have no loss
    model = _model_keeping_fewer()
    stats = fit_kept_weight_gains(
        model, {"input_ids": rows, "attention_mask": mask}, max_steps=6, batch_size=2, learning_rate=0.05
    )
    assert stats["steps"] == 6 and all(torch.isfinite(g).all() for g in kept_gains(model))
    with pytest.raises(ValueError, match="finite number > 0"):
        fit_kept_weight_gains(model, rows, learning_rate=float("inf"))
