"""Ada-K's budget calibration (``training/adak/steps.match_budget``) lands on ``target_experts``.

On a fixed allocator (no learning loop), the bisection of the common bias tilt must bring the greedy
mean number of experts on the calibration batches to the target, whether the allocator starts above the
budget (it must tilt towards fewer experts) or below it (towards more). The mean is recomputed here from
the model's own recorded expert counts, not read from the function's report. Seconds per case.
"""

import pytest
import torch
from adak_helpers import adak_config, token_rows

from hf_moe_routing.methods.adak import adak_layers, recording
from hf_moe_routing.patching import get_patch_state
from hf_moe_routing.testing import tiny_model
from hf_moe_routing.training.adak import AdaKTrainer, steps

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(tmp_path, family: str, target: float) -> AdaKTrainer:
    config = adak_config(
        tmp_path,
        warmup="random",
        max_steps=0,
        batch_size=8,
        calibration_batches=2,
        target_experts=target,
    )
    return AdaKTrainer(tiny_model(family), config, token_rows(length=16))


def _greedy_mean_k(trainer: AdaKTrainer, first_batch: int) -> float:
    """Mean over MoE layers of the greedy expert count per real token, on the calibration batches."""
    per_layer: dict[int, list[torch.Tensor]] = {}
    for b in range(first_batch, first_batch + trainer.config.calibration_batches):
        batch = trainer.stream.batch(b, "cpu")[1]
        mask = batch["attention_mask"].reshape(-1).bool()
        with torch.no_grad(), recording(trainer.model) as layers:
            trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            for i, layer in layers.items():
                per_layer.setdefault(i, []).append(layer.last.activated[mask].double())
    return float(torch.stack([torch.cat(v).mean() for v in per_layer.values()]).mean())


@pytest.mark.parametrize(
    ("family", "target", "start"),
    [
        ("mixtral", 1.4, "above"),
        ("mixtral", 1.4, "below"),
        ("qwen2_moe", 1.7, "above"),
        ("qwen2_moe", 1.25, "below"),
    ],
)
def test_budget_calibration_lands_on_target_experts_from_either_side(tmp_path, family, target, start):
    trainer = _trainer(tmp_path, family, target)
    g = torch.Generator().manual_seed(1)
    for layer in adak_layers(trainer.model).values():
        allocator = layer.allocator
        k_max = allocator.bias.numel()
        with torch.no_grad():
            allocator.weight.copy_(torch.randn(allocator.weight.shape, generator=g) * 0.1)
            # above: the most probable k is k_max for most tokens; below: k = 1
            ramp = torch.linspace(-3.0, 3.0, k_max) * (1.0 if start == "above" else -1.0)
            allocator.bias.copy_(ramp)
    first = trainer.state.batches_seen
    before = _greedy_mean_k(trainer, first)
    assert (before > target + 0.2) if start == "above" else (before < target - 0.2), before
    found = steps.match_budget(trainer)
    after = _greedy_mean_k(trainer, first)
    assert after == pytest.approx(target, abs=0.02), (before, found)
    assert found["budget_greedy_k_mean"] == pytest.approx(after, abs=1e-6)
    assert found["budget_greedy_k_before"] == pytest.approx(before, abs=1e-6)
    assert (found["budget_tilt"] < 0) if start == "above" else (found["budget_tilt"] > 0)


def _greedy_mean_k_on(trainer: AdaKTrainer, rows: list[dict]) -> float:
    """Mean over MoE layers of the greedy expert count per token of ``rows`` (one batch)."""
    ids = torch.stack([row["input_ids"] for row in rows])
    with torch.no_grad(), recording(trainer.model) as layers:
        trainer.model(input_ids=ids)
        return float(torch.stack([layer.last.activated.double().mean() for layer in layers.values()]).mean())


def test_budget_calibration_data_eval_lands_the_budget_on_the_eval_text(tmp_path):
    """Training text of tokens 3..29, eval text of tokens 90..127: the allocators' k depends on the token,
    so a budget met on the training batches misses on the eval text; 'eval' meets it there."""
    train = [
        {"input_ids": torch.randint(3, 30, (16,), generator=torch.Generator().manual_seed(i))}
        for i in range(32)
    ]
    held = [
        {"input_ids": torch.randint(90, 128, (16,), generator=torch.Generator().manual_seed(i))}
        for i in range(16)
    ]
    errors = {}
    for data in ("train", "eval"):
        config = adak_config(
            tmp_path / data,
            warmup="random",
            max_steps=0,
            batch_size=8,
            calibration_batches=2,
            target_experts=1.4,
            budget_calibration_data=data,
        )
        trainer = AdaKTrainer(tiny_model("mixtral"), config, train, eval_dataset=held)
        g = torch.Generator().manual_seed(3)
        for layer in adak_layers(trainer.model).values():
            with torch.no_grad():
                layer.allocator.weight.copy_(torch.randn(layer.allocator.weight.shape, generator=g))
        steps.match_budget(trainer)
        errors[data] = _greedy_mean_k_on(trainer, held) - 1.4
    assert abs(errors["eval"]) <= 0.02, errors
    assert abs(errors["train"]) > 0.05, errors  # the option has an effect here


def test_budget_calibration_data_eval_needs_an_eval_dataset(tmp_path):
    config = adak_config(tmp_path, target_experts=1.4, budget_calibration_data="eval")
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="pass eval_dataset"):
        AdaKTrainer(model, config, token_rows())
    assert get_patch_state(model) is None  # refused before the model is patched (or moved, or frozen)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="budget_calibration_data"):
        adak_config(tmp_path, budget_calibration_data="validation")


def test_the_model_card_keeps_the_budget_calibration_settings_exactly_where_the_calibration_runs(tmp_path):
    from hf_moe_routing.training.adak.reporting import settings_that_did_not_run

    calibrated = _trainer(tmp_path / "a", "mixtral", 1.4)  # random warm start, but a budget to calibrate to
    skipped = settings_that_did_not_run(calibrated)
    assert "calibration_batches" not in skipped and "budget_calibration_data" not in skipped
    no_target = AdaKTrainer(
        tiny_model("mixtral"),
        adak_config(tmp_path / "b", warmup="random", max_steps=0, target_experts=None, k_penalty=0.1),
        token_rows(length=16),
    )
    assert {"calibration_batches", "budget_calibration_data"} <= set(settings_that_did_not_run(no_target))
