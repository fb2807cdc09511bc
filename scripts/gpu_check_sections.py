"""The sections of ``scripts/gpu_check.py``: each one measures or checks one thing and records as it goes.

Every section is ``fn(ctx) -> status`` with ``status`` "ok", "failed" (a check did not hold) or
"partial" (the time budget ran out before every case ran). Results go through ``ctx.record`` /
``ctx.append`` right after each case, so a crash or a kill keeps what was measured before it.
GPU sizes are the real checkpoints' (``bench_common.REAL_SHAPES``); ``--smoke`` uses tiny ones on CPU.
The correctness sections (CUDA tests, every family) are in ``gpu_check_correctness.py``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
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
from gpu_check_correctness import _routing_of, section_families, section_tests  # noqa: E402
from gpu_check_serving import section_serving  # noqa: E402


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
        **(
            {"peak_memory_mb": {name: peak_memory_mb(fn, ctx.device) for name, fn in cases.items()}}
            if ctx.device.startswith("cuda")
            else {"peak_memory_skipped": "no CUDA: peak memory is measured on CUDA only"}
        ),
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
    from hf_moe_routing.training.adak import AdaKTrainer, AdaKTrainingConfig

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
    "serving": section_serving,
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
