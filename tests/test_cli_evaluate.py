"""The evaluate and bench commands on a tiny saved checkpoint: output, fitting, warnings, clean errors."""

import json
import math
import re

import pytest

from hf_moe_routing.cli.main import main
from hf_moe_routing.testing import tiny_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model"), "mixtral")


def _argv(model_dir, *extra):
    return ["evaluate", str(model_dir), "--dataset", str(model_dir / "text.txt"), "--seq-len", "32", *extra]


def test_evaluate_command_writes_table_json_and_plot(model_dir, tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "k.png"
    argv = _argv(model_dir, "--routing", "top_p:p=0.5", "--batch-size", "4")
    assert main([*argv, "--json", str(out), "--plot", str(png), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "perplexity" in captured.out and "activated experts" in captured.out and "Top-K" in captured.out
    assert "fatal" not in captured.err and "%|" not in captured.err  # no git noise, no progress bars
    result = json.loads(out.read_text())
    assert result["routing_config"]["p"] == 0.5 and 1.0 <= result["mean_activated"] < 2.0
    assert png.read_bytes()[:4] == b"\x89PNG"
    # an existing output file is kept unless --overwrite
    assert main([*argv, "--json", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--json", str(out), "--quiet", "--overwrite"]) == 0


@pytest.mark.parametrize("routing", ["dynamic_skip", "bip"])
def test_evaluate_fits_a_routing_with_state_first(model_dir, capsys, routing):
    argv = _argv(model_dir, "--routing", routing, "--fit-dataset", str(model_dir / "text.txt"), "--quiet")
    assert main([*argv, "--fit-steps", "2", "--batch-size", "4"]) == 0
    captured = capsys.readouterr()
    assert f"fitted {routing} on 2 batches" in captured.out and "never fitted" not in captured.err


def test_evaluating_untrained_allocators_warns(model_dir, capsys):
    assert main(_argv(model_dir, "--routing", "adak", "--quiet")) == 0
    err = capsys.readouterr().err
    assert re.search(
        r"^warning: The adak routing of MoE layers \[0, 1\] was never fitted or trained", err, re.M
    )


def test_the_plot_shows_balance_for_a_balancing_routing(model_dir, tmp_path, capsys):
    png = tmp_path / "bip.png"
    argv = _argv(model_dir, "--routing", "bip", "--fit-dataset", str(model_dir / "text.txt"), "--quiet")
    assert main([*argv, "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Top-K MaxVio" in out and "% more)" not in out  # per-layer balance next to Top-K's
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bench_command(model_dir, tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = ["bench", str(model_dir), "--routing", "topk:top_k=1", "--seq-len", "16", "--batch-size", "2"]
    assert main([*argv, "--repeats", "2", "--warmup", "0", "--json", str(out), "--quiet"]) == 0
    assert "speed-up vs Top-K" in capsys.readouterr().out
    assert json.loads(out.read_text())["speedup"] > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--routing", "top_p:p=2"], r"\(0\.0, 1\.0\]"),
        (["--routing", "top_p", "--adapter", "x"], "not both"),
        (["--seq-len", "4096"], "context"),
        (["--eval-batches", "0"], "--eval-batches must be >= 1"),
        (["--routing", "bip:capacity_factor=inf"], "capacity_factor.*expected a number"),
        (["--tasks", "blimp_local_no_such_task"], "Unknown lm-eval task"),
    ],
)
def test_evaluate_command_bad_input_exits_2(model_dir, extra, message, capsys):
    if "--tasks" in extra:
        pytest.importorskip("lm_eval")
    assert main(["evaluate", str(model_dir), "--dataset", str(model_dir / "text.txt"), *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"^error: .*" + message, err, re.MULTILINE)


def test_bench_refuses_a_model_without_experts_and_too_long_sequences(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "dense")
    assert main(["bench", str(tmp_path / "dense"), "--seq-len", "8", "--repeats", "1"]) == 2
    assert re.search(r"^error: .*no Mixture-of-Experts block", capsys.readouterr().err, re.M)
    assert main(["bench", str(model_dir), "--seq-len", "100000", "--repeats", "1"]) == 2
    assert re.search(
        r"^error: Sequence length 100000 is longer than the model's context", capsys.readouterr().err, re.M
    )


def test_nan_results_are_written_as_standard_json(tmp_path):
    from hf_moe_routing.metrics import save_results

    path = save_results(tmp_path / "r.json", {"perplexity": math.nan, "per_layer": [1.0, math.inf]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["perplexity"] is None and json.loads(text)["per_layer"] == [1.0, None]


def test_evaluate_command_runs_lm_eval_tasks_and_saves_with_evaluate(model_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from hf_moe_routing.data import data_dir

    try:
        data = data_dir()
    except FileNotFoundError as error:
        pytest.skip(f"shared data folder missing: {error}")
    out = tmp_path / "r.json"
    argv = _argv(
        model_dir, "--routing", "topk:top_k=1", "--quiet", "--tasks", "blimp_local_anaphor_gender_agreement"
    )
    assert main([*argv, "--limit", "4", "--data-dir", str(data), "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "blimp_local_anaphor_gender_agreement" in captured.out and "fatal" not in captured.err
    result = json.loads(out.read_text())
    assert 0.0 <= result["lm_eval"]["blimp_local_anaphor_gender_agreement"]["acc"] <= 1.0
    assert result["mean_activated"] == 1.0
    assert "_timestamp" in result and "_evaluate_version" in result  # evaluate.save's conventions
