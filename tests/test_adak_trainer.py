"""AdaKTrainer at the level users rely on: the frozen base, warm starts, advantages, learning, budgets, seeds, logs."""

import copy
import json
import math

import pytest
import torch
from adak_helpers import adak_config, token_rows

from hf_moe_routing import DynamicSkipConfig, original_routing, patch_model
from hf_moe_routing.data import pack_dataset, synthetic_corpus, synthetic_tokenizer
from hf_moe_routing.data.synthetic import classify_words
from hf_moe_routing.methods.adak import AdaKConfig, adak_layers, default_routing, recording
from hf_moe_routing.methods.adak.allocator import Allocator
from hf_moe_routing.methods.adak.ppo import action_log_probs, expected_k, token_log_likelihood
from hf_moe_routing.methods.routing import weights_depend_on_chosen_set
from hf_moe_routing.patching import describe
from hf_moe_routing.testing import tiny_model
from hf_moe_routing.training.adak import (
    AdaKTrainer,
    AdaKTrainingConfig,
    allocator_state,
    latest_checkpoint,
    rollout,
    update,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, **kw) -> AdaKTrainingConfig:
    base = dict(
        warmup_steps=2,
        max_steps=3,
        batch_size=4,
        calibration_batches=1,
        logging_steps=1,
        learning_rate=1e-2,
        k_penalty=0.05,
    )
    return adak_config(tmp_path, **{**base, **kw})


# ---- the frozen base model -----------------------------------------------------------------------
@pytest.mark.parametrize(("family", "warmup"), [("mixtral", "p-warm"), ("deepseek_v3", "skip-warm")])
def test_training_changes_only_allocators(family, warmup, tmp_path):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = AdaKTrainer(model, _config(tmp_path, warmup=warmup), token_rows(), token_rows(8, seed=1))
    initial = allocator_state(model)
    trainer.train()
    after = model.state_dict()
    base_keys = [k for k in after if ".routing." not in k]
    assert sorted(base_keys) == sorted(before)
    for key in base_keys:
        assert torch.equal(after[key], before[key]), key
    assert all(
        not p.requires_grad and p.grad is None for n, p in model.named_parameters() if ".routing." not in n
    )
    trained = allocator_state(model)
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)


def test_a_base_parameter_with_a_gradient_is_refused(tmp_path):
    model = tiny_model("qwen2_moe")
    trainer = AdaKTrainer(
        model, _config(tmp_path, warmup="p-warm", warmup_steps=1, max_steps=0), token_rows()
    )
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="lm_head"):
        trainer.train()


def test_offloaded_base_model_with_a_device_map(tmp_path):
    """A base model dispatched by accelerate (layer 1 offloaded to disk) trains in one process."""
    from transformers import AutoModelForCausalLM

    tiny_model("qwen2_moe").save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    device_map.update({"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"})
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    assert model.model.layers[1].mlp.gate.weight.device.type == "meta"
    trainer = AdaKTrainer(model, _config(tmp_path), token_rows(), token_rows(8, seed=1))
    initial = allocator_state(model)
    trainer.train()
    assert all(layer.allocator.weight.device.type == "cpu" for layer in adak_layers(model).values())
    assert any(not torch.equal(allocator_state(model)[k], v) for k, v in initial.items())
    assert (
        trainer.evaluate()["eval_activated_per_layer"][1] > 0
    )  # the offloaded layer routes with its allocator


# ---- exact warm starts ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe"])
def test_k_warm_starts_exactly_at_the_models_top_k(family, tmp_path):
    """K-Warm under the family's weighting routes bit for bit as the unpatched model (same experts kernel)."""
    ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(5))
    unpatched = tiny_model(family)
    unpatched.set_experts_implementation(
        "sentinel_grouped_mm"
    )  # what variable-k routing runs the experts with
    reference = unpatched(ids).logits
    model = tiny_model(family)
    trainer = AdaKTrainer(model, _config(tmp_path, warmup="k-warm", max_steps=0), token_rows())
    trainer.train()
    assert trainer.state.warmup_step == 0  # closed form: no cross-entropy steps
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_skip_warm_starts_exactly_at_calibrated_dynamic_skipping(family, tmp_path):
    """Skip-Warm = dynamic skipping (Lu et al.) with the calibrated per-layer betas, same weighting, same outputs;
    the mean count on the calibration tokens is the budget."""
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(5))
    model = tiny_model(family)
    config = _config(
        tmp_path,
        warmup="skip-warm",
        max_steps=0,
        target_experts=1.5,
        calibration_batches=2,
        budget_calibration=False,
    )
    trainer = AdaKTrainer(model, config, token_rows())
    trainer.train()
    assert trainer.state.warmup_mean_label == pytest.approx(1.5, abs=0.02)
    # the family's weighting over the kept experts (renormalize=True is refused where weights are per expert)
    family_renormalises = weights_depend_on_chosen_set(describe(model).spec)
    skipping = patch_model(tiny_model(family), DynamicSkipConfig(renormalize=family_renormalises))
    for layer in adak_layers(model):
        skip_layer = skipping.model.layers[layer].mlp.gate.routing
        skip_layer.set_beta(math.exp(trainer.state.skip_log_betas[str(layer)]))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, skipping(ids).logits, atol=1e-5, rtol=0)


# ---- advantages: the trainer's rollouts against independent forwards ------------------------------
def _forced(model, actions: dict[int, torch.Tensor]):
    """Route every Ada-K layer with the given per-token counts (the allocator's greedy choice is forced)."""
    for index, layer in adak_layers(model).items():
        k = actions[index]

        def fixed(features, layer=layer, k=k):
            logits = torch.full((features.shape[0], layer.k_max), -30.0)
            logits[torch.arange(features.shape[0]), k - 1] = 30.0
            return logits

        layer.allocator.forward = fixed


def _rewards(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_log_likelihood(logits, batch["labels"], batch["attention_mask"])[0].reshape(-1)


@pytest.mark.parametrize("baseline", ["topk", "counterfactual", "leave-one-out"])
def test_rollout_advantages_match_independent_forwards(baseline, tmp_path):
    """A_l is computed from forwards that replay the sampled counts (and, for the baselines, the model's own
    Top-K via original_routing, or Top-K in layer l only): sign, discount exponent and pairing all checked."""
    model = tiny_model("qwen2_moe", num_hidden_layers=3)
    samples = 2 if baseline == "leave-one-out" else 1
    config = _config(tmp_path, baseline=baseline, rollout_samples=samples, gamma=0.5, warmup="random")
    trainer = AdaKTrainer(model, config, token_rows())
    for layer in adak_layers(model).values():
        torch.nn.init.normal_(layer.allocator.weight, std=0.3)  # a spread of sampled k
    rows, batch = trainer.stream.batch(0, "cpu")
    experience, _ = rollout.collect(
        trainer.forward,
        trainer.layers,
        batch,
        rows,
        seed=0,
        key=(0, 0),
        samples=samples,
        baseline=baseline,
        gamma=0.5,
    )
    indices = list(trainer.layers)
    n = batch["input_ids"].numel()
    actions = [
        {i: experience.actions[p][g * n : (g + 1) * n] for p, i in enumerate(indices)} for g in range(samples)
    ]
    assert any((a < 2).any() for a in actions[0].values())  # some tokens really dropped an expert
    independent = copy.deepcopy(model)
    rewards = []
    for sample in actions:
        _forced(independent, sample)
        rewards.append(_rewards(independent, batch))
    mask = experience.mask[0][:n]
    for p, i in enumerate(indices):
        for g in range(samples):
            if baseline == "topk":
                with original_routing(independent):
                    expected = 0.5 ** (len(indices) - 1 - p) * (rewards[g] - _rewards(independent, batch))
            elif baseline == "leave-one-out":
                expected = 0.5 ** (len(indices) - 1 - p) * (rewards[g] - rewards[1 - g])
            else:
                _forced(independent, {**actions[g], i: torch.full_like(actions[g][i], 2)})  # layer i at top-2
                expected = rewards[g] - _rewards(independent, batch)
            got = experience.advantages[p][g * n : (g + 1) * n]
            torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=0)
            assert (got[~mask] == 0).all()


# ---- PPO update and learning -----------------------------------------------------------------------
def test_ppo_update_respects_the_lower_clip_bound():
    """Negative advantage and ratio < 1 - eps: PPO's clip removes the gradient; positive advantage keeps it."""
    torch.manual_seed(0)
    allocator = Allocator(4, 3)
    bank = update.AllocatorBank({0: type("L", (), {"allocator": allocator})()})
    states = torch.randn(2, 4)
    with torch.no_grad():
        logits = allocator(states)
    actions = torch.tensor([1, 1])
    new = action_log_probs(logits, actions)
    old = new + math.log(2.0)  # ratio pi_new / pi_old = 0.5 < 1 - eps
    for advantage, clipped in ((-1.0, True), (1.0, False)):
        experience = rollout.Experience(
            [states], [actions], [old], [torch.full((2,), advantage)], [torch.tensor([True, True])], tokens=2
        )
        loss, stats = update.ppo_loss(
            bank, experience, n_global=2, clip_epsilon=0.2, k_penalty=0.0, entropy_coef=0.0, device="cpu"
        )
        allocator.zero_grad()
        loss.backward()
        assert stats["clip_fraction"] == 1.0
        assert (allocator.weight.grad.abs().sum() == 0) == clipped


#: Each learning test runs on these seeds: the synthetic model's pre-training (initialisation and batch
#: order) and the Ada-K trainer (allocator initialisation, k sampling, data order). A single draw is not
#: evidence: on one pre-trained model whose second expert matters little, the expected k of
#: ``test_ppo_follows_the_reward`` fell for 1 of 8 trainer seeds (results in the closing note of issue 17).
LEARNING_SEEDS = (0, 1, 2)


@pytest.fixture(scope="module", params=LEARNING_SEEDS, ids=lambda seed: f"seed{seed}")
def synthetic_model(request):
    """A tiny Mixtral pre-trained briefly on the synthetic language (predictable vs. computed words),
    and the seed it was pre-trained with."""
    seed = request.param
    tokenizer = synthetic_tokenizer()
    data = pack_dataset(synthetic_corpus(300, 4, seed=0), tokenizer, 32)
    train, held_out = data.select(range(200)), data.select(range(200, len(data)))
    torch.manual_seed(seed)
    model = tiny_model(
        "mixtral",
        seed=seed,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rows = train[:]
    g = torch.Generator().manual_seed(seed)
    for _ in range(300):
        idx = torch.randint(0, len(train), (16,), generator=g)
        model(
            input_ids=rows["input_ids"][idx],
            attention_mask=rows["attention_mask"][idx],
            labels=rows["labels"][idx],
        ).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer, train, held_out, seed


def _mean_expected_k(trainer, held_out) -> float:
    batch = trainer.stream.batch(0, "cpu")[1] if held_out is None else next(iter([held_out[:16]]))
    with torch.no_grad(), recording(trainer.model) as layers:
        trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        values = [expected_k(layer.allocator(layer.last.states)).mean() for layer in layers.values()]
    return float(torch.stack(values).mean())


def test_one_ppo_update_moves_the_policy_towards_positive_advantages():
    """The trainer's update (loss, backward, AdamW step) raises pi(k) where A > 0 and lowers it where A < 0:
    fails for a flipped advantage sign or an inverted probability ratio pi_old / pi_new."""
    torch.manual_seed(0)
    allocator = Allocator(4, 3, bias=True)
    torch.nn.init.zeros_(allocator.weight)
    bank = update.AllocatorBank({0: type("L", (), {"allocator": allocator})()})
    states, actions = torch.randn(64, 4), torch.randint(1, 4, (64,))
    advantages = torch.where(actions == 2, 1.0, -1.0)
    with torch.no_grad():
        old = action_log_probs(allocator(states), actions)
    experience = rollout.Experience(
        [states], [actions], [old], [advantages], [torch.ones(64, dtype=torch.bool)], 64
    )
    optimizer = torch.optim.AdamW(bank.parameters(), lr=0.1, weight_decay=0.0)
    for _ in range(2):  # two PPO epochs: the second sees ratios != 1
        loss, _ = update.ppo_loss(
            bank, experience, n_global=64, clip_epsilon=0.2, k_penalty=0.0, entropy_coef=0.0, device="cpu"
        )
        loss.backward()
        update.optimizer_step(list(bank.parameters()), optimizer, None)
    with torch.no_grad():
        probs = allocator(states).softmax(-1).mean(0)
    assert probs[1] > 0.4 and probs[0] < 0.33 and probs[2] < 0.33  # from 1/3 each


def test_ppo_follows_the_reward(synthetic_model, tmp_path):
    """Without a penalty, PPO from a uniform policy over k in {1, 2} learns to keep the second expert (the
    model needs it): the expected k rises. A flipped advantage sign or an inverted ratio makes it fall.

    Measured over 8 seeds (pre-training and trainer): the rise was +0.12 to +0.39 (mean +0.26)."""
    model, _, train, held_out, seed = synthetic_model
    model = copy.deepcopy(model)
    config = _config(
        tmp_path,
        warmup="random",
        max_steps=8,
        batch_size=16,
        learning_rate=0.05,
        k_penalty=0.0,
        baseline="counterfactual",
        ppo_epochs=2,
        max_grad_norm=None,
        seed=seed,
    )
    trainer = AdaKTrainer(model, config, train)
    for layer in trainer.layers.values():
        for param in layer.allocator.parameters():
            torch.nn.init.zeros_(param)  # P(k) uniform
    before = _mean_expected_k(trainer, held_out)
    trainer.train()
    after = _mean_expected_k(trainer, held_out)
    assert before == pytest.approx(1.5) and after > before + 0.05


def _per_class(model, tokenizer, held_out) -> dict[str, dict[str, float]]:
    """Mean k (over layers) and NLL under Ada-K and Top-K per class of the *next* word."""
    rows = held_out[:]
    ids, mask = rows["input_ids"], rows["attention_mask"]
    with torch.no_grad(), recording(model) as layers:
        logits = model(input_ids=ids, attention_mask=mask).logits
        k = torch.stack([layer.last.activated.float() for layer in layers.values()]).mean(0).view(ids.shape)
    with torch.no_grad(), default_routing(model):
        topk_logits = model(input_ids=ids, attention_mask=mask).logits
    reward, valid = token_log_likelihood(logits, rows["labels"], mask)
    reward_topk, _ = token_log_likelihood(topk_logits, rows["labels"], mask)
    classes = [classify_words(tokenizer.convert_ids_to_tokens(row.tolist()))[1:] + ["other"] for row in ids]
    out = {}
    for name in ("predictable", "computed", "random"):
        sel = torch.tensor([[c == name for c in row] for row in classes]) & valid
        out[name] = {
            "k": k[sel].mean().item(),
            "nll": -reward[sel].mean().item(),
            "nll_topk": -reward_topk[sel].mean().item(),
        }
    out["all"] = {"nll": -reward[valid].mean().item(), "nll_topk": -reward_topk[valid].mean().item()}
    return out


def test_ppo_spends_experts_where_they_matter_at_a_budget(synthetic_model, tmp_path):
    """From K-Warm (exactly Top-K), PPO with target_experts = 1.4 of top-2 lands on the budget and costs
    less than half the likelihood that the same per-layer counts cost when dealt out at random.

    The budget holds on the calibration batches (within 1%); on held-out text the mean k differs by
    sampling (measured over 8 seeds: 1.375 to 1.452, so within 6%). Measured cost ratios: -0.12 to 0.19
    of random's; Ada-K's NLL at most 1.0031 x Top-K's."""
    model, tokenizer, train, held_out, seed = synthetic_model
    model = copy.deepcopy(model)
    config = _config(
        tmp_path,
        warmup="k-warm",
        max_steps=60,
        batch_size=16,
        learning_rate=1e-2,
        target_experts=1.4,
        k_penalty=0.0,
        eval_batches=None,
        seed=seed,
    )
    trainer = AdaKTrainer(model, config, train, held_out)
    output = trainer.train()
    budget = [entry for entry in trainer.state.log_history if entry.get("phase") == "budget"]
    assert budget[-1]["budget_greedy_k_mean"] == pytest.approx(1.4, rel=0.01)
    assert output.metrics["eval_activated_mean"] == pytest.approx(1.4, rel=0.06)
    rows = held_out[:]
    with torch.no_grad(), recording(model) as layers:
        model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"])
        counts = {i: layer.last.activated.clone() for i, layer in layers.items()}
    mask = rows["attention_mask"].reshape(-1).bool() & (rows["labels"].roll(-1, 1).reshape(-1) != -100)
    mask &= (
        torch.arange(rows["input_ids"].numel()) % rows["input_ids"].shape[1] != rows["input_ids"].shape[1] - 1
    )
    adak = -_rewards(model, rows)[mask].mean()
    with original_routing(model):
        topk = -_rewards(model, rows)[mask].mean()
    shuffled, g, costs = copy.deepcopy(model), torch.Generator().manual_seed(0), []
    for _ in range(3):  # the same number of experts per layer, given to random tokens
        _forced(shuffled, {i: c[torch.randperm(len(c), generator=g)] for i, c in counts.items()})
        costs.append(float(-_rewards(shuffled, rows)[mask].mean() - topk))
    assert float(adak - topk) < 0.5 * sum(costs) / len(costs)
    assert float(adak) <= 1.01 * float(topk)


# ---- seeds and budgets ---------------------------------------------------------------------------
def test_one_seed_gives_identical_allocators(tmp_path):
    """``seed`` seeds initialisation, k sampling and data order (whatever the global RNG did before)."""

    def run(seed, name, noise):
        torch.manual_seed(noise)  # a different global RNG state before patching
        model = tiny_model("qwen2_moe", seed=0)
        torch.rand(noise + 1)
        config = _config(tmp_path, output_dir=str(tmp_path / name), warmup="random", seed=seed, max_steps=4)
        AdaKTrainer(model, config, token_rows()).train()
        return allocator_state(model)

    first, second, other = run(3, "a", 0), run(3, "b", 7), run(4, "c", 0)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_greedy_k_never_exceeds_top_k_unless_asked_and_evaluation_warns(tmp_path):
    model = tiny_model("mixtral")
    trainer = AdaKTrainer(
        model, _config(tmp_path, warmup="random", max_steps=0), token_rows(), token_rows(8, seed=1)
    )
    assert {layer.k_max for layer in trainer.layers.values()} == {2}
    for layer in trainer.layers.values():
        torch.nn.init.normal_(layer.allocator.weight, std=1.0)
    assert trainer.evaluate()["eval_activated_mean"] <= 2.0
    wide = tiny_model("mixtral")
    trainer = AdaKTrainer(
        wide,
        _config(tmp_path, warmup="random", max_steps=0),
        token_rows(),
        token_rows(8, seed=1),
        adak_config=AdaKConfig(k_max=6),
    )
    for layer in trainer.layers.values():
        layer.allocator.bias.data[:] = torch.tensor([0.0, 0, 0, 0, 0, 30.0])  # always 6 experts
    with pytest.warns(UserWarning, match="more than the model's top-k"):
        assert trainer.evaluate()["eval_activated_mean"] == pytest.approx(6.0)


def test_dual_ascent_moves_lambda_towards_the_budget(tmp_path):
    assert update.dual_ascent(0.01, 2.0, 1.0, 0.1) == pytest.approx(0.11)  # over budget: lambda rises
    assert update.dual_ascent(0.01, 0.5, 1.0, 0.1) == pytest.approx(-0.04)  # under budget: falls, below 0
    model = tiny_model("mixtral")
    config = _config(
        tmp_path, warmup="k-warm", target_experts=1.2, k_penalty=0.0, k_penalty_learning_rate=0.1
    )
    trainer = AdaKTrainer(model, config, token_rows())
    trainer.train()
    ppo = [e for e in trainer.state.log_history if e.get("phase") == "ppo"]
    assert ppo[0]["k_penalty"] == 0.0 and trainer.state.k_penalty > 0.1  # K-Warm starts at 2 > 1.2
    with pytest.raises(ValueError, match="cannot be reached"):
        AdaKTrainer(tiny_model("mixtral"), _config(tmp_path, target_experts=2.5), token_rows())


# ---- logs, summary, adapters ---------------------------------------------------------------------
def test_logs_checkpoints_summary_and_adapter(tmp_path, capsys):
    from hf_moe_routing.hub import load_routing_adapter

    model = tiny_model("qwen3_moe")
    hook = lambda t: {"hook_step": t.state.global_step}  # noqa: E731
    config = _config(tmp_path, warmup="p-warm", save_steps=2, eval_steps=4, log_level="info", baseline="topk")
    output = AdaKTrainer(model, config, token_rows(), token_rows(8, seed=1), eval_fn=hook).train()
    printed = capsys.readouterr().out
    assert (
        "Ada-K training finished: 2 warm-start + 3 PPO steps" in printed and "held-out perplexity" in printed
    )
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert lines == output.log_history
    assert lines[0]["warmup_p"] > 0 and abs(lines[0]["warmup_mean_label"] - 2) < 0.5
    ppo = [e for e in lines if e.get("phase") == "ppo"]
    assert len(ppo) == 3
    for key in (
        "reward",
        "reward_topk",
        "advantage_mean",
        "advantage_std",
        "clip_fraction",
        "approx_kl",
        "policy_loss",
        "greedy_k_mean",
        "k_penalty",
    ):
        assert isinstance(ppo[-1][key], float), key
    assert len(ppo[-1]["signal_to_noise_per_layer"]) == len(ppo[-1]["activated_per_layer"]) == 2
    assert [e["hook_step"] for e in lines if "hook_step" in e] == [4, 5]  # every 4 steps and at the end
    assert output.metrics["eval_ppl"] > 1 and output.metrics["eval_tokens"] > 0
    # checkpoints every 2 steps, the last two kept (save_total_limit=2)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert latest_checkpoint(run).name == "checkpoint-5"
    assert {p.name for p in (run / "checkpoint-5").iterdir()} == {
        "routing_config.json",
        "routing_adapter.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
        "rng_state_0.safetensors",
    }
    # the adapter is saved at the end, into output_dir (like Trainer.save_model), with the warm start's p
    assert output.adapter_dir == str(run)
    fresh = load_routing_adapter(tiny_model("qwen3_moe"), run)
    assert all(torch.equal(allocator_state(fresh)[k], v) for k, v in allocator_state(model).items())
    card = json.loads((run / "routing_config.json").read_text())
    assert card["routing"]["routing_type"] == "adak" and card["routing"]["allocator_input"] == "hidden+router"
    assert card["training"]["k_penalty"] == 0.05 and card["training"]["warmup_p"] == lines[0]["warmup_p"]
    assert card["results"]["eval_ppl"] == output.metrics["eval_ppl"]
    # a checkpoint is itself a loadable routing adapter (one key format)
    load_routing_adapter(tiny_model("qwen3_moe"), run / "checkpoint-5")


def test_quiet_runs_print_nothing(tmp_path, capsys):
    AdaKTrainer(tiny_model("mixtral"), _config(tmp_path, max_steps=1), token_rows()).train()
    assert capsys.readouterr().out == ""


def test_text_datasets_are_packed_with_the_tokenizer(tmp_path):
    import datasets

    tokenizer = synthetic_tokenizer()
    model = tiny_model("mixtral", vocab_size=len(tokenizer))
    texts = datasets.Dataset.from_dict({"text": synthetic_corpus(20, 3, seed=0)})
    trainer = AdaKTrainer(model, _config(tmp_path, max_steps=1), texts, tokenizer=tokenizer, seq_len=16)
    assert len(trainer.train_dataset[0]["input_ids"]) == 16
    trainer.train()


# ---- configuration and bad input -----------------------------------------------------------------
def test_config_is_strict_json_with_help_for_every_field():
    import dataclasses

    config = AdaKTrainingConfig(report_to="tensorboard", warmup_p=0.3, target_experts=1.4)
    data = json.loads(config.to_json_string())
    assert data["report_to"] == ["tensorboard"] and AdaKTrainingConfig.from_dict(data) == config
    assert all(f.metadata.get("help") for f in dataclasses.fields(AdaKTrainingConfig))
    bad = [
        ({"batch_size": 2.5}, TypeError),
        ({"progress_bar": "false"}, TypeError),
        ({"k_penalty": math.nan}, ValueError),
        ({"clip_epsilon": math.inf}, ValueError),
        ({"learning_rate": 0.0}, ValueError),
        ({"gamma": 1.5}, ValueError),
        ({"warmup": "x-warm"}, ValueError),
        ({"baseline": "mean"}, ValueError),
        ({"target_experts": -1.0}, ValueError),
        ({"baseline": "leave-one-out"}, ValueError),
        ({"max_grad_norm": 0.0}, ValueError),
        ({"lr": 1.0}, ValueError),
    ]
    for settings, error in bad:
        with pytest.raises(error):
            AdaKTrainingConfig.from_dict({**data, **settings})


def test_bad_input_gives_clear_errors(tmp_path):
    import datasets

    with pytest.raises(ValueError, match="empty"):
        AdaKTrainer(tiny_model("mixtral"), _config(tmp_path), [])
    with pytest.raises(ValueError, match="tokenizer"):
        AdaKTrainer(tiny_model("mixtral"), _config(tmp_path), datasets.Dataset.from_dict({"text": ["a b c"]}))
    with pytest.raises(ValueError, match="context"):  # tiny models have 128 positions
        AdaKTrainer(tiny_model("mixtral"), _config(tmp_path), token_rows(8, length=200))
    with pytest.raises(ValueError, match="batch_size"):
        AdaKTrainer(tiny_model("mixtral"), _config(tmp_path, batch_size=16), token_rows(8))
    with pytest.raises(ValueError, match="already patched"):
        model = patch_model(tiny_model("mixtral"), AdaKConfig(k_max=4))
        AdaKTrainer(model, _config(tmp_path), token_rows(), adak_config=AdaKConfig(k_max=3))


def test_deepspeed_is_refused_with_the_reason():
    from accelerate.utils import DistributedType

    from hf_moe_routing.training.adak.distributed import fsdp_plugin

    fake = type("Acc", (), {"num_processes": 1, "distributed_type": DistributedType.DEEPSPEED})()
    with pytest.raises(ValueError, match="ignored_params"):
        fsdp_plugin(fake, requested=False)


# The train / warmup commands are tested in tests/test_cli_train.py.


def test_trained_allocators_from_an_adapter_are_the_starting_point(tmp_path):
    from hf_moe_routing.hub import load_routing_adapter, save_routing_adapter

    model = patch_model(tiny_model("mixtral"), AdaKConfig())
    for layer in adak_layers(model).values():
        torch.nn.init.normal_(layer.allocator.weight, std=0.3)
    save_routing_adapter(model, tmp_path / "adapter")
    loaded = load_routing_adapter(tiny_model("mixtral"), tmp_path / "adapter")
    trainer = AdaKTrainer(
        loaded, _config(tmp_path, max_steps=0), token_rows()
    )  # default warm start: skip-warm
    trainer.train()
    assert trainer.warmup_total() == 0 and not trainer.state.exact_start
    assert all(torch.equal(allocator_state(loaded)[k], v) for k, v in allocator_state(model).items())
