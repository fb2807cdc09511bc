"""Hub side of routing adapters: resolution, one-call loading, model cards, push (against a fake HfApi), CLI."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import LocalEntryNotFoundError

import hf_moe_routing
from hf_moe_routing import AutoRoutedModelForCausalLM, TopKConfig, get_patch_state, patch_model
from hf_moe_routing.cli.main import main
from hf_moe_routing.hub import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    build_model_card,
    check_model_card,
    load_routing_adapter,
    push_to_hub,
    results_from_lm_eval,
    save_routing_adapter,
    template_path,
    upload_adapter_folder,
)
from hf_moe_routing.testing import OffsetConfig, logits, randomize_offsets, tiny_model

RESULTS = {
    "wikitext-2/test": {
        "perplexity": 31.5,
        "mean_activated_experts": 1.42,
        "flops_reduction": 0.21,
        "per_layer": [1, 2],
    },
    "blimp": {"acc": 0.61},
}


pytestmark = pytest.mark.usefixtures("offset_routing")


class FakeHfApi:
    """Records what would be sent to the Hub (and the files as they were at upload time)."""

    def __init__(self, fail_with=None):
        self.calls = []
        self.uploaded = {}
        self.fail_with = fail_with

    def create_repo(self, repo_id, **kwargs):
        if self.fail_with:
            raise self.fail_with
        self.calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        folder = Path(kwargs["folder_path"])
        self.uploaded = {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/0", pr_url=None)


@pytest.fixture
def adapter(tmp_path):
    model = randomize_offsets(patch_model(tiny_model("qwen2_moe"), OffsetConfig()))
    return model, save_routing_adapter(
        model, tmp_path / "adapter", training_info={"steps": 5}, results=RESULTS
    )


# ---- resolution -----------------------------------------------------------------------------


def test_hub_repo_ids_are_downloaded_with_only_the_adapter_files(adapter, ids, monkeypatch):
    model, folder = adapter
    seen = {}

    def fake_snapshot_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(folder)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    fresh = load_routing_adapter(tiny_model("qwen2_moe"), "me/qwen-offset", revision="v2", token="hf_x")
    assert seen["repo_id"] == "me/qwen-offset" and seen["revision"] == "v2" and seen["token"] == "hf_x"
    assert set(seen["allow_patterns"]) == {CONFIG_NAME, WEIGHTS_NAME, CARD_NAME}
    assert torch.equal(logits(fresh, ids), logits(model, ids))


def test_unreachable_hub_says_the_network_or_token_is_the_problem(monkeypatch):
    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("offline and not cached")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(OSError, match="cannot be reached.*network connection and your token"):
        load_routing_adapter(tiny_model("mixtral"), "me/some-adapter")
    with pytest.raises(ValueError, match="neither an existing local folder nor a valid"):
        load_routing_adapter(tiny_model("mixtral"), "bad id with spaces")


def test_real_offline_mode_gives_the_network_message(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="Hugging Face Hub cannot be reached"):
        load_routing_adapter(tiny_model("mixtral"), "hf-moe-routing-tests/not-cached-adapter")


# ---- one-call loading ----------------------------------------------------------------------


def test_one_call_loading_from_local_folders(tmp_path, ids):
    base = tiny_model("mixtral")
    base.save_pretrained(tmp_path / "base")
    source = randomize_offsets(patch_model(tiny_model("mixtral"), OffsetConfig()))
    expected = logits(source, ids)
    folder = save_routing_adapter(source, tmp_path / "adapter", base_model_id=str(tmp_path / "base"))

    model = AutoRoutedModelForCausalLM.from_pretrained(
        tmp_path / "base", adapter=folder, attn_implementation="eager"
    )
    assert get_patch_state(model).config == OffsetConfig()
    assert torch.equal(logits(model, ids), expected)

    # the base model id recorded in the adapter is used when the base is omitted; kwargs pass through
    model = AutoRoutedModelForCausalLM.from_pretrained(adapter=folder, dtype=torch.bfloat16, device_map="cpu")
    assert model.dtype == torch.bfloat16 and get_patch_state(model) is not None
    assert model(ids).logits.dtype == torch.bfloat16

    # a folder holding both the checkpoint and the routing adapter
    source.save_pretrained(tmp_path / "both")
    save_routing_adapter(source, tmp_path / "both")
    model = AutoRoutedModelForCausalLM.from_pretrained(tmp_path / "both", attn_implementation="eager")
    assert torch.equal(logits(model, ids), expected)


def test_one_call_loading_errors(tmp_path):
    source = patch_model(tiny_model("mixtral"), TopKConfig())
    folder = save_routing_adapter(source, tmp_path / "adapter")  # tiny models have no base id
    with pytest.raises(ValueError, match="does not record its base model"):
        AutoRoutedModelForCausalLM.from_pretrained(adapter=folder)
    with pytest.raises(ValueError, match="Pass the routing adapter"):
        AutoRoutedModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(OSError, match="from_pretrained"):
        AutoRoutedModelForCausalLM()


# ---- model cards ------------------------------------------------------------------------------


def test_model_card_has_metadata_results_and_passes_validation(adapter):
    _, folder = adapter
    card = ModelCard.load(folder / CARD_NAME)
    check_model_card(card)
    data = card.data.to_dict()
    assert {"hf-moe-routing", "routing-test-offset", "qwen2_moe"} <= set(data["tags"])
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {
        ("wikitext-2/test", "perplexity"): 31.5,
        ("wikitext-2/test", "mean_activated_experts"): 1.42,
        ("wikitext-2/test", "flops_reduction"): 0.21,
        ("blimp", "acc"): 0.61,
    }
    assert "| wikitext-2/test | Perplexity | 31.5 |" in card.text
    assert "| blimp | Accuracy | 0.61 |" in card.text
    assert "| steps | 5 |" in card.text and "| num_experts | `8` |" in card.text
    # local corpora are named by the Hub dataset they come from
    wikitext = next(r for r in card.data.eval_results if r.dataset_name == "wikitext-2/test")
    assert (wikitext.dataset_type, wikitext.dataset_split) == ("Salesforce/wikitext", "test")
    assert data["datasets"] == ["Salesforce/wikitext"]


def test_card_names_the_base_model_and_hub_id():
    model = patch_model(tiny_model("mixtral"), TopKConfig(top_k=1))
    model.config._name_or_path = "mistralai/Mixtral-8x7B-v0.1"
    from hf_moe_routing.hub import adapter_config_dict

    config = adapter_config_dict(model, results={"perplexity": 5.0})
    card = build_model_card(config, repo_id="me/mixtral-top1")
    assert card.data.base_model == "mistralai/Mixtral-8x7B-v0.1"
    assert card.data.eval_results[0].dataset_name == "evaluation"
    assert 'adapter="me/mixtral-top1"' in card.text
    assert "[mistralai/Mixtral-8x7B-v0.1](https://huggingface.co/mistralai/Mixtral-8x7B-v0.1)" in card.text
    # a local path is not a Hub id: it must not become base_model metadata
    config["base_model"]["id"] = "/tmp"
    assert build_model_card(config).data.base_model is None


def test_evaluate_routing_output_goes_on_the_card_as_results(tmp_path):
    from hf_moe_routing.evaluation.evaluate import evaluate_routing

    model = patch_model(tiny_model("qwen3_moe"), TopKConfig(top_k=1))
    data = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    evaluation = evaluate_routing(model, data, batch_size=2, progress=False)
    folder = save_routing_adapter(model, tmp_path / "a", results={"synthetic": evaluation})
    card = check_model_card((folder / CARD_NAME).read_text())
    got = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert {r.dataset_name for r in card.data.eval_results} == {"synthetic"}
    assert got["perplexity"] == pytest.approx(evaluation["perplexity"])
    assert got["mean_activated_experts"] == pytest.approx(1.0)
    assert got["flops_per_token"] == pytest.approx(evaluation["flops_per_token"]["total"])
    assert (
        got["flops_reduction"] == pytest.approx(evaluation["flops_reduction"]) and got["flops_reduction"] > 0
    )
    assert not {"top_k", "seq_len", "num_tokens", "routing_config", "activated_per_layer"} & set(got)
    assert not {"mean_activated", "num_experts"} & set(got)
    assert "| synthetic | Mean activated experts per token | 1 |" in card.text


def test_card_validation_rejects_broken_metadata(adapter):
    _, folder = adapter
    text = (folder / CARD_NAME).read_text()
    check_model_card(text)
    with pytest.raises(ValueError):
        check_model_card(text.replace("value: 31.5", "value: [31.5, oops"))  # broken YAML
    with pytest.raises(ValueError, match="numeric"):
        check_model_card(text.replace("value: 31.5", "value: high"))
    with pytest.raises(ValueError, match="no YAML metadata"):
        check_model_card("# just a title\n")


def test_lm_eval_output_becomes_card_results():
    output = {
        "results": {
            "blimp_anaphor": {"alias": "blimp_anaphor", "acc,none": 0.75, "acc_stderr,none": 0.02},
            "wikitext_doc": {"word_perplexity,none": 55.1, "bits_per_byte,none": 1.3},
        }
    }
    assert results_from_lm_eval(output) == {
        "blimp_anaphor": {"acc": 0.75},
        "wikitext_doc": {"word_perplexity": 55.1, "bits_per_byte": 1.3},
    }
    with pytest.raises(ValueError, match="simple_evaluate"):
        results_from_lm_eval({"acc": 1})


# ---- push ---------------------------------------------------------------------------------------


def test_push_to_hub_uploads_adapter_and_card(ids):
    model = randomize_offsets(patch_model(tiny_model("mixtral"), OffsetConfig()))
    api = FakeHfApi()
    commit = push_to_hub(
        model,
        "me/mixtral-offset",
        private=True,
        revision="exp",
        commit_message="first",
        results=RESULTS,
        training_info={"steps": 7},
        token="hf_secret",
        api=api,
    )
    assert commit.commit_url.startswith("https://huggingface.co/me/mixtral-offset")
    names = [c[0] for c in api.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][2]["private"] is True and api.calls[0][2]["exist_ok"] is True
    assert api.calls[1][2]["branch"] == "exp"
    upload = api.calls[2][2]
    assert (
        upload["revision"] == "exp" and upload["commit_message"] == "first" and upload["token"] == "hf_secret"
    )
    assert sorted(api.uploaded) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])

    card = check_model_card(api.uploaded[CARD_NAME].decode())
    assert 'adapter="me/mixtral-offset"' in card.text
    assert card.data.to_dict()["model-index"][0]["name"] == "mixtral-offset"
    assert len(card.data.eval_results) == 4
    assert not Path(upload["folder_path"]).exists()  # the staging folder is removed after the push


def test_pushed_files_load_back(tmp_path, ids):
    model = randomize_offsets(patch_model(tiny_model("deepseek_v2"), OffsetConfig()))
    api = FakeHfApi()
    push_to_hub(model, "adapter-only-name", api=api, create_pr=True)
    assert api.calls[-1][1] == "me/adapter-only-name"  # the namespace the Hub resolved
    assert "create_branch" not in [c[0] for c in api.calls] and api.calls[-1][2]["create_pr"] is True
    for name, data in api.uploaded.items():
        (tmp_path / name).write_bytes(data)
    assert torch.equal(
        logits(load_routing_adapter(tiny_model("deepseek_v2"), tmp_path), ids), logits(model, ids)
    )


def test_upload_folder_checks_the_folder_and_renders_a_card_for_the_repo(adapter, tmp_path):
    _, folder = adapter
    (folder / CARD_NAME).unlink()
    api = FakeHfApi()
    upload_adapter_folder(folder, "me/x", api=api)
    assert not (folder / CARD_NAME).exists()  # the folder is not changed
    assert 'adapter="me/x"' in api.uploaded[CARD_NAME].decode()
    (tmp_path / "not-adapter").mkdir()
    with pytest.raises(FileNotFoundError, match="not a routing adapter"):
        upload_adapter_folder(tmp_path / "not-adapter", "me/x", api=FakeHfApi())
    with pytest.raises(OSError, match="Could not reach the Hugging Face Hub.*network"):
        upload_adapter_folder(folder, "me/x", api=FakeHfApi(fail_with=ConnectionError("no route")))


# ---- CLI ------------------------------------------------------------------------------------------


def test_cli_push(adapter, monkeypatch, capsys, tmp_path):
    _, folder = adapter
    api = FakeHfApi()
    monkeypatch.setattr("huggingface_hub.HfApi", lambda token=None: api)
    code = main(
        ["push", str(folder), "me/qwen-offset", "--private", "--revision", "dev", "--commit-message", "hi"]
        + ["--path-in-repo", "offset"]
    )
    assert code == 0
    assert "Uploaded routing adapter" in capsys.readouterr().out
    assert api.calls[0][2]["private"] is True and api.calls[-1][2]["commit_message"] == "hi"
    assert api.calls[-1][2]["revision"] == "dev" and api.calls[-1][2]["path_in_repo"] == "offset"

    assert main(["push", str(tmp_path / "missing"), "me/x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / CONFIG_NAME).write_text("{")
    assert main(["push", str(broken), "me/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "corrupt" in err and "Traceback" not in err


def test_one_call_loading_passes_token_and_revision_to_the_adapter_download(tmp_path, monkeypatch):
    base = tiny_model("mixtral")
    base.save_pretrained(tmp_path / "base")
    folder = save_routing_adapter(patch_model(base, TopKConfig(top_k=1)), tmp_path / "adapter")
    seen = {}

    def fake_snapshot_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(folder)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    model = AutoRoutedModelForCausalLM.from_pretrained(
        tmp_path / "base",
        adapter="me/top1",
        adapter_revision="v3",
        token="hf_tok",
        cache_dir=tmp_path / "cache",
    )
    assert seen == {
        **seen,
        "repo_id": "me/top1",
        "revision": "v3",
        "token": "hf_tok",
        "cache_dir": tmp_path / "cache",
    }
    assert get_patch_state(model).config == TopKConfig(top_k=1)


def test_the_packaged_template_is_the_one_in_model_cards():
    repo_template = Path(__file__).resolve().parents[1] / "model_cards" / "routing_adapter.md"
    assert template_path().read_text() == repo_template.read_text()
    assert "{{ card_data }}" in repo_template.read_text()


def test_top_level_exports():
    for name in ("save_routing_adapter", "load_routing_adapter", "push_to_hub", "AutoRoutedModelForCausalLM"):
        assert hasattr(hf_moe_routing, name)


def test_adapters_in_subfolders_of_a_folder_or_repo(tmp_path, ids, monkeypatch):
    source = randomize_offsets(patch_model(tiny_model("mixtral"), OffsetConfig()))
    save_routing_adapter(source, tmp_path / "repo" / "offset")
    model = load_routing_adapter(tiny_model("mixtral"), tmp_path / "repo", subfolder="offset")
    assert torch.equal(logits(model, ids), logits(source, ids))

    seen = {}

    def fake_snapshot_download(repo_id, **kwargs):
        seen.update(kwargs)
        return str(tmp_path / "repo")

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    base = tiny_model("mixtral")
    base.save_pretrained(tmp_path / "base")
    model = AutoRoutedModelForCausalLM.from_pretrained(
        tmp_path / "base", adapter="me/adapters", adapter_subfolder="offset", attn_implementation="eager"
    )
    names = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, "adapter_config.json", "adapter_model.safetensors")
    assert set(seen["allow_patterns"]) == {f"offset/{n}" for n in names}  # the routing and a LoRA adapter
    assert torch.equal(logits(model, ids), logits(source, ids))


# ---- push uploads an adapter, not a workspace ---------------------------------------------------
def test_push_uploads_only_adapter_files_from_a_training_folder(adapter, tmp_path):
    _, folder = adapter
    (folder / "checkpoint-3").mkdir()
    (folder / "checkpoint-3" / "optimizer.safetensors").write_bytes(b"optimizer state")
    (folder / "log.jsonl").write_text("{}\n")
    (folder / "trainer_state.json").write_text("{}")
    (folder / "notes.txt").write_text("mine")
    (folder / ".adapter.tmp-1-x").mkdir()
    before = sorted(p.name for p in folder.iterdir())
    api = FakeHfApi()
    upload_adapter_folder(folder, "me/qwen-offset", api=api)
    upload = api.calls[-1][2]
    assert sorted(upload["allow_patterns"]) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
    assert sorted(api.uploaded) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
    card = api.uploaded[CARD_NAME].decode()
    assert 'adapter="me/qwen-offset"' in card and "path/to/this/folder" not in card
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written into the folder


def test_push_records_a_hub_base_model_for_a_local_base(tmp_path, monkeypatch):
    import json

    base = tmp_path / "tiny-mixtral"
    tiny_model("mixtral").save_pretrained(base)
    monkeypatch.chdir(tmp_path)
    model = AutoRoutedModelForCausalLM  # noqa: F841 - the loader is tested below
    source = patch_model(tiny_model("mixtral"), TopKConfig(top_k=1))
    source.config._name_or_path = "tiny-mixtral"  # loaded from a relative folder
    folder = save_routing_adapter(source, tmp_path / "adapter")
    stored = json.loads((folder / CONFIG_NAME).read_text())["base_model"]
    assert stored == {"id": None, "path": str(base), "revision": None}
    api = FakeHfApi()
    upload_adapter_folder(folder, "me/top1", base_model="mistralai/Mixtral-8x7B-v0.1", api=api)
    pushed = json.loads(api.uploaded[CONFIG_NAME])
    assert pushed["base_model"]["id"] == "mistralai/Mixtral-8x7B-v0.1" and pushed["base_model"][
        "path"
    ] == str(base)
    assert check_model_card(api.uploaded[CARD_NAME].decode()).data.base_model == "mistralai/Mixtral-8x7B-v0.1"
    with pytest.raises(ValueError, match="not a Hub repo id"):
        upload_adapter_folder(folder, "me/top1", base_model="./local/folder", api=FakeHfApi())
    # the absolute path loads from any working directory
    monkeypatch.chdir(tmp_path / "adapter")
    model = AutoRoutedModelForCausalLM.from_pretrained(adapter=folder)
    assert get_patch_state(model).config == TopKConfig(top_k=1)


@pytest.mark.parametrize("path_in_repo", ["../up", "/abs", "a/../../b"])
def test_path_in_repo_stays_inside_the_repo(adapter, path_in_repo):
    model, folder = adapter
    with pytest.raises(ValueError, match="path_in_repo"):
        upload_adapter_folder(folder, "me/x", path_in_repo=path_in_repo, api=FakeHfApi())
    with pytest.raises(ValueError, match="path_in_repo"):
        push_to_hub(model, "me/x", path_in_repo=path_in_repo, api=FakeHfApi())


def test_pushing_a_routing_that_was_never_fitted_warns(tmp_path):
    from hf_moe_routing import BIPConfig

    model = patch_model(tiny_model("mixtral"), BIPConfig())
    with pytest.warns(UserWarning, match="never fitted") as pushed:
        push_to_hub(model, "me/bip", api=FakeHfApi())
    message = str(pushed[0].message)  # the model, not the temporary staging folder
    assert "MixtralForCausalLM being pushed" in message and "hf-moe-routing-push-" not in message
    with pytest.warns(UserWarning, match="never fitted"):
        folder = save_routing_adapter(model, tmp_path / "bip")
    with pytest.warns(UserWarning, match="never fitted") as uploaded:
        upload_adapter_folder(folder, "me/bip", api=FakeHfApi())
    assert f"in {folder} was never fitted" in str(uploaded[0].message)  # the user's folder


# ---- loading: the adapter repo first, old records, combined folders --------------------------------
def test_the_adapter_repo_can_come_first(tmp_path, ids, monkeypatch):
    base = tmp_path / "base"
    tiny_model("mixtral").save_pretrained(base)
    source = randomize_offsets(patch_model(tiny_model("mixtral"), OffsetConfig()))
    folder = save_routing_adapter(source, tmp_path / "adapter", base_model_id=str(base))
    repos = {"me/mixtral-offset": folder, "mistralai/base": tmp_path / "empty"}
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo_id, **kw: str(repos[repo_id]))
    model = AutoRoutedModelForCausalLM.from_pretrained("me/mixtral-offset", attn_implementation="eager")
    assert torch.equal(logits(model, ids), logits(source, ids))
    with pytest.raises(ValueError, match="holds no routing adapter"):
        AutoRoutedModelForCausalLM.from_pretrained("mistralai/base")


def test_an_unusable_recorded_base_says_where_it_came_from(tmp_path):
    import json

    folder = save_routing_adapter(patch_model(tiny_model("mixtral"), TopKConfig()), tmp_path / "a")
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["base_model"] = {"id": "../ckpt/tiny-qwen2-moe", "revision": None}  # written by an old version
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"records its base model as '../ckpt/tiny-qwen2-moe' \(in its routing_config"
    ):
        AutoRoutedModelForCausalLM.from_pretrained(adapter=folder)


def test_a_folder_with_lora_and_routing_loads_both_and_its_card_says_so(tmp_path, ids):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tmp_path / "base"
    tiny_model("qwen2_moe").save_pretrained(base)
    model = randomize_offsets(patch_model(tiny_model("qwen2_moe"), OffsetConfig()))
    model.config._name_or_path = str(base)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "both")
    save_routing_adapter(peft_model, tmp_path / "both")
    card = (tmp_path / "both" / CARD_NAME).read_text()
    assert "two adapters" in card and "| r | `4` |" in card and "AutoPeftModelForCausalLM" in card
    assert {"peft", "lora"} <= set(check_model_card(card).data.tags)

    loaded = AutoRoutedModelForCausalLM.from_pretrained(tmp_path / "both", attn_implementation="eager")
    assert isinstance(loaded, PeftModel) and get_patch_state(loaded) is not None
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="also holds a PEFT adapter"):
        only = AutoRoutedModelForCausalLM.from_pretrained(tmp_path / "both", load_peft=False)
    assert not isinstance(only, PeftModel)

    api = FakeHfApi()
    upload_adapter_folder(tmp_path / "both", "me/both", api=api)
    assert {"adapter_config.json", "adapter_model.safetensors", CONFIG_NAME, WEIGHTS_NAME} <= set(
        api.uploaded
    )


def test_save_pretrained_of_a_routed_model_warns_that_the_routing_is_not_in_it(tmp_path):
    import warnings

    model = patch_model(tiny_model("mixtral"), TopKConfig(top_k=1))
    with pytest.warns(UserWarning, match="topk routing is not saved.*save_routing_adapter"):
        model.save_pretrained(tmp_path / "a")
    from hf_moe_routing import unpatch_model

    unpatch_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.save_pretrained(tmp_path / "b")


# ---- Hub-ready cards --------------------------------------------------------------------------------
def test_cards_list_only_measured_metrics_and_settings_that_ran():
    model = patch_model(tiny_model("mixtral"), TopKConfig(top_k=1))
    from hf_moe_routing.hub import adapter_config_dict

    training = {"warmup": "random", "warmup_steps": 100, "warmup_learning_rate": 0.01, "max_steps": 5}
    training |= {
        "logging_steps": 10,
        "save_total_limit": 2,
        "init_adapter": "adak-warm",
        "learning_rate": 1e-3,
    }
    results = {
        "wikitext-2/test": {"eval_ppl": 12.5, "eval_ppl_topk": 12.0, "eval_activated_mean": 1.5},
        "fit_batches": 20,
        "held_out_batches": 4,
    }
    results["wikitext-2/test"] |= {
        "eval_tokens": 4000,
        "eval_default_k": 2,
        "eval_activated_per_layer": [1, 2],
    }
    config = adapter_config_dict(model, training_info=training, results=results)
    card = build_model_card(config, repo_id="me/x")
    got = {(r.dataset_type, r.metric_type, r.metric_name) for r in card.data.eval_results}
    assert got == {
        ("Salesforce/wikitext", "perplexity", "Perplexity"),
        ("Salesforce/wikitext", "perplexity_topk", "Perplexity (model's own top-k)"),
        ("Salesforce/wikitext", "mean_activated_experts", "Mean activated experts per token"),
    }
    assert "| init_adapter | adak-warm |" in card.text and "| max_steps | 5 |" in card.text
    for absent in (
        "warmup_steps",
        "warmup_learning_rate",
        "logging_steps",
        "save_total_limit",
        "fit_batches",
    ):
        assert absent not in card.text
