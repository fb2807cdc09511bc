"""The fit, warmup and train commands: adapters that load, options from the configs, one --overwrite."""

import dataclasses
import json
import re

import pytest
from transformers import AutoModelForCausalLM

from hf_moe_routing import AdaKConfig, AdaKTrainingConfig, get_patch_state
from hf_moe_routing.cli.main import main
from hf_moe_routing.hub import load_routing_adapter
from hf_moe_routing.patching import routing_layers
from hf_moe_routing.testing import tiny_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model"), "qwen2_moe", lines=60)


def _data(model_dir):
    return ["--dataset", str(model_dir / "text.txt"), "--seq-len", "16", "--quiet"]


# ---- fit ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("routing", ["bip:update=before", "loss_free:update_rate=0.01"])
def test_fit_saves_a_fitted_routing_adapter(model_dir, tmp_path, capsys, routing):
    out = tmp_path / "adapter"
    argv = ["fit", str(model_dir), "--routing", routing, "--output-dir", str(out), *_data(model_dir)]
    assert main([*argv, "--max-steps", "4", "--batch-size", "4", "--eval-batches", "2"]) == 0
    printed = capsys.readouterr().out
    assert "held-out AvgMaxVio: Top-K" in printed and "held-out perplexity" in printed
    model = load_routing_adapter(AutoModelForCausalLM.from_pretrained(model_dir), out)
    state = next(iter(routing_layers(model).values())).routing_state()
    assert max(float(t.abs().max()) for t in state.values() if t.is_floating_point()) > 0  # fitted
    config = json.loads((out / "routing_config.json").read_text())
    assert config["fitted"] is True and config["training"]["command"] == "hf-moe-routing fit"
    results = config["results"][f"{model_dir / 'text.txt'} (held-out end)"]
    assert {"perplexity", "perplexity_topk", "avg_max_vio", "avg_max_vio_topk"} <= set(results)


def test_fit_bad_settings_and_a_fit_that_saves_an_adapter(model_dir, tmp_path, capsys):
    argv = [
        "fit",
        str(model_dir),
        "--routing",
        "bip:capacity_factor=0.5",
        "--output-dir",
        str(tmp_path / "a"),
    ]
    assert main(argv) == 2
    assert re.search(r"^error: .*infeasible", capsys.readouterr().err, re.M)
    assert (
        main(
            [
                "fit",
                str(model_dir),
                "--routing",
                "topk",
                "--output-dir",
                str(tmp_path / "b"),
                *_data(model_dir),
            ]
        )
        == 2
    )
    assert "no state to fit" in capsys.readouterr().err
    old = [
        "fit",
        str(model_dir),
        "--routing",
        "bip",
        "--output-dir",
        str(tmp_path / "c"),
        *_data(model_dir),
    ]
    assert main([*old, "--max-steps", "2", "--batch-size", "4", "--eval-batches", "1"]) == 0
    assert (
        json.loads((tmp_path / "c" / "routing_config.json").read_text())["routing"]["routing_type"] == "bip"
    )


def test_fit_loss_controlled_fine_tunes_routers_and_saves_the_model(model_dir, tmp_path, capsys):
    out = tmp_path / "model"
    argv = [
        "fit",
        str(model_dir),
        "--routing",
        "loss_controlled",
        "--output-dir",
        str(out),
        *_data(model_dir),
    ]
    assert (
        main(
            [*argv, "--max-steps", "2", "--batch-size", "4", "--eval-batches", "1", "--learning-rate", "1e-2"]
        )
        == 0
    )
    assert "router weights fine-tuned" in capsys.readouterr().out
    tuned = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    tuned_gate, base_gate = tuned.model.layers[0].mlp.gate.weight, base.model.layers[0].mlp.gate.weight
    assert not tuned_gate.equal(base_gate)
    assert tuned.model.layers[0].self_attn.q_proj.weight.equal(base.model.layers[0].self_attn.q_proj.weight)
    assert json.loads((out / "fit_results.json").read_text())["training"]["steps"] == 2


def test_overwrite_replaces_our_files_and_keeps_the_others(model_dir, tmp_path, capsys):
    out = tmp_path / "shared"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "adapter_config.json").write_text("{}")  # a LoRA adapter sharing the folder
    argv = ["fit", str(model_dir), "--routing", "bip", "--output-dir", str(out), *_data(model_dir)]
    argv += ["--max-steps", "2", "--batch-size", "4", "--eval-batches", "1"]
    assert main(argv) == 0  # other files do not block
    assert main(argv) == 2  # our own output does, unless --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter_config.json").read_text() == "{}"


# ---- warmup and train -----------------------------------------------------------------------------
def test_train_options_come_from_the_configs(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # no line wrapping (argparse breaks lines at hyphens)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for config, skip in (
        (AdaKTrainingConfig, {"output_dir", "overwrite_output_dir", "progress_bar"}),
        (AdaKConfig, set()),
    ):
        for f in dataclasses.fields(config):
            if f.name in skip:
                continue
            option = "--" + f.name.replace("_", "-")
            assert option in help_text, option
            if f.metadata.get("help"):
                assert " ".join(f.metadata["help"].split()) in help_text
    assert "--learning-rate" in help_text and "(default: 0.001)" in help_text
    for old in ("--steps ", "--lr ", "--grad-accum ", "--output ", "--no-progress"):
        assert old not in help_text


def test_warmup_train_resume_and_the_adapter_card(model_dir, tmp_path, capsys):
    common = [str(model_dir), *_data(model_dir), "--batch-size", "4", "--calibration-batches", "1"]
    common += ["--logging-steps", "1"]
    warm = tmp_path / "warm"
    assert (
        main(["warmup", *common, "--output-dir", str(warm), "--warmup", "p-warm", "--warmup-steps", "2"]) == 0
    )
    assert (warm / "routing_config.json").is_file()

    out = tmp_path / "adak"
    args = ["train", *common, "--output-dir", str(out), "--warmup", "random", "--init-adapter", str(warm)]
    args += ["--eval-dataset", str(model_dir / "text.txt"), "--eval-split", "train", "--eval-batches", "1"]
    assert main([*args, "--max-steps", "2", "--k-max", "4"]) == 2  # k_max comes from the adapter
    assert "--k-max" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--max-steps", "2"]) == 0
    assert "Ada-K routing adapter saved to" in capsys.readouterr().out
    (out / "notes.txt").write_text("mine")
    assert main([*args, "--max-steps", "2"]) == 2  # refuses to overwrite silently
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--max-steps", "3", "--resume"]) == 0
    assert (out / "checkpoint-3").is_dir() and (out / "notes.txt").read_text() == "mine"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e.get("phase") == "ppo"] == [1, 2, 3]  # resumed, not restarted
    assert main([*args, "--max-steps", "2", "--overwrite"]) == 0
    assert not (out / "checkpoint-3").exists() and (out / "notes.txt").read_text() == "mine"

    config = json.loads((out / "routing_config.json").read_text())
    assert config["routing"]["routing_type"] == "adak" and config["training"]["init_adapter"] == str(warm)
    assert config["training"]["command"] == "hf-moe-routing train"
    card = (out / "README.md").read_text()
    assert "| init_adapter |" in card and "warmup_steps" not in card and "logging_steps" not in card
    model = load_routing_adapter(AutoModelForCausalLM.from_pretrained(model_dir), out)
    assert get_patch_state(model).config.routing_type == "adak"


def test_train_refuses_zero_eval_batches_and_reports_a_full_disk(model_dir, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    from hf_moe_routing.training.adak import AdaKTrainer

    common = ["train", str(model_dir), *_data(model_dir), "--output-dir", str(tmp_path / "a")]
    assert main([*common, "--eval-batches", "0"]) == 2
    assert re.search(r"^error: .*eval.batches.* must", capsys.readouterr().err, re.M | re.I)

    def full(self, *args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(AdaKTrainer, "train", full)
    assert main([*common, "--max-steps", "1", "--warmup-steps", "0", "--warmup", "random"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: disk full") and "Traceback" not in err
