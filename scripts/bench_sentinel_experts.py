"""Benchmark: sentinel-safe experts time vs the share of slots kept, next to grouped_mm and eager.

One MoE layer's experts module (random weights; shapes of public checkpoints, see
``bench_common.REAL_SHAPES``, plus a ``small`` layer) runs the forward of ``tokens`` tokens routed
top-k by random router scores. A share of the (token, slot) pairs is then marked unused (sentinel
index, weight 0), as a variable-k router would. Every setting is timed in the same run, interleaved
repeat by repeat; the table reports the median time, its ratio to the same implementation with all
slots, and the time saved as a share of the FLOPs-predicted saving (expert FLOPs are linear in the
slots kept, so the predicted saving is ``1 - kept``)::

    saved/predicted = (1 - time(kept) / time(all slots)) / (1 - kept)     # 1.0 = saves all it should

    python scripts/bench_sentinel_experts.py --threads 1          # Qwen1.5-MoE layer and the small layer
    python scripts/bench_sentinel_experts.py --shapes small --repeats 9
    python scripts/bench_sentinel_experts.py --shapes mixtral-8x7b deepseek-v3 --device cuda --dtype bfloat16

``grouped_mm`` is timed only with all slots kept: outside expert parallelism it does not handle
sentinel slots. ``eager`` of some families (gpt-oss) cannot take sentinel slots either: such cases
are reported with their error instead of a time.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REAL_SHAPES, Deadline, LayerShape, build_model, measure  # noqa: E402

from hf_moe_routing.core.experts import SENTINEL_EXPERTS  # noqa: E402
from hf_moe_routing.families import describe_model  # noqa: E402

#: shapes of this script besides the real ones: the small layer of the first table in docs/inspect.md
SHAPES: dict[str, LayerShape] = {
    **REAL_SHAPES,
    "small": LayerShape(
        "qwen2_moe",
        dict(
            hidden_size=512,
            num_experts=16,
            num_experts_per_tok=2,
            moe_intermediate_size=256,
            shared_expert_intermediate_size=256,
            intermediate_size=256,
            num_attention_heads=8,
            num_key_value_heads=8,
        ),
        REAL_SHAPES["qwen1.5-moe-a2.7b"].tiny,
    ),
}
DEFAULT_TOKENS = {"small": 512}  # others: 2048
IMPLEMENTATIONS = [SENTINEL_EXPERTS, "grouped_mm", "eager"]


def build_experts(shape: str, device: str, dtype: torch.dtype, tiny: bool = False):
    """(experts module, its model, top-k) of one decoder layer of ``shape`` with random weights."""
    model = build_model(SHAPES[shape], layers=1, device=device, dtype=dtype, tiny=tiny)
    block = describe_model(model, verify=False).blocks[0]
    with torch.no_grad():
        for param in block.experts.parameters():
            param.normal_(0.0, 0.02)
    return block.experts, model, block.spec.top_k


def routing(
    tokens: int, experts: int, top_k: int, kept: float, seed: int, device: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of random router scores; then ``round((1 - kept) * tokens * top_k)`` random slots become sentinels."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.softmax(torch.randn(tokens, experts, generator=generator), dim=-1)
    weights, index = scores.topk(top_k, dim=-1)
    dropped = torch.randperm(tokens * top_k, generator=generator)[: round((1 - kept) * tokens * top_k)]
    flat_index, flat_weights = index.reshape(-1).clone(), weights.reshape(-1).clone()
    flat_index[dropped] = experts
    flat_weights[dropped] = 0.0
    return flat_index.view(tokens, top_k).to(device), flat_weights.view(tokens, top_k).to(device, dtype)


def sentinel_unsafe(shape: str, implementations: list[str]) -> dict[str, str]:
    """Implementations whose experts forward raises on sentinel slots, found on a tiny float32 CPU copy.

    Returns ``{implementation: error message}``; used to keep such cases off a CUDA device, where the
    same fault is a device-side assert that ends the process's CUDA context.
    """
    experts, model, top_k = build_experts(shape, "cpu", torch.float32, tiny=True)
    hidden = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    index, weights = routing(4, experts.num_experts, top_k, 0.5, 1, "cpu", torch.float32)
    unsafe = {}
    for impl in implementations:
        experts.config._experts_implementation = impl
        try:
            with torch.no_grad():
                experts(hidden, index, weights)
        except Exception as error:  # noqa: BLE001 - reported in the rows
            unsafe[impl] = (
                f"cannot take sentinel slots (on a tiny CPU copy: {type(error).__name__}: {str(error)[:120]})"
            )
    return unsafe


def bench_experts(
    shape: str,
    tokens: list[int],
    kept: list[float],
    *,
    implementations: list[str] = IMPLEMENTATIONS,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    warmup: int = 1,
    clock: str = "cpu",
    tiny: bool = False,
    deadline: Deadline | None = None,
) -> list[dict]:
    """Rows of (shape, tokens, implementation, kept): median ms and the saving against the prediction.

    ``kept`` must contain 1.0 (the reference of every ratio). Token counts are run in the given order
    and skipped (row with ``skipped``) once ``deadline`` has passed.
    """
    if 1.0 not in kept or any(not 0.0 < k <= 1.0 for k in kept):
        raise ValueError(f"kept shares must be in (0, 1] and include 1.0, got {kept}.")
    if deadline is not None and deadline.passed():
        return [dict(shape=shape, tokens=n, skipped="time budget used up") for n in tokens]
    experts, model, top_k = build_experts(shape, device, dtype, tiny)
    num_experts = experts.num_experts
    # on CUDA an implementation that cannot take sentinel slots fails with a device-side assert, which
    # poisons the whole process: find such implementations on a tiny CPU copy first
    unsafe = {} if device == "cpu" else sentinel_unsafe(shape, implementations)
    rows: list[dict] = []
    for n in tokens:
        if deadline is not None and deadline.passed():
            rows.append(dict(shape=shape, tokens=n, skipped="time budget used up"))
            continue
        hidden = torch.randn(n, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        hidden = hidden.to(device, dtype)
        cases, meta, errors = {}, {}, {}
        for impl in implementations:
            for share in sorted(kept, reverse=True) if impl != "grouped_mm" else [1.0]:
                if share < 1.0 and impl in unsafe:
                    errors[(impl, share)] = unsafe[impl]
                    continue
                index, weights = routing(n, num_experts, top_k, share, 1, device, dtype)

                def call(impl=impl, index=index, weights=weights, hidden=hidden):
                    experts.config._experts_implementation = impl
                    with torch.no_grad():
                        experts(hidden, index, weights)

                try:
                    call()  # fails early for implementations that cannot take sentinel slots
                except Exception as error:  # noqa: BLE001 - reported in the row
                    errors[(impl, share)] = f"{type(error).__name__}: {str(error)[:200]}"
                    continue
                cases[f"{impl}@{share}"] = call
                meta[f"{impl}@{share}"] = (impl, share)
        times = measure(cases, device=device, repeats=repeats, warmup=warmup, clock=clock, deadline=deadline)
        med = {name: statistics.median(t) for name, t in times.items()}
        grouped = med.get("grouped_mm@1.0")
        for name, (impl, share) in meta.items():
            full = med.get(f"{impl}@1.0")
            predicted = 1.0 - share
            row = dict(
                shape=shape,
                tokens=n,
                impl=impl,
                kept=share,
                median_ms=1e3 * med[name],
                repeats=len(times[name]),
                time_vs_all_slots=med[name] / full if full else math.nan,
                time_vs_grouped_mm=med[name] / grouped if grouped else math.nan,
                predicted_saving=predicted,
            )
            if predicted > 0:
                row["saved_over_predicted"] = (1.0 - row["time_vs_all_slots"]) / predicted
                row["saved_over_predicted_vs_grouped_mm"] = (1.0 - row["time_vs_grouped_mm"]) / predicted
            rows.append(row)
        rows += [
            dict(shape=shape, tokens=n, impl=impl, kept=share, error=error)
            for (impl, share), error in errors.items()
        ]
    return rows


def format_table(rows: list[dict], clock: str) -> str:
    lines = [
        f"| layer | tokens | implementation | slots kept | median {clock} ms | time / all slots "
        "| time / grouped_mm all slots | saved / predicted |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if "median_ms" not in row:
            lines.append(
                f"| {row['shape']} | {row['tokens']} | {row.get('impl', '')} | {row.get('kept', '')} "
                f"| {row.get('error') or row.get('skipped')} | | | |"
            )
            continue
        saved = row.get("saved_over_predicted")
        lines.append(
            f"| {row['shape']} | {row['tokens']} | {row['impl']} | {row['kept']:.2f} | {row['median_ms']:.2f} "
            f"| {row['time_vs_all_slots']:.2f} | {row['time_vs_grouped_mm']:.2f} "
            f"| {'' if saved is None else f'{saved:.2f}'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=["qwen1.5-moe-a2.7b", "small"], choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="default: 2048 (small: 512)")
    parser.add_argument(
        "--kept", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25], help="shares of slots kept"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="CPU runs: process CPU time (default, robust to other jobs) or wall time; CUDA uses events",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--implementations", nargs="+", default=IMPLEMENTATIONS)
    args = parser.parse_args(argv)
    if 1.0 not in args.kept:
        args.kept = [1.0, *args.kept]
    if any(not 0.0 < k <= 1.0 for k in args.kept):
        parser.error("--kept shares must be in (0, 1]")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    clock = "cuda events" if args.device.startswith("cuda") else args.clock
    rows = []
    for shape in args.shapes:
        tokens = args.tokens or [DEFAULT_TOKENS.get(shape, 2048)]
        rows += bench_experts(
            shape,
            tokens,
            args.kept,
            implementations=args.implementations,
            device=args.device,
            dtype=dtype,
            repeats=args.repeats,
            warmup=args.warmup,
            clock=args.clock,
        )
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(
        f"device {device}, {torch.get_num_threads()} threads, {args.dtype}, median of {args.repeats} repeats"
    )
    print(format_table(rows, clock))


if __name__ == "__main__":
    main()
