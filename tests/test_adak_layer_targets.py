"""Per-layer budgets for Ada-K (``AdaKTrainingConfig.layer_targets``): the Skip-Warm start at each layer's own
budget, and one lambda per layer by dual ascent."""

from __future__ import annotations

import pytest
import torch
from adak_helpers import adak_config, token_rows

from hf_moe_routing.evaluation.paired import row_scores
from hf_moe_routing.testing import tiny_model
from hf_moe_routing.training.adak import AdaKTrainer, AdaKTrainingConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 24, length: int = 12, seed: int = 0) -> list[dict]:
    return [
        {**row, "attention_mask": torch.ones(length, dtype=torch.long), "labels": row["input_ids"]}
        for row in token_rows(n, length, seed)
    ]


def _config(tmp_path, **kw) -> AdaKTrainingConfig:
    base = dict(
        max_steps=0,
        batch_size=8,
        calibration_batches=3,
        logging_steps=1,
        budget_calibration=False,
    )
    return adak_config(tmp_path, **{**base, **kw})


def _model():
    return tiny_model("qwen2_moe", num_experts_per_tok=4)


def test_skip_warm_starts_every_layer_at_its_own_budget(tmp_path):
    data = _data()
    split = AdaKTrainer(_model(), _config(tmp_path, target_experts=2.4, layer_targets=[1.4, 3.4]), data)
    split.train()
    even = AdaKTrainer(_model(), _config(tmp_path / "even", target_experts=2.4), data)
    even.train()
    k_split = row_scores(split.model, data).experts_per_layer
    k_even = row_scores(even.model, data).experts_per_layer
    # the calibration tokens are the training stream's first batches: all 24 rows here
    assert k_split[0] == pytest.approx(1.4, abs=0.05)
    assert k_split[1] == pytest.approx(3.4, abs=0.3)  # layer 1 sees inputs changed by layer 0's routing
    assert abs(k_even[0] - 2.4) < 0.05 and abs(k_even[1] - k_even[0]) < 0.5
    assert split.state.warmup_mean_label == pytest.approx(2.4, abs=0.05)


def test_each_layer_gets_its_own_lambda_towards_its_own_budget(tmp_path):
    # K-Warm: every layer starts at top-4; layer 0's budget (1.5) is much further away than layer 1's (3.5)
    config = _config(
        tmp_path,
        warmup="k-warm",
        max_steps=3,
        batch_size=4,
        target_experts=2.5,
        layer_targets=[1.5, 3.5],
        k_penalty=0.0,
        k_penalty_learning_rate=0.1,
    )
    trainer = AdaKTrainer(_model(), config, _data())
    trainer.train()
    lams = trainer.state.layer_k_penalties
    ppo = [e for e in trainer.state.log_history if e.get("phase") == "ppo"]
    assert ppo[0]["k_penalty"] == [0.0, 0.0]
    # the first dual step alone moves lambda_l by 0.1 * (4 / target_l - 1): +0.167 and +0.014
    assert lams[0] > 0.15 and lams[0] > lams[1] + 0.1
    assert trainer.state.k_penalty == pytest.approx(sum(lams) / 2)


def test_layer_targets_are_checked(tmp_path):
    with pytest.raises(ValueError, match="set target_experts too"):
        _config(tmp_path, layer_targets=[1.5, 3.5])
    with pytest.raises(ValueError, match="layer_targets"):
        _config(tmp_path, target_experts=2.0, layer_targets=[0.5, 3.5])
    with pytest.raises(ValueError, match="average 3.0000 experts"):
        AdaKTrainer(_model(), _config(tmp_path, target_experts=2.0, layer_targets=[2.5, 3.5]), _data())
    with pytest.raises(ValueError, match="one mean k per Ada-K layer"):
        AdaKTrainer(_model(), _config(tmp_path, target_experts=2.0, layer_targets=[2.0]), _data())


def test_per_layer_lambda_prices_each_layers_expected_k():
    """The penalty term is sum_l lambda_l * E[k]_l / (n * L): a lambda on one layer charges that layer only."""
    from hf_moe_routing.methods.adak.allocator import Allocator
    from hf_moe_routing.methods.adak.ppo import action_log_probs, expected_k
    from hf_moe_routing.training.adak import rollout, update

    torch.manual_seed(0)
    allocators = {i: Allocator(4, 3, bias=True) for i in (0, 1)}
    bank = update.AllocatorBank({i: type("L", (), {"allocator": a})() for i, a in allocators.items()})
    states = [torch.randn(8, 4), torch.randn(8, 4)]
    actions = [torch.randint(1, 4, (8,)) for _ in states]
    with torch.no_grad():
        old = [action_log_probs(allocators[i](s), a) for i, s, a in zip((0, 1), states, actions)]
        ek = [float(expected_k(allocators[i](s)).sum()) for i, s in zip((0, 1), states)]
    mask = [torch.ones(8, dtype=torch.bool)] * 2
    experience = rollout.Experience(states, actions, old, [torch.zeros(8)] * 2, mask, tokens=16)

    def loss(lams):
        return float(
            update.ppo_loss(
                bank, experience, n_global=8, clip_epsilon=0.2, k_penalty=lams, entropy_coef=0.0, device="cpu"
            )[0].detach()
        )

    assert loss([0.5, 0.0]) - loss(0.0) == pytest.approx(0.5 * ek[0] / (8 * 2), rel=1e-5)
    assert loss([0.0, 0.5]) - loss(0.0) == pytest.approx(0.5 * ek[1] / (8 * 2), rel=1e-5)
    assert loss(0.5) == pytest.approx(loss([0.5, 0.5]), rel=1e-6)
    with pytest.raises(ValueError, match="per-layer values"):
        loss([0.5])
