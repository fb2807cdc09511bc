"""The sections of ``scripts/gpu_check.py``: each one measures or checks one thing and records as it goes.

Every section is ``fn(ctx) -> status`` with ``status`` "ok", "failed" (a check did not hold) or
"partial" (the time budget ran out before every case ran). Results go through ``ctx.record`` /
``ctx.append`` right after each case, so a crash or a kill keeps what was measured before it.
GPU sizes are the real checkpoints' (``bench_common.REAL_SHAPES``); ``--smoke`` uses tiny ones on CPU.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bip_overhead import bench_solve_share  # noqa: E402
from bench_common import Deadline, build_model, measure, peak_memory_mb, random_ids  # noqa: E402
from bench_compile import bench_compile  # noqa: E402
from bench_sentinel_experts import bench_experts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Context:
    """What a section needs: where it runs, how big, until when, and where its results go."""

    device: str
    smoke: bool
    deadline: Deadline
    results: dict[str, Any]
    flush: Callable[[], None]
    out: Path

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.smoke else torch.bfloat16

    def record(self, key: str, value: Any) -> None:
        self.results[key] = value
        self.flush()

    def append(self, key: str, value: Any) -> None:
        self.results.setdefault(key, []).append(value)
        self.flush()


def _partial(rows: list[dict]) -> bool:
    return any("skipped" in row for row in rows)


# ---- (a) CUDA tests and every family on the device ---------------------------------------------------


def cuda_test_files(root: Path = ROOT) -> list[str]:
    """Test files that hold CUDA tests (the suite's convention: their names start with ``test_cuda``)."""
    pattern = re.compile(r"def test_cuda")
    return sorted(
        str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py") if pattern.search(p.read_text())
    )


def section_tests(ctx: Context) -> str:
    """``pytest -k test_cuda`` on the files with CUDA tests; outcome of every test from its JUnit XML."""
    files = cuda_test_files()
    ctx.record("files", files)
    if not files:
        ctx.record("note", "no test file with CUDA tests found")
        return "failed"
    junit = ctx.out / "tests_junit.xml"
    command = [sys.executable, "-m", "pytest", *files, "-k", "test_cuda", "-q", "-p", "no:cacheprovider"]
    command += [f"--junitxml={junit}", "-o", "addopts="]
    ctx.record("command", " ".join(command))
    timeout = max(10.0, ctx.deadline.left())
    proc = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        ctx.record("timeout_s", timeout)
    ctx.record("exit_code", proc.returncode)
    ctx.record("output_tail", output[-3000:])
    tests = []
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = "failed" if child.tag == "error" else child.tag
            tests.append(
                {
                    "test": f"{case.get('classname')}::{case.get('name')}",
                    "outcome": outcome,
                    "seconds": float(case.get("time", 0)),
                }
            )
    ctx.record("tests", tests)
    counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "skipped")}
    ctx.record("counts", counts)
    if proc.returncode not in (0, 5) or counts["failed"]:  # 5: nothing selected
        return "failed"
    return "ok"


def family_list() -> list[str]:
    """Every family with a tiny test model (the testing module's list, whichever it exposes)."""
    from hf_moe_routing import testing

    for name in ("ALL_FAMILIES", "SUPPORTED_FAMILIES"):
        if hasattr(testing, name):
            return list(getattr(testing, name))
    return list(testing.REQUIRED_FAMILIES) + list(testing.GENERIC_FAMILIES)


def _routing_of(model) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list]:
    """Forward pre-hooks on every experts module that keep its (index, weights) inputs."""
    from hf_moe_routing.patching import describe

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module, args):
        seen.append((args[1].detach().clone(), args[2].detach().clone()))

    handles = [b.experts.register_forward_pre_hook(hook) for b in describe(model).blocks]
    return seen, handles


def check_family(family: str, device: str, dtype: torch.dtype) -> dict:
    """bf16 identity of TopKConfig, a BIP fit-and-route, and Ada-K (sentinel vs eager experts) on ``device``."""
    from hf_moe_routing import AdaKConfig, BIPConfig, TopKConfig, patch_model, routing_layers, unpatch_model
    from hf_moe_routing.core.ops import max_vio, tokens_per_expert
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
    out["topk_routing_identical"] = all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ref_routing, patched_routing)
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
        eager, _ = run()
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


def section_families(ctx: Context) -> str:
    status = "ok"
    for family in family_list():
        if ctx.deadline.passed():
            ctx.append("families", {"family": family, "skipped": "time budget used up"})
            status = "partial" if status == "ok" else status
            continue
        try:
            row = check_family(family, ctx.device, ctx.dtype)
        except Exception as error:  # noqa: BLE001 - recorded; the other families still run
            row = {"family": family, "ok": False, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        ctx.append("families", row)
        if not row["ok"]:
            status = "failed"
    return status


# ---- (b) sentinel_grouped_mm at real layer shapes ----------------------------------------------------

EXPERT_SHAPES = ["qwen1.5-moe-a2.7b", "mixtral-8x7b", "deepseek-v3", "gpt-oss-20b"]


def section_experts(ctx: Context) -> str:
    prefill, decode = ([256, 64], [1, 8]) if ctx.smoke else ([16384, 4096], [1, 8, 64])
    repeats, warmup = (2, 1) if ctx.smoke else (10, 2)
    status = "ok"
    for index, shape in enumerate(EXPERT_SHAPES):
        # an equal share of what is left per remaining shape, so that every shape gets measured
        share = Deadline(ctx.deadline.left() / (len(EXPERT_SHAPES) - index))
        rows = bench_experts(
            shape,
            decode + prefill,
            [1.0, 0.75, 0.5, 0.25],
            device=ctx.device,
            dtype=ctx.dtype,
            repeats=repeats,
            warmup=warmup,
            clock="wall",
            tiny=ctx.smoke,
            deadline=share,
        )
        for row in rows:
            row["phase"] = "decode" if row["tokens"] in decode else "prefill"
            ctx.append("rows", row)
        if _partial(rows):
            status = "partial"
        if ctx.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return status


# ---- (c) BIP solve share of the MoE layer forward ----------------------------------------------------


def section_bip(ctx: Context) -> str:
    tokens = [64, 256] if ctx.smoke else [4096, 16384, 65536]
    status = "ok"
    shapes = ["qwen1.5-moe-a2.7b", "deepseek-v3"]
    for index, shape in enumerate(shapes):
        share = Deadline(ctx.deadline.left() / (len(shapes) - index))
        rows = bench_solve_share(
            shape,
            tokens,
            [1, 4],
            device=ctx.device,
            dtype=ctx.dtype,
            repeats=2 if ctx.smoke else 5,
            clock="wall",
            end_to_end=True,
            tiny=ctx.smoke,
            deadline=share,
        )
        for row in rows:
            ctx.append("rows", row)
        status = "partial" if _partial(rows) else status
        if ctx.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return status


# ---- (d) Ada-K end to end, PPO rollouts, torch.compile -----------------------------------------------

ADAK_STACKS = {"qwen1.5-moe-a2.7b": 4, "mixtral-8x7b": 4, "deepseek-v3": 2, "gpt-oss-20b": 4}


def bench_adak_stack(shape: str, layers: int, batch: int, seq_len: int, ctx: Context, repeats: int) -> dict:
    """Forward time and peak memory of a stack of real-size MoE layers: Top-K, Top-K through the sentinel
    kernel, and Ada-K (random allocators, greedy), with the FLOPs-predicted saving at the measured mean k."""
    from hf_moe_routing import AdaKConfig, original_routing, patch_model
    from hf_moe_routing.evaluation.flops import flops_per_token
    from hf_moe_routing.patching import describe

    model = build_model(shape, layers=layers, device=ctx.device, dtype=ctx.dtype, tiny=ctx.smoke)
    own_impl = model.config._experts_implementation
    ids, mask = random_ids(batch, seq_len, model.config.vocab_size, ctx.device)
    patch_model(model, AdaKConfig())
    num_experts = describe(model).shape.num_experts
    seen, handles = _routing_of(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    mean_k = [float((index < num_experts).sum(-1).float().mean()) for index, _ in seen]

    def forward():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)

    def topk():
        with original_routing(model):
            forward()

    def topk_sentinel():
        with original_routing(model):
            model.set_experts_implementation("sentinel_grouped_mm")
            try:
                forward()
            finally:
                model.set_experts_implementation(own_impl)

    cases = {"topk": topk, "topk_sentinel": topk_sentinel, "adak": forward}
    times = measure(cases, device=ctx.device, repeats=repeats, warmup=1, clock="wall", deadline=ctx.deadline)
    med = {name: statistics.median(t) for name, t in times.items()}
    flops = {
        name: flops_per_token(model, seq_len, activated=k).total
        for name, k in (("topk", None), ("adak", mean_k))
    }
    predicted = 1.0 - flops["adak"] / flops["topk"]
    measured = 1.0 - med["adak"] / med["topk"]
    return {
        "shape": shape,
        "layers": layers,
        "tokens": batch * seq_len,
        "experts_implementation": own_impl,
        "mean_k_per_layer": mean_k,
        "median_ms": {name: 1e3 * v for name, v in med.items()},
        "speedup": med["topk"] / med["adak"],
        "predicted_saving": predicted,
        "measured_saving": measured,
        "saved_over_predicted": measured / predicted if predicted > 0 else None,
        "peak_memory_mb": {name: peak_memory_mb(fn, ctx.device) for name, fn in cases.items()},
        "repeats": len(times["topk"]),
    }


def section_adak(ctx: Context) -> str:
    batch, seq_len = (2, 32) if ctx.smoke else (4, 2048)
    stacks = {shape: 2 for shape in ADAK_STACKS} if ctx.smoke else ADAK_STACKS
    status = "ok"
    for shape, layers in stacks.items():
        if ctx.deadline.passed():
            ctx.append("rows", {"shape": shape, "skipped": "time budget used up"})
            status = "partial"
            continue
        try:
            ctx.append("rows", bench_adak_stack(shape, layers, batch, seq_len, ctx, 2 if ctx.smoke else 5))
        except Exception as error:  # noqa: BLE001 - recorded; the other shapes still run
            ctx.append("rows", {"shape": shape, "error": f"{type(error).__name__}: {str(error)[:300]}"})
            status = "failed"
        if ctx.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return status


def section_ppo(ctx: Context) -> str:
    """Tokens/s of PPO steps (sampled rollout + Top-K baseline + allocator updates) against no-grad forwards."""
    from datasets import Dataset

    from hf_moe_routing import AdaKConfig, original_routing, patch_model
    from hf_moe_routing.training.adak_trainer import AdaKTrainer, AdaKTrainingConfig

    shape, layers = "qwen1.5-moe-a2.7b", (2 if ctx.smoke else 4)
    batch, seq_len, steps = (2, 32, 2) if ctx.smoke else (8, 1024, 4)
    model = build_model(shape, layers=layers, device=ctx.device, dtype=ctx.dtype, tiny=ctx.smoke)
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(3, model.config.vocab_size, (batch * (steps + 1), seq_len), generator=generator)
    data = Dataset.from_dict({"input_ids": rows.tolist()})
    ids, mask = rows[:batch].to(ctx.device), torch.ones(batch, seq_len, dtype=torch.long, device=ctx.device)

    def forward():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)

    def topk():
        with original_routing(model):
            forward()

    tokens = batch * seq_len
    patch_model(model, AdaKConfig())
    times = measure(
        {"inference_topk": topk, "inference_adak": forward}, device=ctx.device, repeats=5, clock="wall"
    )
    result = {
        "shape": shape,
        "layers": layers,
        "tokens_per_step": tokens,
        "tokens_per_s": {name: tokens / statistics.median(t) for name, t in times.items()},
    }
    ctx.record("result", result)
    with tempfile.TemporaryDirectory() as folder:
        config = AdaKTrainingConfig(
            output_dir=folder,
            warmup_steps=0,
            max_steps=steps + 1,
            batch_size=batch,
            logging_steps=1,
            progress_bar=False,
            save_total_limit=1,
            verify_base_unchanged=False,
            shuffle=False,
        )
        trainer = AdaKTrainer(model, config, data)  # the model is patched with AdaKConfig already
        trainer.train()
        logged = [e for e in trainer.state.log_history if e.get("phase") == "ppo"][1:]  # first: warm-up
    ppo_s = statistics.median(e["seconds"] for e in logged)
    result["ppo_steps_timed"] = len(logged)
    result["ppo_epochs"] = config.ppo_epochs
    result["tokens_per_s"]["ppo"] = tokens / ppo_s
    result["ppo_vs_inference"] = tokens / ppo_s / result["tokens_per_s"]["inference_topk"]
    ctx.record("result", result)
    return "ok"


def section_compile(ctx: Context) -> str:
    routings = ["topk", "adak"] if ctx.smoke else ["topk", "adak", "bip", "top_p", "none"]
    batch, seq_len = (2, 16) if ctx.smoke else (8, 512)
    backend = (
        "eager" if ctx.smoke else "inductor"
    )  # smoke: dynamo capture only (inductor on CPU takes minutes)
    rows = []
    for routing in routings:  # one at a time, so each is recorded as soon as it is measured
        rows += bench_compile(
            "qwen1.5-moe-a2.7b",
            [routing],
            batch=batch,
            seq_len=seq_len,
            layers=2,
            device=ctx.device,
            dtype=ctx.dtype,
            tiny=ctx.smoke,
            repeats=2 if ctx.smoke else 10,
            clock="wall",
            backend=backend,
            deadline=ctx.deadline,
        )
        rows[-1]["backend"] = backend
        ctx.append("rows", rows[-1])
    if any("error" in r for r in rows):
        return "failed"
    return "partial" if _partial(rows) else "ok"


SECTIONS: dict[str, Callable[[Context], str]] = {
    "tests": section_tests,
    "families": section_families,
    "experts": section_experts,
    "bip": section_bip,
    "adak": section_adak,
    "ppo": section_ppo,
    "compile": section_compile,
}


def run_section(name: str, ctx: Context) -> str:
    """Run one section; exceptions are the caller's to record."""
    status = SECTIONS[name](ctx)
    if ctx.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return status


def dump(path: Path, data: dict) -> None:
    """Write JSON atomically (a reader never sees half a file); NaN and inf become null."""

    def clean(value):
        if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean(data), indent=2) + "\n")
    os.replace(tmp, path)
