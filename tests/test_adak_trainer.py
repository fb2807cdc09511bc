"""AdaKTrainer: warm start + PPO on a frozen model, learning, checkpoints/resume, logs, CLI, bad input."""

import copy
import json

import pytest
import torch

from hf_moe_routing import patch_model
from hf_moe_routing.data import pack_dataset, synthetic_corpus, synthetic_tokenizer
from hf_moe_routing.data.synthetic import classify_words
from hf_moe_routing.methods.adak import AdaKConfig, adak_layers, default_routing, recording
from hf_moe_routing.methods.adak.ppo import token_log_likelihood
from hf_moe_routing.testing import tiny_model
from hf_moe_routing.training.adak_trainer import (
    AdaKTrainer,
    AdaKTrainingConfig,
    allocator_state,
    latest_checkpoint,
    load_allocator_state,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models train faster on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(n: int = 24, length: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 128, (length,), generator=g)} for _ in range(n)]


def _config(tmp_path, **kw) -> AdaKTrainingConfig:
    base = dict(
        output_dir=str(tmp_path / "run"),
        warmup_steps=2,
        max_steps=3,
        batch_size=4,
        calibration_batches=1,
        logging_steps=1,
        progress_bar=False,
        learning_rate=1e-2,
        k_penalty=0.05,
    )
    return AdaKTrainingConfig(**{**base, **kw})


def _allocators(model) -> dict[str, torch.Tensor]:
    return allocator_state(model)


# ---- the frozen base model -----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_training_changes_only_allocators(family, tmp_path):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = AdaKTrainer(model, _config(tmp_path), _data(), _data(8, seed=1), adak_config=AdaKConfig())
    initial = _allocators(model)
    trainer.train()
    after = model.state_dict()
    base_keys = [k for k in after if ".routing." not in k]
    assert sorted(base_keys) == sorted(before)
    for key in base_keys:
        assert torch.equal(after[key], before[key]), key
    assert all(
        not p.requires_grad and p.grad is None for n, p in model.named_parameters() if ".routing." not in n
    )
    trained = _allocators(model)
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)


def test_a_base_parameter_with_a_gradient_is_refused(tmp_path):
    model = tiny_model("qwen2_moe")
    trainer = AdaKTrainer(model, _config(tmp_path, warmup_steps=1, max_steps=0), _data())
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
    trainer = AdaKTrainer(model, _config(tmp_path), _data(), _data(8, seed=1))
    initial = _allocators(model)
    trainer.train()
    assert all(layer.allocator.weight.device.type == "cpu" for layer in adak_layers(model).values())
    assert any(not torch.equal(_allocators(model)[k], v) for k, v in initial.items())
    assert (
        trainer.evaluate()["eval_activated_per_layer"][1] > 0
    )  # the offloaded layer routes with its allocator


# ---- logs, evaluation, adapters ------------------------------------------------------------------
def test_logs_checkpoints_and_adapter(tmp_path):
    from hf_moe_routing.hub import load_routing_adapter

    model = tiny_model("qwen3_moe")
    hook = lambda t: {"hook_step": t.state.global_step}  # noqa: E731
    trainer = AdaKTrainer(
        model, _config(tmp_path, save_steps=2, eval_steps=4), _data(), _data(8, seed=1), eval_fn=hook
    )
    state = trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert lines == state.log_history
    assert lines[0]["warmup_p"] > 0 and abs(lines[0]["warmup_mean_label"] - 2) < 0.5
    ppo = [e for e in lines if e.get("phase") == "ppo"]
    assert len(ppo) == 3
    for key in (
        "reward",
        "reward_topk",
        "advantage",
        "clip_fraction",
        "loss",
        "policy_loss",
        "activated_mean",
    ):
        assert isinstance(ppo[-1][key], float)
    assert len(ppo[-1]["activated_per_layer"]) == 2
    assert [e["hook_step"] for e in lines if "hook_step" in e] == [4, 5]  # every 4 steps and at the end
    evaluation = [e for e in lines if "eval_ppl" in e][-1]
    assert evaluation["eval_ppl"] > 1 and evaluation["eval_ppl_topk"] > 1 and evaluation["eval_tokens"] > 0
    # checkpoints every 2 steps, the last two kept (save_total_limit=2)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-5"
    files = {p.name for p in (tmp_path / "run" / "checkpoint-5").iterdir()}
    assert files == {
        "allocators.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
        "rng_state_0.safetensors",
    }
    trainer.save_adapter(tmp_path / "adapter")
    fresh = load_routing_adapter(tiny_model("qwen3_moe"), tmp_path / "adapter")
    for key, value in _allocators(model).items():
        assert torch.equal(_allocators(fresh)[key], value)
    config = json.loads((tmp_path / "adapter" / "routing_config.json").read_text())
    assert config["routing"]["routing_type"] == "adak" and config["training"]["k_penalty"] == 0.05


def test_text_datasets_are_packed_with_the_tokenizer(tmp_path):
    tokenizer = synthetic_tokenizer()
    model = tiny_model("mixtral", vocab_size=len(tokenizer))
    import datasets

    texts = datasets.Dataset.from_dict({"text": synthetic_corpus(20, 3, seed=0)})
    trainer = AdaKTrainer(model, _config(tmp_path, max_steps=1), texts, tokenizer=tokenizer, seq_len=16)
    assert len(trainer.train_dataset[0]["input_ids"]) == 16
    trainer.train()


# ---- resume --------------------------------------------------------------------------------------
def _run(tmp_path, name, interrupt_at=None, resume=False):
    model = tiny_model("qwen2_moe", seed=0)
    torch.manual_seed(123)
    config = _config(tmp_path, output_dir=str(tmp_path / name), max_steps=4, save_steps=0)
    trainer = AdaKTrainer(model, config, _data(), adak_config=AdaKConfig())
    if interrupt_at is not None:  # Ctrl-C in the middle of PPO step `interrupt_at`, after its first update
        original, ppo_updates = trainer._optimizer_step, []

        def step():
            norm = original()
            ppo_updates.extend([1] if trainer._phase == "ppo" else [])
            if len(ppo_updates) == config.ppo_epochs * interrupt_at + 1:
                raise KeyboardInterrupt
            return norm

        trainer._optimizer_step = step
    trainer.train(resume_from_checkpoint=resume or None)
    return model, trainer


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_identically(tmp_path):
    straight, _ = _run(tmp_path, "straight")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "interrupted", interrupt_at=2)
    saved = latest_checkpoint(tmp_path / "interrupted")
    assert saved.name == "checkpoint-4"  # 2 warm-up steps + 2 PPO steps
    info = json.loads((saved / "trainer_state.json").read_text())
    assert info["phase"] == "ppo" and info["trainer_state"]["ppo_step"] == 2
    resumed, trainer = _run(tmp_path, "interrupted", resume=True)
    assert trainer.state.ppo_step == 4
    for key, value in _allocators(straight).items():
        assert torch.equal(_allocators(resumed)[key], value), key


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    model = tiny_model("mixtral")
    trainer = AdaKTrainer(model, _config(tmp_path, max_steps=1), _data())
    trainer.train()
    other = AdaKTrainer(tiny_model("mixtral", hidden_size=32), _config(tmp_path, max_steps=1), _data())
    with pytest.raises(ValueError, match="another model"):
        other.train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="layers"):  # a model with 3 MoE layers
        load_allocator_state(
            patch_model(tiny_model("mixtral", num_hidden_layers=3), AdaKConfig()), allocator_state(model)
        )
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        AdaKTrainer(tiny_model("mixtral"), _config(tmp_path / "empty"), _data()).train(
            resume_from_checkpoint=True
        )


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_input_gives_clear_errors(tmp_path):
    import datasets

    with pytest.raises(ValueError, match="empty"):
        AdaKTrainer(tiny_model("mixtral"), _config(tmp_path), [])
    with pytest.raises(ValueError, match="tokenizer"):
        AdaKTrainer(tiny_model("mixtral"), _config(tmp_path), datasets.Dataset.from_dict({"text": ["a b c"]}))
    with pytest.raises(ValueError, match="context"):  # tiny models have 128 positions
        AdaKTrainer(tiny_model("mixtral"), _config(tmp_path), _data(8, length=200))
    with pytest.raises(ValueError, match="batch_size"):
        AdaKTrainer(tiny_model("mixtral"), _config(tmp_path, batch_size=16), _data(8))
    with pytest.raises(ValueError, match="warmup"):
        AdaKTrainingConfig(warmup="x-warm")
    with pytest.raises(ValueError, match="gamma"):
        AdaKTrainingConfig(gamma=1.5)
    with pytest.raises(ValueError, match="already patched"):
        model = patch_model(tiny_model("mixtral"), AdaKConfig(k_max=4))
        AdaKTrainer(model, _config(tmp_path), _data(), adak_config=AdaKConfig(k_max=3))


def test_config_is_json_serialisable():
    config = AdaKTrainingConfig(report_to="tensorboard", warmup_p=0.3)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["report_to"] == ["tensorboard"]
    assert AdaKTrainingConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="Unknown"):
        AdaKTrainingConfig.from_dict({"lr": 1.0})


# ---- learning ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_model():
    """A tiny Mixtral pre-trained briefly on the synthetic language (predictable vs. computed words)."""
    tokenizer = synthetic_tokenizer()
    data = pack_dataset(synthetic_corpus(300, 4, seed=0), tokenizer, 32)
    train, held_out = data.select(range(200)), data.select(range(200, len(data)))
    torch.manual_seed(0)
    model = tiny_model(
        "mixtral",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rows = train[:]
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(train), (16,), generator=g)
        model(
            input_ids=rows["input_ids"][idx],
            attention_mask=rows["attention_mask"][idx],
            labels=rows["labels"][idx],
        ).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer, train, held_out


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


def test_k_warm_teaches_the_default_k(synthetic_model, tmp_path):
    model, _, train, held_out = synthetic_model
    model = copy.deepcopy(model)
    config = AdaKTrainingConfig(
        output_dir=str(tmp_path),
        warmup="k-warm",
        warmup_steps=50,
        warmup_learning_rate=0.05,
        max_steps=0,
        batch_size=16,
        logging_steps=0,
        progress_bar=False,
    )
    trainer = AdaKTrainer(model, config, train, adak_config=AdaKConfig(k_max=8))  # greedy k up to 8
    before = trainer.evaluate(held_out)["eval_activated_mean"]
    trainer.train()
    after = trainer.evaluate(held_out)["eval_activated_mean"]
    # a bias-free linear allocator cannot give one class to every hidden state, but it gets close
    assert abs(after - 2.0) < 0.4 and abs(after - 2.0) < abs(before - 2.0) - 1.0


def test_ppo_lowers_k_on_predictable_tokens_and_keeps_likelihood(synthetic_model, tmp_path):
    model, tokenizer, train, held_out = synthetic_model
    model = copy.deepcopy(model)
    config = AdaKTrainingConfig(
        output_dir=str(tmp_path / "adak"),
        warmup_steps=30,
        max_steps=0,
        batch_size=16,
        learning_rate=5e-3,
        k_penalty=0.02,
        logging_steps=0,
        progress_bar=False,
    )
    trainer = AdaKTrainer(model, config, train, adak_config=AdaKConfig(k_max=8))  # greedy k up to 8
    trainer.train()  # P-Warm only
    warm = _per_class(model, tokenizer, held_out)
    trainer.config.max_steps = 100
    trainer.train()  # then PPO
    trained = _per_class(model, tokenizer, held_out)
    predictable = trained["predictable"]
    # PPO removes at least 0.5 of an expert per layer on trivially predictable words ...
    assert predictable["k"] <= warm["predictable"]["k"] - 0.5
    # ... while their log-likelihood stays within 0.02 nats of the model's own Top-K
    assert predictable["nll"] <= predictable["nll_topk"] + 0.02
    # and the held-out NLL over all tokens stays within 1% of Top-K
    assert trained["all"]["nll"] <= 1.01 * trained["all"]["nll_topk"]


# The train / warmup commands are tested in tests/test_cli_train.py.
