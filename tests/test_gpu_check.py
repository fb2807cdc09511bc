"""``scripts/gpu_check.py --smoke`` runs every section on CPU with tiny shapes and writes its report.

The real run needs a CUDA GPU (and says so clearly without one); the smoke run keeps the same code
paths working in CI: JSON structure, partial results when the time budget runs out, PNG and summary.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
SECTIONS = ["tests", "families", "experts", "bip", "adak", "ppo", "compile", "serving"]
STATUSES = {"ok", "partial", "skipped", "failed", "error", "timeout", "not run"}
#: the serving section needs vLLM (a separate venv: .ci/serving); without it, it skips with a reason
HAS_VLLM = __import__("importlib.util").util.find_spec("vllm") is not None


def run_check(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**__import__("os").environ, **env},
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu")
    return run_check("--smoke", "--out", str(out)), out


def test_smoke_run_writes_every_section(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["meta"]["smoke"] is True and report["meta"]["torch"] == torch.__version__
    assert list(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        expected = "skipped" if name == "serving" and not HAS_VLLM else "ok"
        assert section["status"] == expected, (name, section.get("error"))
        assert section["seconds"] >= 0 and section["budget_s"] > 0
    assert (out / "gpu_check.png").stat().st_size > 0
    assert "sentinel_grouped_mm" in (out / "summary.md").read_text()


def leaves(value, path: str = ""):
    """Every (path, leaf) of a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, f"{path}[{index}]")
    else:
        yield path, value


def test_smoke_numbers_are_finite_or_skipped_with_a_reason(smoke):
    """No NaN/inf (written as null) anywhere; what needs CUDA says so instead of a number."""
    _, out = smoke
    report = json.loads((out / "gpu_check.json").read_text())
    for name, section in report["sections"].items():
        assert section["results"], name
        for path, value in leaves(section["results"], name):
            assert value is not None, f"{path} is null (NaN, inf or not measured without a reason)"
            if isinstance(value, float):
                assert math.isfinite(value), path
    res = {k: v["results"] for k, v in report["sections"].items()}
    assert all("CUDA" in t["reason"] for t in res["tests"]["tests"])
    for row in res["adak"]["rows"]:
        assert "peak_memory_mb" not in row and "CUDA" in row["peak_memory_skipped"]


def test_smoke_results_have_every_case(smoke):
    _, out = smoke
    res = {k: v["results"] for k, v in json.loads((out / "gpu_check.json").read_text())["sections"].items()}
    assert "tests/test_bip_solver.py" in res["tests"]["files"]
    assert all(t["outcome"] == "skipped" for t in res["tests"]["tests"])  # no CUDA here
    assert res["tests"]["tests"], "the CUDA tests must be collected"
    from hf_moe_routing.testing import GENERIC_FAMILIES, REQUIRED_FAMILIES

    families = res["families"]["families"]
    assert {f["family"] for f in families} >= set(REQUIRED_FAMILIES + GENERIC_FAMILIES)
    assert all(f["ok"] and f["topk_routing_identical"] for f in families)
    rows = res["experts"]["rows"]
    assert {r["shape"] for r in rows} == {"qwen1.5-moe-a2.7b", "mixtral-8x7b", "deepseek-v3", "gpt-oss-20b"}
    assert {r["phase"] for r in rows} == {"decode", "prefill"}
    sentinel = [r for r in rows if r["impl"] == "sentinel_grouped_mm"]
    assert {r["kept"] for r in sentinel} == {1.0, 0.75, 0.5, 0.25}
    assert all(r["median_ms"] > 0 and r["predicted_saving"] == pytest.approx(1 - r["kept"]) for r in sentinel)
    assert any("error" in r for r in rows if r["shape"] == "gpt-oss-20b")  # its eager rejects sentinels
    for row in res["bip"]["rows"]:
        assert row["layer_forward_s"] > 0 and set(row["solve_share"]) == {"1", "4"}
    for row in res["adak"]["rows"]:
        assert row["speedup"] > 0 and 0 < row["predicted_saving"] < 1
        assert set(row["median_ms"]) == {"topk", "topk_sentinel", "adak"}
    assert set(res["ppo"]["result"]["tokens_per_s"]) == {"ppo", "inference_topk", "inference_adak"}
    assert [r["routing"] for r in res["compile"]["rows"]] == ["topk", "adak"]
    assert all(r["max_abs_diff"] < 1e-4 for r in res["compile"]["rows"])


def test_used_up_budget_keeps_partial_results(tmp_path):
    """A budget of ~0 s: the section stops (or is killed) early, and the report is still written."""
    proc = run_check("--smoke", "--out", str(tmp_path), "--sections", "experts", "--budget-scale", "0.001")
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    section = report["sections"]["experts"]
    assert section["status"] in {"partial", "timeout"}, section
    assert proc.returncode == (0 if section["status"] == "partial" else 1)
    if section["status"] == "partial":
        assert all("skipped" in r for r in section["results"]["rows"])
    else:  # killed at the hard limit (a slow machine spends the grace period importing torch)
        assert "process ended (timeout)" in section["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_without_gpu_says_so_and_writes_nothing(tmp_path):
    proc = run_check("--out", str(tmp_path / "gpu"), timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr and "--smoke" in proc.stderr
    assert not (tmp_path / "gpu").exists()


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed: the section runs instead of skipping")
def test_the_serving_section_skips_with_a_reason_without_vllm(tmp_path):
    proc = run_check("--smoke", "--out", str(tmp_path), "--sections", "serving")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    section = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["serving"]
    assert section["status"] == "skipped" and "vLLM is not installed" in section["results"]["skipped"]
