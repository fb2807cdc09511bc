"""Ada-K training checkpoints: Ctrl-C and resume, atomic writes, verification and fallback, full disks."""

import json

import pytest
import torch
from adak_helpers import adak_config, token_rows

from hf_moe_routing import patch_model
from hf_moe_routing.methods.adak import AdaKConfig
from hf_moe_routing.testing import tiny_model
from hf_moe_routing.training.adak import (
    AdaKTrainer,
    AdaKTrainingConfig,
    CheckpointError,
    allocator_state,
    latest_checkpoint,
    load_allocator_state,
)
from hf_moe_routing.training.adak import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, **kw) -> AdaKTrainingConfig:
    base = dict(
        warmup="p-warm",
        warmup_steps=2,
        max_steps=4,
        batch_size=4,
        calibration_batches=1,
        logging_steps=1,
        learning_rate=1e-2,
        k_penalty=0.05,
        save_steps=1,
        save_total_limit=None,
    )
    return adak_config(tmp_path, **{**base, **kw})


def _run(tmp_path, name, interrupt_at=None, resume=False, **kw):
    model = tiny_model("qwen2_moe", seed=0)
    config = _config(tmp_path, output_dir=str(tmp_path / name), save_steps=0, **kw)
    trainer = AdaKTrainer(model, config, token_rows(), adak_config=AdaKConfig())
    if interrupt_at is not None:  # Ctrl-C in the middle of PPO step `interrupt_at`, after its first update
        original, ppo_updates = trainer.step_optimizer, []

        def step():
            norm = original()
            ppo_updates.extend([1] if trainer._phase == "ppo" else [])
            if len(ppo_updates) == config.ppo_epochs * interrupt_at + 1:
                raise KeyboardInterrupt
            return norm

        trainer.step_optimizer = step
    trainer.train(resume_from_checkpoint=resume or None)
    return model, trainer


@pytest.mark.parametrize("target", [None, 1.5])
def test_ctrl_c_saves_a_checkpoint_and_resume_continues_identically(tmp_path, capsys, target):
    straight, _ = _run(tmp_path, "straight", target_experts=target)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "interrupted", interrupt_at=2, target_experts=target, log_level="info")
    message = capsys.readouterr().out
    assert "resume_from_checkpoint=True" in message and "--resume" in message  # Python and CLI users
    saved = latest_checkpoint(tmp_path / "interrupted")
    assert saved.name == "checkpoint-4"  # 2 warm-up steps + 2 PPO steps
    info = json.loads((saved / "trainer_state.json").read_text())
    assert info["phase"] == "ppo" and info["trainer_state"]["ppo_step"] == 2
    resumed, trainer = _run(tmp_path, "interrupted", resume=True, target_experts=target)
    assert trainer.state.ppo_step == 4
    for key, value in allocator_state(straight).items():
        assert torch.equal(allocator_state(resumed)[key], value), key


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    model = tiny_model("mixtral")
    AdaKTrainer(model, _config(tmp_path, max_steps=1), token_rows()).train()
    other = AdaKTrainer(tiny_model("mixtral", hidden_size=32), _config(tmp_path, max_steps=1), token_rows())
    with pytest.raises(ValueError, match="another model"):
        other.train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="layers"):  # a model with 3 MoE layers
        load_allocator_state(
            patch_model(tiny_model("mixtral", num_hidden_layers=3), AdaKConfig()), allocator_state(model)
        )
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        AdaKTrainer(tiny_model("mixtral"), _config(tmp_path / "empty"), token_rows()).train(
            resume_from_checkpoint=True
        )


def _trained(tmp_path, **kw):
    trainer = AdaKTrainer(tiny_model("mixtral"), _config(tmp_path, **kw), token_rows())
    trainer.train()
    return trainer, tmp_path / "run"


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda f: (f / "trainer_state.json").write_text('{"phase": "ppo", "trainer_st'), "not valid JSON"),
        (lambda f: (f / "rng_state_0.safetensors").unlink(), "rng_state_0.safetensors is missing"),
        (lambda f: (f / "routing_adapter.safetensors").write_bytes(b"\0" * 64), "does not match the hash"),
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, reason):
    _, run = _trained(tmp_path)
    newest = run / "checkpoint-6"
    damage(newest)
    with pytest.warns(UserWarning, match=reason):
        assert latest_checkpoint(run).name == "checkpoint-5"
    with pytest.raises(CheckpointError, match=reason):  # an explicit folder is never silently replaced
        AdaKTrainer(tiny_model("mixtral"), _config(tmp_path), token_rows()).load_checkpoint(newest)
    fresh = AdaKTrainer(tiny_model("mixtral"), _config(tmp_path), token_rows())
    with pytest.warns(UserWarning, match="checkpoint-6"):
        fresh.train(resume_from_checkpoint=True)
    assert fresh.state.global_step == 6  # resumed at 5, ran the last step again
    ckpt.verify(newest, 0)  # and wrote a complete checkpoint-6 in place of the damaged one


def test_a_checkpoint_without_rng_state_is_refused(tmp_path):
    _, run = _trained(tmp_path)
    folder = run / "checkpoint-6"
    info = json.loads((folder / "trainer_state.json").read_text())
    del info["files"]["rng_state_0.safetensors"]
    (folder / "trainer_state.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="no RNG state"):
        AdaKTrainer(tiny_model("mixtral"), _config(tmp_path), token_rows()).load_checkpoint(folder)


def test_saves_are_atomic_and_stale_temporary_folders_are_removed(tmp_path):
    trainer, run = _trained(tmp_path, max_steps=1)
    stale = run / ".tmp-checkpoint-99"  # left by a process killed during a save
    stale.mkdir()
    (stale / "optimizer.safetensors").write_bytes(b"partial")
    trainer.save_checkpoint()
    assert not stale.exists() and not list(run.glob(".tmp-*"))
    ckpt.verify(run / "checkpoint-3", 0)


def test_a_full_disk_raises_an_oserror_that_says_so_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    import errno
    import pathlib

    trainer, run = _trained(tmp_path, max_steps=1)
    before = {p.name for p in run.glob("checkpoint-*")}
    real_open = open

    def full_disk(path, mode="r", *args, **kw):  # every checkpoint file lands on /dev/full
        if "w" in mode and ".tmp-" in str(path):
            return real_open("/dev/full", mode, *args, **kw)
        return real_open(path, mode, *args, **kw)

    monkeypatch.setattr("builtins.open", full_disk)
    trainer.state.ppo_step += 5
    with pytest.raises(OSError, match="Disk full") as raised:
        trainer.save_checkpoint()
    assert raised.value.errno == errno.ENOSPC and ".tmp-checkpoint-" in str(raised.value)
    monkeypatch.setattr("builtins.open", real_open)
    assert {p.name for p in run.glob("checkpoint-*")} == before and not list(run.glob(".tmp-*"))
    for name in before:
        ckpt.verify(pathlib.Path(run / name), 0)


def test_optimizer_state_is_saved_by_parameter_name_in_safetensors(tmp_path):
    from safetensors.torch import load_file

    trainer, run = _trained(tmp_path, max_steps=1)
    tensors = load_file(run / "checkpoint-3" / "optimizer.safetensors")
    assert any(k.startswith("state.allocators.0.weight.exp_avg") for k in tensors)
    info = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert info["optimizer_param_groups"]["param_groups.allocators.0.weight.lr"] == pytest.approx(1e-2)
    fresh = AdaKTrainer(tiny_model("mixtral"), _config(tmp_path), token_rows())
    fresh.load_checkpoint(run / "checkpoint-3")
    for a, b in zip(fresh.optimizer.state.values(), trainer.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_every_save_steps_by_default():
    assert AdaKTrainingConfig().save_steps == 50 and AdaKTrainingConfig().save_total_limit == 2
