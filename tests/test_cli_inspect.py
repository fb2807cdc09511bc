"""``hf-moe-routing inspect`` on local folders, and the CLI's error handling."""

import json

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from hf_moe_routing.cli.main import COMMANDS, main
from hf_moe_routing.evaluation import flops_per_token
from hf_moe_routing.testing import _COMMON, GENERIC_FAMILIES, REQUIRED_FAMILIES, tiny_model


@pytest.mark.parametrize("family", REQUIRED_FAMILIES + GENERIC_FAMILIES)
def test_inspect_saved_model(family, tmp_path, capsys):
    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json", "--seq-len", "64"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == family
    config = model.config.to_dict()
    expected_experts = next(
        config[k] for k in ("num_experts", "num_local_experts", "n_routed_experts") if k in config
    )
    assert info["num_experts"] == expected_experts == (16 if family == "deepseek_v3" else 8)
    assert info["top_k"] == model.config.num_experts_per_tok
    expected_layers = [1, 2] if family == "deepseek_v3" else [0, 1]  # V3 tiny config: first layer dense
    assert info["moe_layers"] == expected_layers
    assert info["flops_per_token"] == flops_per_token(model, 64).to_dict()
    assert (info["shared_experts"] is not None) == family.startswith(("qwen2", "deepseek"))

    assert main(["inspect", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    for text in ("MoE layers", "routed experts", "top-k", "router", "FLOPs / token", "routed experts"):
        assert text in table
    assert type(model.model.layers[-1].mlp.gate).__name__ in table


def _error_of(argv, capsys) -> str:
    """The one-line error ``main(argv)`` prints (exit status 2, no traceback)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # progress bars of loading may precede it
    assert last.startswith("error: ")
    return last


def test_inspect_config_only_reads_only_the_config(tmp_path, capsys):
    config = AutoConfig.for_model("qwen2_moe")  # full-size Qwen1.5-MoE-A2.7B shape, no weights anywhere
    config.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--config-only", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["num_experts"], info["top_k"], info["expert_intermediate_size"]) == (60, 4, 1408)
    assert info["shared_expert_gate"] is True
    # the published size of Qwen1.5-MoE-A2.7B: 14.3B parameters, 2.7B activated
    assert round(info["num_parameters"] / 1e9, 1) == 14.3
    assert round(info["num_active_parameters"] / 1e9, 1) == 2.7
    assert info["flops_per_token"]["total"] == pytest.approx(flops_per_token(config, 2048).total)
    # without --config-only the same folder has no weights to load: a clear error, no traceback
    _error_of(["inspect", str(tmp_path)], capsys)


def test_non_moe_model_is_a_clear_error(tmp_path, capsys):
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    err = _error_of(["inspect", str(tmp_path)], capsys)
    assert "no Mixture-of-Experts block" in err and "hf-moe-routing families" in err


SELECTION_BIAS_FAMILIES = {
    # sigmoid scores + a selection bias in the router (DeepSeek-V3 kind, group-limited)
    "glm4_moe": (
        dict(n_routed_experts=8, first_k_dense_replace=0, n_group=1, topk_group=1),
        "sigmoid + bias",
    ),
    # softmax + a selection bias in the router's moe_statics submodule
    "ernie4_5_moe": (dict(num_experts=8), "softmax + bias"),
}


@pytest.mark.parametrize("model_type", sorted(SELECTION_BIAS_FAMILIES))
def test_routers_with_a_selection_bias_are_inspected(model_type, tmp_path, capsys):
    overrides, kind = SELECTION_BIAS_FAMILIES[model_type]
    config = AutoConfig.for_model(
        model_type,
        **{**_COMMON, "intermediate_size": 64, "moe_intermediate_size": 32, **overrides},
        num_experts_per_tok=2,
        head_dim=16,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"family              {model_type}" in out and kind in out


def test_bad_arguments(tmp_path, capsys):
    assert "No model folder" in _error_of(["inspect", str(tmp_path / "missing")], capsys)
    tiny_model("mixtral").config.save_pretrained(tmp_path)
    assert "--seq-len" in _error_of(["inspect", str(tmp_path), "--config-only", "--seq-len", "0"], capsys)


def test_help_version_and_no_command(capsys):
    assert "inspect" in COMMANDS
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "the path, in order:" in out and "inspect" in out and "fit" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and "hf-moe-routing" in capsys.readouterr().out
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("before_command", [True, False])
def test_traceback_flag_reraises(tmp_path, before_command):
    argv = ["inspect", str(tmp_path / "missing")]
    with pytest.raises(FileNotFoundError):
        main(["--traceback", *argv] if before_command else [*argv, "--traceback"])


def test_pickle_only_and_truncated_weights_are_one_line_errors(tmp_path, capsys):
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "truncated")
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    assert "truncated or corrupt" in _error_of(["inspect", str(tmp_path / "truncated")], capsys)

    model.config.save_pretrained(tmp_path / "pickle")
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"not even a real pickle")
    err = _error_of(["inspect", str(tmp_path / "pickle")], capsys)
    assert "pickle" in err and "safetensors" in err


def test_config_only_reports_only_routers_that_patching_accepts(tmp_path, capsys, monkeypatch):
    tiny_model("mixtral").config.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--config-only", "--json"]) == 0
    assert "random" in json.loads(capsys.readouterr().out)["router_check"]
    from hf_moe_routing.patching import patch as patching

    def refuse(*args, **kwargs):
        raise TypeError("MixtralTopKRouter cannot be reproduced exactly")

    monkeypatch.setattr("hf_moe_routing.evaluation.summary.patch_model", refuse)
    assert "cannot be reproduced" in _error_of(["inspect", str(tmp_path), "--config-only"], capsys)
    assert patching is not None


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "table"])
def test_inspect_into_a_closed_pipe_prints_no_error(tmp_path, as_json):
    """``inspect ... | head``: the reader went away before we wrote; no error, no traceback."""
    import subprocess
    import sys

    tiny_model("qwen2_moe").save_pretrained(tmp_path)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hf_moe_routing.cli.main",
            "inspect",
            str(tmp_path),
            *(["--json"] if as_json else []),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stdout.close()  # the reader is gone before anything is written
    err = process.stderr.read()
    assert process.wait(timeout=300) == 0
    assert "Broken pipe" not in err and "Traceback" not in err and "error" not in err.lower()
