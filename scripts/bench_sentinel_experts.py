"""Benchmark: sentinel-safe experts time vs the share of dropped slots, next to grouped_mm and eager.

One MoE experts layer (Qwen2-MoE experts module; default sizes are those of Qwen1.5-MoE-A2.7B: hidden
2048, 60 experts of 1408, top-4) runs the forward of ``--tokens`` tokens routed top-k by random
router scores. A fraction of the (token, slot) pairs is then marked unused (sentinel index, weight 0),
as a variable-k router would. Every setting is timed in the same run, interleaved repeat by repeat,
and the table reports the median time and its ratio to the same implementation with all slots::

    python scripts/bench_sentinel_experts.py                    # realistic and small layer
    python scripts/bench_sentinel_experts.py --preset small --repeats 9
    python scripts/bench_sentinel_experts.py --device cuda --dtype bfloat16

If time falls in proportion to the slots kept, ``ratio`` equals ``kept``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

from hf_moe_routing.core.experts import SENTINEL_EXPERTS

PRESETS = {
    "realistic": dict(hidden=2048, experts=60, intermediate=1408, top_k=4, tokens=2048),
    "small": dict(hidden=512, experts=16, intermediate=256, top_k=2, tokens=512),
}


def build_experts(hidden: int, experts: int, intermediate: int, dtype: torch.dtype, device: str):
    """A randomly initialised Qwen2-MoE experts module of the given size."""
    config = AutoConfig.for_model(
        "qwen2_moe", hidden_size=hidden, num_experts=experts, moe_intermediate_size=intermediate
    )
    module = Qwen2MoeExperts(config)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.02)
    return module.to(device=device, dtype=dtype).eval()


def routing(tokens: int, experts: int, top_k: int, drop: float, seed: int, device: str, dtype: torch.dtype):
    """Top-k of random router scores, then exactly ``round(drop * tokens * top_k)`` slots set to the sentinel."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.softmax(torch.randn(tokens, experts, generator=generator), dim=-1)
    weights, index = scores.topk(top_k, dim=-1)
    dropped = torch.randperm(tokens * top_k, generator=generator)[: round(drop * tokens * top_k)]
    flat_index, flat_weights = index.reshape(-1).clone(), weights.reshape(-1).clone()
    flat_index[dropped] = experts
    flat_weights[dropped] = 0.0
    return flat_index.view(tokens, top_k).to(device), flat_weights.view(tokens, top_k).to(device, dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_once(module, implementation: str, hidden, index, weights, device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward."""
    module.config._experts_implementation = implementation
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        module(hidden, index, weights)
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench(
    preset: str,
    drops: list[float],
    repeats: int,
    warmup: int,
    dtype: torch.dtype,
    device: str,
    implementations: list[str],
    clock: str = "cpu",
) -> list[dict]:
    size = PRESETS[preset]
    module = build_experts(size["hidden"], size["experts"], size["intermediate"], dtype, device)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(size["tokens"], size["hidden"], generator=generator).to(device, dtype)
    cases = []
    for impl in implementations:
        # grouped_mm is only correct without sentinel slots (outside expert parallelism): time it at 0% dropped
        impl_drops = [0.0] if impl == "grouped_mm" else drops
        for drop in impl_drops:
            index, weights = routing(size["tokens"], size["experts"], size["top_k"], drop, 1, device, dtype)
            cases.append(dict(impl=impl, drop=drop, index=index, weights=weights, times=[], cpu=[]))
    for _ in range(warmup):
        for case in cases:
            time_once(module, case["impl"], hidden, case["index"], case["weights"], device)
    for _ in range(repeats):  # interleaved so that machine load hits every setting alike
        for case in cases:
            wall, cpu = time_once(module, case["impl"], hidden, case["index"], case["weights"], device)
            case["times"].append(wall)
            case["cpu"].append(cpu)
    # On a CPU shared with other jobs, process CPU time is the stabler measure; on GPUs only wall time means much.
    key = "cpu" if clock == "cpu" else "times"
    grouped = next((c for c in cases if c["impl"] == "grouped_mm"), None)
    rows = []
    for case in cases:
        median = statistics.median(case[key])
        full = next(c for c in cases if c["impl"] == case["impl"] and c["drop"] == 0.0)
        rows.append(
            dict(
                preset=preset,
                impl=case["impl"],
                kept=1.0 - case["drop"],
                wall_ms=1e3 * statistics.median(case["times"]),
                cpu_ms=1e3 * statistics.median(case["cpu"]),
                ratio=median / statistics.median(full[key]),
                vs_grouped=median / statistics.median(grouped[key]) if grouped else float("nan"),
            )
        )
    return rows


def format_table(rows: list[dict], clock: str) -> str:
    lines = [
        "| layer | implementation | slots kept | median wall ms | median CPU ms "
        f"| {clock} time / all slots | {clock} time / grouped_mm all slots |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['preset']} | {row['impl']} | {row['kept']:.2f} | {row['wall_ms']:.1f} | {row['cpu_ms']:.1f} | "
            f"{row['ratio']:.2f} | {row['vs_grouped']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=[*PRESETS, "all"], default="all")
    parser.add_argument(
        "--drop", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75], help="fractions of slots dropped"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default=None,
        help="time the ratios use: process CPU time (default on CPU, robust to other jobs) or wall time (default on GPU)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--implementations",
        nargs="+",
        default=[SENTINEL_EXPERTS, "grouped_mm", "eager"],
        help="experts implementations",
    )
    args = parser.parse_args(argv)
    if 0.0 not in args.drop:
        args.drop = [0.0, *args.drop]
    if any(not 0.0 <= d < 1.0 for d in args.drop):
        parser.error("--drop fractions must be in [0, 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    clock = args.clock or ("wall" if args.device.startswith("cuda") else "cpu")
    presets = list(PRESETS) if args.preset == "all" else [args.preset]
    rows = []
    for preset in presets:
        rows += bench(
            preset, sorted(args.drop), args.repeats, args.warmup, dtype, args.device, args.implementations
        )
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(
        f"device {device}, {torch.get_num_threads()} threads, {args.dtype}, median of {args.repeats} repeats; "
        + "; ".join(f"{p}: {PRESETS[p]}" for p in presets)
    )
    print(format_table(rows, clock))


if __name__ == "__main__":
    main()
