"""Correctness sections of ``scripts/gpu_check.py``: the suite's CUDA tests and every family on the device.

``section_tests`` runs ``pytest -k test_cuda`` (the suite's convention: CUDA tests are named
``test_cuda_*`` and skipped with reason "needs CUDA" where there is none) and records every outcome;
``section_families`` checks TopKConfig identity, a BIP fit-and-route and Ada-K (sentinel vs eager
experts) for each supported family in the check's dtype (bf16 on a GPU, float32 in ``--smoke``).
"""

from __future__ import annotations

import re
import signal
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

#: gpu_check_sections.Context (passed in; that module imports this one)
Context = Any

ROOT = Path(__file__).resolve().parents[1]


# ---- (a) CUDA tests and every family on the device ---------------------------------------------------


def cuda_test_files(root: Path = ROOT) -> list[str]:
    """Test files that hold CUDA tests (the suite's convention: their names start with ``test_cuda``)."""
    pattern = re.compile(r"def test_cuda")
    return sorted(
        str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py") if pattern.search(p.read_text())
    )


def section_tests(ctx: Context) -> str:
    """``pytest -k test_cuda`` on the files with CUDA tests; outcome of every test from its JUnit XML."""
    files = sorted(cuda_test_files(), key=lambda f: "compile" in f)  # the slow compile tests last
    ctx.record("files", files)
    if not files:
        ctx.record("note", "no test file with CUDA tests found")
        return "failed"
    junit = ctx.out / "tests_junit.xml"
    junit.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", *files, "-k", "test_cuda", "-v", "-p", "no:cacheprovider"]
    command += [f"--junitxml={junit}", "-o", "addopts="]
    ctx.record("command", " ".join(command))
    timeout = max(10.0, ctx.deadline.left())
    proc = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )  # in this process's group: a kill of the section at its hard limit ends pytest too
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # inductor's compile workers exit with their parent
        output, _ = proc.communicate()
        ctx.record("timeout_s", timeout)
    ctx.record("exit_code", proc.returncode)
    ctx.record("output_tail", output[-3000:])
    tests = []
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            row = {"test": f"{case.get('classname')}::{case.get('name')}", "outcome": "passed"}
            row["seconds"] = float(case.get("time", 0))
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    row["outcome"] = "skipped" if child.tag == "skipped" else "failed"
                    row["reason"] = (child.get("message") or "")[:300]
            tests.append(row)
    else:  # killed before the XML was written: the verbose lines of the tests that finished
        for match in re.finditer(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", output, re.MULTILINE):
            outcome = {"ERROR": "failed"}.get(match[2], match[2].lower())
            tests.append({"test": match[1], "outcome": outcome, "seconds": None})
    ctx.record("tests", tests)
    counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "skipped")}
    ctx.record("counts", counts)
    if counts["failed"] or proc.returncode not in (0, 5, -signal.SIGKILL):  # 5: nothing selected
        return "failed"
    return "partial" if proc.returncode == -signal.SIGKILL else "ok"


def family_list(smoke: bool = False) -> list[str]:
    """Every MoE family of the installed transformers (the package's catalog); ``smoke``: one per common kind."""
    from hf_moe_routing.testing import GENERIC_FAMILIES, REQUIRED_FAMILIES, moe_families

    if smoke:
        return list(REQUIRED_FAMILIES) + list(GENERIC_FAMILIES)
    return [entry.model_type for entry in moe_families()]


def _routing_of(model) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list]:
    """Hooks that keep every MoE layer's (index, weights): what the experts receive, or, on a patched
    model whose experts take dense scores (Llama 4), what the routing layers return."""
    from hf_moe_routing.families.structure import experts_compute_all
    from hf_moe_routing.patching import describe, is_patched, routing_layers

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def experts_hook(module, args):
        if len(args) >= 3:  # (hidden, index, weights)
            seen.append((args[1].detach().clone(), args[2].detach().clone()))

    def layer_hook(module, args, output):
        seen.append((output.index.detach().clone(), output.weights.detach().clone()))

    blocks = describe(model).blocks
    if not experts_compute_all(blocks[0].experts) or not is_patched(model):
        handles = [b.experts.register_forward_pre_hook(experts_hook) for b in blocks]
    else:
        handles = [layer.register_forward_hook(layer_hook) for layer in routing_layers(model).values()]
    return seen, handles


def check_family(family: str, device: str, dtype: torch.dtype) -> dict:
    """bf16 identity of TopKConfig, a BIP fit-and-route, and Ada-K (sentinel vs eager experts) on ``device``."""
    from hf_moe_routing import AdaKConfig, BIPConfig, TopKConfig, patch_model, routing_layers, unpatch_model
    from hf_moe_routing.core.ops import max_vio, tokens_per_expert
    from hf_moe_routing.families import describe_model
    from hf_moe_routing.testing import tiny_model

    model = tiny_model(family, dtype=dtype).to(device)
    m = model.config.vocab_size
    ids = torch.randint(3, m, (3, 17), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0

    def run():
        seen, handles = _routing_of(model)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
        for h in handles:
            h.remove()
        return logits, seen

    out: dict[str, Any] = {"family": family}
    reference, ref_routing = run()
    again, _ = run()
    patch_model(model, TopKConfig())
    patched, patched_routing = run()
    out["topk_routing_identical"] = (
        not ref_routing  # dense experts: the logits comparison below is the identity check
        or all(
            torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ref_routing, patched_routing)
        )
    )
    out["topk_logits_identical"] = torch.equal(patched, reference)
    out["topk_max_abs_diff"] = float((patched.float() - reference.float()).abs().max())
    out["run_to_run_max_abs_diff"] = float((again.float() - reference.float()).abs().max())
    num_experts = routing_layers(model)[next(iter(routing_layers(model)))].num_experts
    real = mask.reshape(-1).bool()
    out["maxvio_topk"] = statistics.mean(
        float(max_vio(tokens_per_expert(index[real], num_experts))) for index, _ in patched_routing
    )

    patch_model(model, BIPConfig(), replace=True)
    model.train()
    for _ in range(3):
        with torch.no_grad():
            model(ids, attention_mask=mask)
    model.eval()
    logits, routing = run()
    q = [layer.q for layer in routing_layers(model).values()]
    out["bip_finite"] = bool(torch.isfinite(logits).all())
    out["bip_q_on_device_float32"] = all(
        t.device.type == torch.device(device).type and t.dtype == torch.float32 for t in q
    )
    out["bip_q_updated"] = all(int(layer.num_updates) == 3 for layer in routing_layers(model).values())
    out["maxvio_bip"] = statistics.mean(
        float(max_vio(tokens_per_expert(index[real], num_experts))) for index, _ in routing
    )

    patch_model(model, AdaKConfig(), replace=True)
    sentinel, routing = run()
    out["adak_finite"] = bool(torch.isfinite(sentinel).all())
    out["adak_mean_experts"] = statistics.mean(
        float((index[real] < num_experts).sum(-1).float().mean()) for index, _ in routing
    )
    try:  # the same routing through transformers' eager experts: checks the sentinel kernel on the device
        model.set_experts_implementation("eager")
        # unused slots go to expert 0 with weight 0, as the test suite does: the eager code of some families
        # (gpt-oss) one-hot encodes the index, and on CUDA a sentinel there is a device-side assert that
        # ends the process's CUDA context (every later family then fails)
        handles = [
            block.experts.register_forward_pre_hook(_sentinel_to_expert_0(num_experts), with_kwargs=True)
            for block in describe_model(model, verify=False).blocks
        ]
        try:
            eager, _ = run()
        finally:
            for handle in handles:
                handle.remove()
        out["adak_sentinel_vs_eager_max_abs_diff"] = float((sentinel.float() - eager.float()).abs().max())
        out["adak_sentinel_matches_eager"] = bool(
            torch.allclose(sentinel.float(), eager.float(), rtol=5e-2, atol=5e-2)
        )
    except Exception as error:  # noqa: BLE001 - some families' eager experts reject sentinel slots
        out["adak_eager_error"] = f"{type(error).__name__}: {str(error)[:200]}"
    unpatch_model(model)
    checks = [
        "topk_routing_identical",
        "bip_finite",
        "bip_q_on_device_float32",
        "bip_q_updated",
        "adak_finite",
    ]
    identical_enough = (
        out["topk_logits_identical"] or out["topk_max_abs_diff"] <= out["run_to_run_max_abs_diff"]
    )
    out["ok"] = (
        all(out[c] for c in checks) and identical_enough and out.get("adak_sentinel_matches_eager", True)
    )
    return out


def _sentinel_to_expert_0(num_experts: int):
    """Forward pre-hook for an experts module: integer (index) arguments clamped to ``num_experts - 1``."""

    def hook(module, args, kwargs):
        def fix(t):
            is_index = isinstance(t, torch.Tensor) and not t.is_floating_point()
            return t.clamp(max=num_experts - 1) if is_index else t

        return tuple(fix(a) for a in args), {key: fix(v) for key, v in kwargs.items()}

    return hook


def section_families(ctx: Context) -> str:
    status = "ok"
    from hf_moe_routing import UnsupportedFamilyError

    for family in family_list(ctx.smoke):
        if ctx.deadline.passed():
            ctx.append("families", {"family": family, "skipped": "time budget used up"})
            status = "partial" if status == "ok" else status
            continue
        try:
            row = check_family(family, ctx.device, ctx.dtype)
        except UnsupportedFamilyError as error:  # refused with a reason on CPU too: not a GPU failure
            row = {"family": family, "ok": True, "refused": error.reason}
        except Exception as error:  # noqa: BLE001 - recorded; the other families still run
            row = {"family": family, "ok": False, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        ctx.append("families", row)
        if not row["ok"]:
            status = "failed"
    return status
