import json

import pytest
import torch

from hf_moe_routing import get_patch_state, load_routing_adapter
from hf_moe_routing.cli.main import main
from hf_moe_routing.data import synthetic_corpus, synthetic_tokenizer
from hf_moe_routing.recipes.demo import DemoConfig, prepare_output, run_demo
from hf_moe_routing.testing import tiny_model


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    code = main(["demo", "--size", "quick", "--output-dir", str(out), "--quiet", "--seed", "1"])
    return code, out


def test_demo_cli_writes_everything(quick_demo, capsys):
    code, out = quick_demo
    assert code == 0
    bip = json.loads((out / "bip-adapter" / "routing_config.json").read_text())
    assert bip["fitted"] is True and bip["base_model"]["path"] == str((out / "base-model").resolve())
    report = json.loads((out / "report.json").read_text())
    assert report["adak"]["top_k"] == 2 and report["adak"]["mean_activated"] > 0
    for key in ("perplexity", "topk_perplexity", "avg_max_vio", "topk_avg_max_vio"):
        assert report["bip"][key] > 0 or key.endswith("max_vio")
    assert set(report["experts_by_word_class"]) == {"random", "predictable", "computed"}
    assert report["pretrain"]["steps"] == 8 and report["timings_s"]["total"] > 0
    for png in report["plots"]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert len(report["plots"]) == 4
    for name in ("bip-adapter", "adak-adapter"):
        assert {"README.md", "routing_adapter.safetensors"} <= {p.name for p in (out / name).iterdir()}
    # the adapters load onto the saved base model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(out / "base-model")
    load_routing_adapter(base, out / "adak-adapter")
    assert get_patch_state(base).config.routing_type == "adak"
    ids = torch.randint(4, 50, (1, 12))
    assert torch.isfinite(base(ids).logits).all()


def test_demo_refuses_existing_output(quick_demo, capsys):
    _, out = quick_demo
    before = sorted(p.name for p in out.iterdir())
    (out / "mine.txt").write_text("keep me")
    assert main(["demo", "--size", "quick", "--output-dir", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "mine.txt"])
    assert main(["demo", "--model", "x"]) == 2
    assert "--dataset" in capsys.readouterr().err
    missing = ["--model", "no-such-user/no-such-moe", "--dataset", "tinyshakespeare"]
    assert main(["demo", *missing, "--output-dir", str(out.parent / "other")]) == 2
    assert "network" in capsys.readouterr().err


def test_default_output_is_a_new_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = prepare_output(None)
    (first / "report.json").write_text("{}")
    second = prepare_output(None)
    assert first.name == "hf-moe-routing-demo" and second.name == "hf-moe-routing-demo-2"
    assert (first / "report.json").read_text() == "{}"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        prepare_output(tmp_path / "file", overwrite=True)


def test_demo_on_a_local_model_and_dataset(tmp_path):
    """The --model/--dataset path, offline: a local checkpoint folder and a local JSONL file."""
    model_dir = tmp_path / "model"
    tiny_model("qwen2_moe").save_pretrained(model_dir)
    synthetic_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"body": t}) for t in synthetic_corpus(60, 4)) + "\n")
    config = DemoConfig(
        output_dir=tmp_path / "out",
        model=str(model_dir),
        dataset=str(data),
        text_field="body",
        size="quick",
        seq_len=16,
        plot=False,
        progress=False,
    )
    report = run_demo(config, log=lambda _: None)
    assert report["pretrain"] is None and report["experts_by_word_class"] is None
    assert report["base_model"] == str(model_dir) and report["plots"] == []
    saved = json.loads((tmp_path / "out" / "adak-adapter" / "routing_config.json").read_text())
    assert (
        saved["base_model"]["path"] == str(model_dir.resolve()) and saved["routing"]["routing_type"] == "adak"
    )
    with pytest.raises(ValueError, match="no text field 'text'"):
        run_demo(
            DemoConfig(output_dir=tmp_path / "o2", model=str(model_dir), dataset=str(data), size="quick"),
            log=lambda _: None,
        )
