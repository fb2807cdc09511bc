"""Routing adapters: exact save/load round trips, fingerprint checks, clear errors, atomic writes."""

import json

import pytest
import torch
from safetensors.torch import load_file
from save_race import race_saves

from hf_moe_routing import (
    ROUTING_METHODS,
    TopKConfig,
    get_patch_state,
    patch_model,
)
from hf_moe_routing.hub import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_io,
    files,
    load_routing_adapter,
    read_adapter_config,
    save_routing_adapter,
)
from hf_moe_routing.patching import routing_layers
from hf_moe_routing.testing import (
    GENERIC_FAMILIES,
    REQUIRED_FAMILIES,
    OffsetConfig,
    logits,
    randomize_offsets,
    tiny_model,
)

pytestmark = pytest.mark.usefixtures("offset_routing")


def _rehash(folder):
    """Record the hash of hand-edited weights (what a save would have written)."""
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["weights_sha256"] = files.sha256_bytes((folder / WEIGHTS_NAME).read_bytes())
    (folder / CONFIG_NAME).write_text(json.dumps(config))


@pytest.mark.parametrize("family", REQUIRED_FAMILIES + GENERIC_FAMILIES)
def test_round_trip_reproduces_the_routing_exactly(family, ids, tmp_path):
    model = randomize_offsets(patch_model(tiny_model(family), OffsetConfig(top_k=2)))
    expected = logits(model, ids)
    assert not torch.equal(expected, logits(tiny_model(family), ids))  # the adapter changes the model

    folder = save_routing_adapter(model, tmp_path / "adapter", training_info={"steps": 3})
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
    config = read_adapter_config(folder)
    assert config["routing"] == {"routing_type": "test-offset", "top_k": 2}
    assert config["moe_shape"] == get_patch_state(model).shape.fingerprint()
    assert config["library"]["name"] == "hf-moe-routing" and config["library"]["version"]
    assert config["training"] == {"steps": 3}
    tensors = load_file(str(folder / WEIGHTS_NAME))
    layers = sorted(routing_layers(model))
    assert sorted(tensors) == sorted(f"layers.{i}.{n}" for i in layers for n in ("offset", "scale"))

    fresh = tiny_model(family)
    load_routing_adapter(fresh, folder)
    assert get_patch_state(fresh).config == OffsetConfig(top_k=2)
    assert torch.equal(logits(fresh, ids), expected)


def test_base_model_id_and_revision_come_from_the_model_config(tmp_path):
    model = patch_model(tiny_model("mixtral"), TopKConfig(top_k=1))
    model.config._name_or_path = "org/tiny-mixtral"
    model.config._commit_hash = "a" * 40
    config = read_adapter_config(save_routing_adapter(model, tmp_path / "a"))
    assert config["base_model"] == {"id": "org/tiny-mixtral", "path": None, "revision": "a" * 40}
    config = read_adapter_config(
        save_routing_adapter(model, tmp_path / "b", base_model_id="x/y", revision="v1")
    )
    assert config["base_model"] == {"id": "x/y", "path": None, "revision": "v1"}


def test_saving_an_unpatched_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not patched"):
        save_routing_adapter(tiny_model("mixtral"), tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_adapter_for_another_model_is_refused_and_the_model_is_untouched(ids, tmp_path):
    save_routing_adapter(patch_model(tiny_model("mixtral"), OffsetConfig()), tmp_path / "a")
    other = tiny_model("mixtral", num_local_experts=4)
    before = logits(other, ids)
    with pytest.raises(ValueError, match=r"different MoE model.*num_experts: adapter 8 vs model 4"):
        load_routing_adapter(other, tmp_path / "a")
    assert get_patch_state(other) is None
    assert torch.equal(logits(other, ids), before)
    with pytest.raises(ValueError, match=r"family: adapter 'mixtral' vs model 'qwen2_moe'"):
        load_routing_adapter(tiny_model("qwen2_moe"), tmp_path / "a")


def test_missing_and_corrupt_files_give_clear_errors(tmp_path):
    model = patch_model(tiny_model("qwen3_moe"), OffsetConfig())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_routing_adapter(tiny_model("qwen3_moe"), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"not a routing adapter: it has no {CONFIG_NAME}"):
        load_routing_adapter(tiny_model("qwen3_moe"), tmp_path / "empty")

    folder = save_routing_adapter(model, tmp_path / "a")
    (folder / WEIGHTS_NAME).write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(ValueError, match="corrupt or not a safetensors file"):
        load_routing_adapter(tiny_model("qwen3_moe"), folder)
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"has no {WEIGHTS_NAME}"):
        load_routing_adapter(tiny_model("qwen3_moe"), folder)

    folder = save_routing_adapter(model, tmp_path / "b")
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_routing_adapter(tiny_model("qwen3_moe"), folder)
    (folder / CONFIG_NAME).write_text(json.dumps({"routing": {"routing_type": "nope"}, "moe_shape": {}}))
    with pytest.raises(ValueError, match="Unknown routing method 'nope'"):
        load_routing_adapter(tiny_model("qwen3_moe"), folder)


def test_state_that_does_not_fit_is_refused_and_previous_routing_restored(ids, tmp_path):
    folder = save_routing_adapter(
        randomize_offsets(patch_model(tiny_model("mixtral"), OffsetConfig())), tmp_path / "a"
    )
    tensors = load_file(str(folder / WEIGHTS_NAME))
    tensors["layers.1.offset"] = torch.zeros(3)
    from safetensors.torch import save_file

    save_file(tensors, str(folder / WEIGHTS_NAME))
    _rehash(folder)

    model = patch_model(tiny_model("mixtral"), TopKConfig(top_k=1))
    before = logits(model, ids)
    with pytest.raises(ValueError, match="already patched with 'topk'.*replace=True"):
        load_routing_adapter(model, folder)
    with pytest.raises(ValueError, match="does not fit layer 1"):
        load_routing_adapter(model, folder, replace=True)
    assert get_patch_state(model).config == TopKConfig(top_k=1)
    assert torch.equal(logits(model, ids), before)


def test_invalid_settings_are_refused_before_the_model_changes(ids, tmp_path):
    folder = save_routing_adapter(patch_model(tiny_model("mixtral"), TopKConfig(top_k=1)), tmp_path / "a")
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["routing"]["top_k"] = 99
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    model = randomize_offsets(patch_model(tiny_model("mixtral"), OffsetConfig()))
    before = logits(model, ids)
    with pytest.raises(ValueError, match="top_k=99"):
        load_routing_adapter(model, folder, replace=True)
    assert get_patch_state(model).config == OffsetConfig() and torch.equal(logits(model, ids), before)


def test_replace_swaps_the_routing_of_a_patched_model(ids, tmp_path):
    source = randomize_offsets(patch_model(tiny_model("deepseek_v3"), OffsetConfig(top_k=3)))
    folder = save_routing_adapter(source, tmp_path / "a")
    model = patch_model(tiny_model("deepseek_v3"), TopKConfig(top_k=1))
    load_routing_adapter(model, folder, replace=True)
    assert torch.equal(logits(model, ids), logits(source, ids))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_crash_mid_save_keeps_the_previous_adapter(exchange, ids, tmp_path, monkeypatch):
    if not exchange:  # the portable swap (two renames) used where renameat2 is missing
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    folder = tmp_path / "adapter"
    first = randomize_offsets(patch_model(tiny_model("mixtral"), OffsetConfig()), seed=1)
    save_routing_adapter(first, folder)
    (folder / "adapter_model.safetensors").write_bytes(b"a LoRA adapter saved next to it")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    real_write = adapter_io.write_weights

    def crash(path, blob):
        real_write(path, blob[: len(blob) // 2])  # half written ...
        raise OSError("disk full")  # ... then the process dies

    monkeypatch.setattr(adapter_io, "write_weights", crash)
    second = randomize_offsets(patch_model(tiny_model("mixtral"), OffsetConfig()), seed=2)
    with pytest.raises(OSError, match="disk full"):
        save_routing_adapter(second, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left behind

    monkeypatch.setattr(adapter_io, "write_weights", real_write)
    save_routing_adapter(second, folder)
    # the unrelated file is carried over, the adapter is replaced
    assert (folder / "adapter_model.safetensors").read_bytes() == b"a LoRA adapter saved next to it"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    model = load_routing_adapter(tiny_model("mixtral"), folder)
    assert torch.equal(logits(model, ids), logits(second, ids))


def test_saved_folder_gets_normal_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        folder = save_routing_adapter(patch_model(tiny_model("mixtral"), TopKConfig()), tmp_path / "a")
        assert folder.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
        folder.chmod(0o750)
        save_routing_adapter(patch_model(tiny_model("mixtral"), TopKConfig()), folder)
        assert folder.stat().st_mode & 0o777 == 0o750  # an existing folder keeps its mode
    finally:
        os.umask(umask)


def test_a_readme_that_is_not_ours_is_kept(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / CARD_NAME).write_text("# my own notes\n")
    save_routing_adapter(patch_model(tiny_model("mixtral"), TopKConfig()), folder)
    assert (folder / CARD_NAME).read_text() == "# my own notes\n"
    # our own card is refreshed on the next save
    (folder / CARD_NAME).unlink()
    model = patch_model(tiny_model("mixtral"), TopKConfig(top_k=1))
    save_routing_adapter(model, folder)
    save_routing_adapter(model, folder, results={"perplexity": 9.5})
    assert "9.5" in (folder / CARD_NAME).read_text()


def test_saving_into_a_file_path_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        save_routing_adapter(patch_model(tiny_model("mixtral"), TopKConfig()), tmp_path / "file")


BUILT_IN = sorted(name for name in ROUTING_METHODS if name != OffsetConfig.routing_type)


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_routing_round_trips(name, ids, tmp_path):
    config = ROUTING_METHODS[name].example()  # settings that route without fitting
    model = patch_model(tiny_model("qwen3_moe"), config)
    gen = torch.Generator().manual_seed(5)
    for layer in routing_layers(model).values():  # non-trivial state (allocators, BIP prices, biases)
        for tensor in layer.routing_state().values():
            if tensor.is_floating_point():
                tensor.data.copy_(torch.randn(tensor.shape, generator=gen) * 0.1 + tensor.data)
    folder = save_routing_adapter(model, tmp_path / name)
    fresh = load_routing_adapter(tiny_model("qwen3_moe"), folder)
    assert get_patch_state(fresh).config == config
    assert not any(layer.training for layer in routing_layers(fresh).values())  # eval model: eval routing
    saved, loaded = routing_layers(model), routing_layers(fresh)
    for index in saved:
        a, b = saved[index].routing_state(), loaded[index].routing_state()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # stateful methods may update their state in the forward: both copies must stay in step
    assert torch.equal(logits(fresh, ids), logits(model, ids))


def test_results_and_training_info_are_stored_as_plain_json(tmp_path):
    from hf_moe_routing.evaluation.flops import flops_per_token

    model = patch_model(tiny_model("mixtral"), TopKConfig(top_k=1))
    flops = flops_per_token(model, 16, activated=1.0)
    folder = save_routing_adapter(
        model,
        tmp_path / "a",
        results={"flops_per_token": flops, "per_layer": torch.tensor([1.0, 1.0])},
        training_info={"config": TopKConfig(top_k=1)},
    )
    config = read_adapter_config(folder)
    assert config["results"]["flops_per_token"]["total"] == flops.total
    assert config["results"]["per_layer"] == [1.0, 1.0]
    assert config["training"] == {"config": {"routing_type": "topk", "top_k": 1}}  # via to_dict()
    assert f"| FLOPs per token | {flops.total:.4g} |" in (folder / CARD_NAME).read_text()
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_routing_adapter(model, tmp_path / "b", results={"bad": object()})
    assert not (tmp_path / "b").exists()


# ---- content hash, racing readers, stale temporaries ------------------------------------------
def test_weights_are_checked_against_the_content_hash(tmp_path):
    folder = save_routing_adapter(
        randomize_offsets(patch_model(tiny_model("mixtral"), OffsetConfig())), tmp_path / "a"
    )
    config = read_adapter_config(folder)
    assert config["weights_sha256"] == files.sha256_bytes((folder / WEIGHTS_NAME).read_bytes())
    other = save_routing_adapter(
        randomize_offsets(patch_model(tiny_model("mixtral"), OffsetConfig()), seed=3), tmp_path / "b"
    )
    (folder / WEIGHTS_NAME).write_bytes((other / WEIGHTS_NAME).read_bytes())  # another save's weights
    with pytest.raises(ValueError, match="content hash.*different saves"):
        load_routing_adapter(tiny_model("mixtral"), folder)


def test_a_reader_racing_a_writer_never_pairs_two_saves(tmp_path):
    """Every read of a folder that a writer keeps replacing is one whole save, and both saves are seen.

    Each save's whole state (the offset buffer and the scale parameter) holds its own value, so a read
    that pairs one save's config with the other's weights, or mixes tensors, fails the set comparison.
    """
    folder = tmp_path / "adapter"
    models = {}
    for value in (1.0, 2.0):
        models[value] = patch_model(tiny_model("mixtral"), OffsetConfig())
        for layer in routing_layers(models[value]).values():
            layer.offset.data.fill_(value)
            layer.scale.data.fill_(value)

    def save(value: float) -> None:
        save_routing_adapter(models[value], folder, training_info={"value": value}, model_card=False)

    def read() -> float:
        config, weights = adapter_io.read_adapter(folder)
        stored = {float(t.flatten()[0]) for layer in weights.values() for t in layer.values()}
        assert stored == {config["training"]["value"]}
        assert adapter_io.read_adapter_weights(folder)[0]["offset"][0].item() in (1.0, 2.0)
        return config["training"]["value"]

    seen, reads = race_saves(save, read, min_reads=40)
    assert seen == {1.0, 2.0}, f"only {seen} in {reads} reads: the race was not exercised"


def test_temporary_folders_of_killed_writers_are_cleaned_up(tmp_path):
    import os

    dead = tmp_path / ".adapter.tmp-999999999-abc"  # no such process
    alive = tmp_path / f".adapter.tmp-{os.getppid()}-def"  # a running writer (our parent)
    unrelated = tmp_path / ".other.tmp-999999999-abc"
    for folder in (dead, alive, unrelated):
        folder.mkdir()
        (folder / WEIGHTS_NAME).write_bytes(b"half")
    save_routing_adapter(patch_model(tiny_model("mixtral"), TopKConfig()), tmp_path / "adapter")
    assert not dead.exists() and alive.exists() and unrelated.exists()


# ---- paths stay inside their folder ---------------------------------------------------------------
@pytest.mark.parametrize("subfolder", ["../outside", "/etc", "a/../../outside", "~/x", "a\\..\\b"])
def test_subfolders_must_stay_inside_the_folder(tmp_path, subfolder):
    save_routing_adapter(patch_model(tiny_model("mixtral"), TopKConfig()), tmp_path / "outside")
    (tmp_path / "repo").mkdir()
    with pytest.raises(ValueError, match="subfolder"):
        load_routing_adapter(tiny_model("mixtral"), tmp_path / "repo", subfolder=subfolder)


def test_a_symlinked_subfolder_pointing_outside_is_refused(tmp_path):
    save_routing_adapter(patch_model(tiny_model("mixtral"), TopKConfig()), tmp_path / "outside")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="resolves outside"):
        load_routing_adapter(tiny_model("mixtral"), tmp_path / "repo", subfolder="link")


# ---- strict JSON ------------------------------------------------------------------------------------
def test_adapter_configs_are_read_as_strict_json(tmp_path):
    folder = save_routing_adapter(patch_model(tiny_model("mixtral"), TopKConfig()), tmp_path / "a")
    text = (folder / CONFIG_NAME).read_text()
    (folder / CONFIG_NAME).write_text(text.replace('"results": {}', '"results": {"ppl": NaN}'))
    with pytest.raises(ValueError, match="NaN"):
        load_routing_adapter(tiny_model("mixtral"), folder)
    (folder / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested deeper"):
        load_routing_adapter(tiny_model("mixtral"), folder)
    (folder / CONFIG_NAME).write_text(
        text.replace('"moe_shape": {', '"moe_shape": [{').replace('},\n  "training', '}],\n  "training')
    )
    with pytest.raises(ValueError, match="moe_shape"):
        load_routing_adapter(tiny_model("mixtral"), folder)


def test_nan_results_are_stored_as_null_with_a_warning(tmp_path):
    model = patch_model(tiny_model("mixtral"), TopKConfig())
    with pytest.warns(UserWarning, match=r"results\['perplexity'\] is NaN or infinite: stored as null"):
        folder = save_routing_adapter(model, tmp_path / "a", results={"perplexity": float("nan"), "acc": 0.5})
    text = (folder / CONFIG_NAME).read_text()
    assert "NaN" not in text and json.loads(text)["results"] == {"perplexity": None, "acc": 0.5}


# ---- base model, fitted state ----------------------------------------------------------------------
def test_a_local_base_model_is_stored_as_an_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path / "ckpt")
    model = patch_model(tiny_model("mixtral"), TopKConfig())
    model.config._name_or_path = "../ckpt"
    config = read_adapter_config(save_routing_adapter(model, tmp_path / "a"))
    assert config["base_model"] == {"id": None, "path": str(tmp_path / "ckpt"), "revision": None}
    cache = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("b" * 40)
    cache.mkdir(parents=True)
    config = read_adapter_config(save_routing_adapter(model, tmp_path / "b", base_model_id=str(cache)))
    assert config["base_model"] == {"id": "org/tiny", "path": str(cache), "revision": "b" * 40}


def test_saving_a_routing_that_was_never_fitted_warns(tmp_path):
    from hf_moe_routing import BIPConfig, fit_routing

    model = patch_model(tiny_model("mixtral"), BIPConfig())
    with pytest.warns(UserWarning, match=r"bip routing of MoE layers \[0, 1\] was never fitted.*fit_routing"):
        folder = save_routing_adapter(model, tmp_path / "a")
    assert read_adapter_config(folder)["fitted"] is False
    fit_routing(model, torch.randint(3, 100, (4, 16)), batch_size=2, progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder = save_routing_adapter(model, tmp_path / "a")
    assert read_adapter_config(folder)["fitted"] is True


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(moe_shape=None), "'moe_shape' must be a JSON object"),
        (lambda d: d.update(routing=[1]), "'routing' must be a JSON object"),
        (lambda d: d.update(format_version="2"), "'format_version' must be a positive integer"),
        (lambda d: d.pop("weights_sha256"), "lacks the weights' content hash"),
    ],
    ids=["moe-shape-null", "routing-list", "version-string", "no-hash"],
)
def test_a_tampered_adapter_config_is_a_clear_error(tmp_path, edit, match):
    folder = save_routing_adapter(patch_model(tiny_model("mixtral"), TopKConfig()), tmp_path / "a")
    data = json.loads((folder / CONFIG_NAME).read_text())
    edit(data)
    (folder / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        load_routing_adapter(tiny_model("mixtral"), folder)


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text"])
def test_an_adapter_refuses_a_model_whose_experts_have_another_size(tmp_path, family):
    """gpt-oss and Llama 4 name no expert width attribute: it is read off the weights for the fingerprint."""
    folder = save_routing_adapter(patch_model(tiny_model(family), TopKConfig()), tmp_path / "a")
    assert json.loads((folder / CONFIG_NAME).read_text())["moe_shape"]["expert_intermediate_size"] == 96
    with pytest.raises(ValueError, match="expert_intermediate_size"):
        load_routing_adapter(tiny_model(family, intermediate_size=160), folder)
