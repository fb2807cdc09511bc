"""Saves are atomic: a routing adapter or a training checkpoint, looked at between any two of its file
writes or after a crash at any one of them, is the previous save or the new one, never a mix.

Every file write of a save is intercepted (the write seams ``adapter_io.write_weights`` /
``write_json`` / the model card's ``save``, and ``checkpoint.write_file``): before each write a reader
loads what is on disk, and in a second pass the save is crashed at that write. A save that writes in
place (instead of into a temporary folder swapped in with a rename) fails at the second write. Seconds.
"""

import pytest
import torch
from adak_helpers import adak_config, token_rows
from save_race import race_saves

from hf_moe_routing import patch_model, save_routing_adapter
from hf_moe_routing.hub import adapter_io
from hf_moe_routing.patching import routing_layers
from hf_moe_routing.testing import OffsetConfig, tiny_model
from hf_moe_routing.training.adak import AdaKTrainer, allocator_state
from hf_moe_routing.training.adak import checkpoint as ckpt
from hf_moe_routing.training.adak.checkpoint import load_allocator_state


class Crash(OSError):
    """The injected failure (a full disk, a killed process)."""


def _intercept(monkeypatch, owner, name, before_write):
    """Call ``before_write()`` before every call of ``owner.name``."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        before_write()
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


# ---- routing adapters -----------------------------------------------------------------------------
def _offset_model(value: float):
    model = patch_model(tiny_model("mixtral"), OffsetConfig())
    for layer in routing_layers(model).values():
        layer.offset.data.fill_(value)
        layer.scale.data.fill_(value)
    return model


def _adapter_value(folder, card: bool = True) -> float:
    """The one value of the save on disk (config and every tensor must agree)."""
    config, weights = adapter_io.read_adapter(folder)
    stored = {float(t.flatten()[0]) for layer in weights.values() for t in layer.values()}
    assert stored == {config["training"]["value"]}, f"a mix of two saves: {stored} vs {config['training']}"
    if card:  # (read separately, after the swap a racing reader may see the next save's card)
        text = (folder / adapter_io.CARD_NAME).read_text()
        assert config["training"]["tag"] in text, "the model card belongs to another save"
    return config["training"]["value"]


def _info(value: float) -> dict:
    return {"value": value, "tag": f"save-number-{int(value)}"}


def _adapter_writes(monkeypatch, before_write):
    _intercept(monkeypatch, adapter_io, "write_weights", before_write)
    _intercept(monkeypatch, adapter_io, "write_json", before_write)
    build = adapter_io.build_model_card

    def build_card(*args, **kwargs):
        card = build(*args, **kwargs)
        _intercept(monkeypatch, card, "save", before_write)
        return card

    monkeypatch.setattr(adapter_io, "build_model_card", build_card)


def test_an_adapter_save_read_before_every_write_is_the_old_one(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    save_routing_adapter(_offset_model(1.0), folder, training_info=_info(1.0))
    seen = []
    _adapter_writes(monkeypatch, lambda: seen.append(_adapter_value(folder)))
    save_routing_adapter(_offset_model(2.0), folder, training_info=_info(2.0))
    assert seen == [1.0, 1.0, 1.0]  # weights, config, card: the old save each time
    assert _adapter_value(folder) == 2.0


@pytest.mark.parametrize("crash_at", [0, 1, 2], ids=["weights", "config", "card"])
def test_an_adapter_save_that_crashes_at_any_write_leaves_the_old_one(tmp_path, monkeypatch, crash_at):
    folder = tmp_path / "adapter"
    save_routing_adapter(_offset_model(1.0), folder, training_info=_info(1.0))
    calls = []

    def crash():
        calls.append(len(calls))
        if len(calls) - 1 == crash_at:
            raise Crash("injected crash")

    with monkeypatch.context() as patch:
        _adapter_writes(patch, crash)
        with pytest.raises(Crash):
            save_routing_adapter(_offset_model(2.0), folder, training_info=_info(2.0))
    assert _adapter_value(folder) == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left


def test_a_reader_racing_a_writer_sees_whole_saves_only(tmp_path):
    """A real race (a writer thread swapping two saves): every read is one save; both are seen."""
    folder = tmp_path / "adapter"
    models = {value: _offset_model(value) for value in (1.0, 2.0)}

    def save(value: float) -> None:
        save_routing_adapter(models[value], folder, training_info=_info(value))

    seen, reads = race_saves(save, lambda: _adapter_value(folder, card=False), min_reads=100)
    assert seen == {1.0, 2.0}, f"the reader saw only {seen} in {reads} reads"


# ---- training checkpoints -------------------------------------------------------------------------
def _trained(tmp_path) -> AdaKTrainer:
    config = adak_config(tmp_path, warmup="random", warmup_steps=1, max_steps=2, batch_size=4)
    trainer = AdaKTrainer(tiny_model("mixtral"), config, token_rows(16))
    trainer.train()
    return trainer


def _visible_checkpoints(output_dir) -> dict[str, dict[str, torch.Tensor]]:
    """Every checkpoint folder a resume would consider: each must verify; name -> allocator weights."""
    out = {}
    for folder in ckpt.checkpoints(output_dir):
        ckpt.verify(folder, 0)  # CheckpointError for a partial or mixed folder
        out[folder.name] = ckpt.read_tensors(folder, ckpt.ALLOCATORS_NAME)[0]
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("step", ["next", "same"], ids=["new-step", "same-step-again"])
def test_a_checkpoint_read_before_every_write_and_after_a_crash_is_the_old_or_the_new(
    tmp_path, monkeypatch, step
):
    trainer = _trained(tmp_path)
    output = trainer.config.output_dir
    old = _visible_checkpoints(output)
    assert list(old) == ["checkpoint-2"]
    old_state = {k: v.clone() for k, v in allocator_state(trainer.model).items()}
    new_state = {k: v + 1.0 for k, v in old_state.items()}
    if step == "next":
        trainer.state.ppo_step += 1
    name = f"checkpoint-{trainer.state.global_step}"
    assert name == ("checkpoint-3" if step == "next" else "checkpoint-2")

    def reset_and_load_new():
        if step == "next":
            ckpt.shutil.rmtree(f"{output}/checkpoint-3", ignore_errors=True)
        else:  # checkpoint-2 holds the old weights again
            load_allocator_state(trainer.model, old_state)
            trainer.save_checkpoint()
        assert _same(_visible_checkpoints(output)["checkpoint-2"], old["checkpoint-2"])
        load_allocator_state(trainer.model, new_state)

    writes = []

    def check():
        visible = _visible_checkpoints(output)
        assert _same(visible["checkpoint-2"], old["checkpoint-2"]), "the old checkpoint changed mid-save"
        assert "checkpoint-3" not in visible, "a partial checkpoint is visible"
        writes.append(None)

    reset_and_load_new()
    with monkeypatch.context() as patch:
        _intercept(patch, ckpt, "write_file", check)
        trainer.save_checkpoint()
    assert len(writes) >= 5  # rng, config, weights, optimiser, state
    assert _same(_visible_checkpoints(output)[name], new_state)

    for crash_at in range(len(writes)):
        reset_and_load_new()
        calls = []

        def crash(calls=calls, crash_at=crash_at):
            calls.append(None)
            if len(calls) - 1 == crash_at:
                raise Crash("injected crash")

        with monkeypatch.context() as patch:
            _intercept(patch, ckpt, "write_file", crash)
            with pytest.raises(Crash):
                trainer.save_checkpoint()
        visible = _visible_checkpoints(output)
        assert list(visible) == ["checkpoint-2"], f"crash at write {crash_at}: {list(visible)}"
        assert _same(visible["checkpoint-2"], old["checkpoint-2"]), f"crash at write {crash_at}"
        assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".tmp-")] == []
