"""Time of the BIP solve next to the whole MoE layer forward, at real MoE layer dimensions.

One decoder layer of a public checkpoint's shape with random weights (``bench_common.REAL_SHAPES``;
default Qwen1.5-MoE-A2.7B: hidden 2048, 60 routed experts of intermediate 1408, top-4, shared
expert of intermediate 5632). For each n (tokens) it times, interleaved, median of the repeats:

* the MoE block forward with the model's own routing (router + routed experts + shared expert),
* the BIP solve alone (``BIPLayer.update_duals``: T dual rounds plus the overload check) for each T,
* with ``--end-to-end``, the MoE block forward with BIP routing at the default T (update="before",
  training mode: the solve runs inside the forward),

and prints them side by side with the solve's share of the layer time. A second table shows how the
solve grows with the number of experts m at fixed n. ``--quality`` instead measures what the solver
achieves: the objective against the exact optimum (scipy HiGHS) and the MaxVio over a stream of skewed
batches with q warm-started from batch to batch, for our reading of the update rules and for the
literal rules of the issue (``p = max(0, (k+1)-th)``, ``q = max(0, (C+1)-th)``). Run::

    python scripts/bench_bip_overhead.py                       # n = 512..4096, T = 1..8
    python scripts/bench_bip_overhead.py --tokens 512 --json out.json
    python scripts/bench_bip_overhead.py --shape deepseek-v3 --device cuda --dtype bfloat16 --tokens 4096 65536
    python scripts/bench_bip_overhead.py --quality

On CPU the clock is process CPU time (1 torch thread by default: other jobs on a shared machine do
not count); on CUDA, events around each call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REAL_SHAPES, Deadline, build_model, measure  # noqa: E402

from hf_moe_routing import BIPConfig, original_routing, patch_model  # noqa: E402
from hf_moe_routing.core.context import RoutingContext  # noqa: E402
from hf_moe_routing.core.ops import max_vio, tokens_per_expert  # noqa: E402
from hf_moe_routing.methods.bip.solver import (  # noqa: E402
    assign,
    bip_round,
    expert_capacity,
    solve_duals,
)
from hf_moe_routing.patching import describe  # noqa: E402


def bench_solve_share(
    shape: str = "qwen1.5-moe-a2.7b",
    tokens: list[int] = (512, 1024, 2048, 4096),
    iters: list[int] = (1, 2, 4, 8),
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    warmup: int = 1,
    clock: str = "cpu",
    end_to_end: bool = False,
    tiny: bool = False,
    deadline: Deadline | None = None,
) -> list[dict]:
    """One row per n: the MoE block forward (own routing) and the BIP solve at each T, median seconds.

    Token counts run in the given order; those left when ``deadline`` has passed get a ``skipped`` row.
    """
    model = build_model(shape, layers=1, device=device, dtype=dtype, tiny=tiny)
    patch_model(model, BIPConfig(update="before"))  # for --end-to-end; the own routing via original_routing
    described = describe(model)
    block = described.blocks[0]
    spec, router = block.spec, block.router
    solvers = {  # stand-alone layers (not in the model), one per T, each with its own warm-started q
        t: BIPConfig(num_iters=t, max_extra_iters=0, update="before")
        .create_layer(block, described, RoutingContext())
        .to(device)
        for t in iters
    }
    hidden_size = model.config.hidden_size
    rows = []
    for n in tokens:
        if deadline is not None and deadline.passed():
            rows.append({"shape": shape, "tokens": n, "skipped": "time budget used up"})
            continue
        generator = torch.Generator().manual_seed(n)
        hidden = torch.randn(1, n, hidden_size, generator=generator).to(device, dtype)
        with torch.no_grad():
            logits = spec.logits(router, hidden.reshape(n, hidden_size))
            base = logits if spec.kind.selects_on_logits else spec.scores(logits)

        def own_routing(hidden=hidden):
            with torch.no_grad(), original_routing(model):
                block.block(hidden)

        def bip_routing(hidden=hidden):  # training mode: the solve runs in the forward
            model.train()
            with torch.no_grad():
                block.block(hidden)
            model.eval()

        cases = {"layer": own_routing}
        cases.update(
            {
                f"T={t}": lambda layer=layer, base=base: layer.update_duals(base, None)
                for t, layer in solvers.items()
            }
        )
        if end_to_end:
            cases["bip_layer"] = bip_routing
        times = measure(cases, device=device, repeats=repeats, warmup=warmup, clock=clock, deadline=deadline)
        layer_s = statistics.median(times["layer"])
        row = {
            "shape": shape,
            "tokens": n,
            "num_experts": spec.num_experts,
            "top_k": spec.top_k,
            "layer_forward_s": layer_s,
            "solve_s": {t: statistics.median(times[f"T={t}"]) for t in iters},
            "repeats": len(times["layer"]),
        }
        row["solve_share"] = {t: v / layer_s for t, v in row["solve_s"].items()}
        if end_to_end:
            row["bip_layer_forward_s"] = statistics.median(times["bip_layer"])
        rows.append(row)
    return rows


def bench_solve_by_experts(
    experts: list[int], tokens: int, *, device: str = "cpu", repeats: int = 30, clock: str = "cpu"
) -> list[dict]:
    """The bare solve (k=4, default T) on random softmax scores, by number of experts m."""
    default_t = BIPConfig().num_iters
    rows = []
    for m in experts:
        scores = torch.randn(tokens, m, device=device).softmax(-1)
        capacity = expert_capacity(tokens, m, 4)

        def solve(scores=scores, m=m, capacity=capacity):
            solve_duals(scores, torch.zeros(m, device=device), 4, capacity, default_t)

        times = measure({"solve": solve}, device=device, repeats=repeats, clock=clock)
        rows.append({"experts": m, "tokens": tokens, "solve_s": statistics.median(times["solve"])})
    return rows


def literal_round(scores: torch.Tensor, q: torch.Tensor, k: int, capacity: int) -> torch.Tensor:
    """The issue's literal rules: ``p = max(0, (k+1)-th of s - q)``, ``q = max(0, (C+1)-th of s - p)``."""
    p = (scores - q).topk(k + 1, dim=1).values[:, k].clamp_min(0)
    return (scores - p[:, None]).topk(capacity + 1, dim=0).values[capacity].clamp_min(0)


def skewed_batch(n: int, m: int, generator: torch.Generator, skew: float = 2.0) -> torch.Tensor:
    logits = torch.randn(n, m, generator=generator) + torch.linspace(0, skew, m)
    return logits.softmax(-1)


def quality(args: argparse.Namespace) -> dict:
    """Objective vs HiGHS, and MaxVio over a warm-started stream, for both readings of the rules."""
    import numpy as np
    import scipy.sparse as sp
    from scipy.optimize import Bounds, LinearConstraint, milp

    out: dict = {"exactness": [], "stream": []}
    print("Exactness against scipy HiGHS (milp), cold start, T=4 plus extra rounds while overloaded")
    print(
        f"{'n':>5} {'m':>4} {'k':>3} {'C':>4} {'objective/opt':>14} {'overload':>9} {'rounds':>7} {'top-k overload':>15}"
    )
    g = torch.Generator().manual_seed(0)
    for n, m, k in [(300, 8, 1), (240, 8, 2), (300, 16, 2), (200, 16, 6), (200, 64, 1), (256, 64, 6)]:
        logits = (
            torch.randn(n, m, generator=g) * 1.5 + torch.linspace(0, 3.0, m)[torch.randperm(m, generator=g)]
        )
        scores = logits.softmax(-1)
        capacity = expert_capacity(n, m, k)
        a = sp.vstack([sp.kron(sp.identity(n), np.ones((1, m))), sp.kron(np.ones((1, n)), sp.identity(m))])
        lower = np.concatenate([np.full(n, k), np.full(m, -np.inf)])
        upper = np.concatenate([np.full(n, k), np.full(m, capacity)])
        best = milp(
            -scores.double().flatten().numpy(),
            constraints=LinearConstraint(a.tocsr(), lower, upper),
            integrality=np.ones(n * m),
            bounds=Bounds(0, 1),
        )
        result = solve_duals(scores, torch.zeros(m), k, capacity, 4, tolerance=1, max_extra_iters=64)
        ratio = scores.gather(1, result.index).sum().item() / -best.fun
        topk_over = int(tokens_per_expert(scores.topk(k, 1).indices, m).max()) - capacity
        out["exactness"].append(
            dict(
                n=n,
                m=m,
                k=k,
                capacity=capacity,
                ratio=ratio,
                overload=result.overload,
                rounds=result.rounds,
                topk_overload=topk_over,
            )
        )
        print(
            f"{n:>5} {m:>4} {k:>3} {capacity:>4} {ratio:>14.4f} {result.overload:>9} {result.rounds:>7} {topk_over:>15}"
        )

    print("\nMaxVio over a stream of 40 skewed batches (q warm-started), mean / max over batches 2..40")
    print(
        f"{'n':>5} {'m':>4} {'k':>3} {'T':>3} {'literal rules':>15} {'ours, T rounds':>15} {'ours + extra':>13} {'top-k':>7}"
    )
    for n, m, k in [(512, 16, 2), (1024, 64, 6)]:
        capacity = expert_capacity(n, m, k)
        for t in args.iters:
            g = torch.Generator().manual_seed(1)
            q_lit, q_ours, q_extra = torch.zeros(m), torch.zeros(m), torch.zeros(m)
            vios: dict[str, list[float]] = {"literal": [], "ours": [], "extra": [], "topk": []}
            for _ in range(40):
                scores = skewed_batch(n, m, g)
                for _ in range(t):
                    q_lit = literal_round(scores, q_lit, k, capacity)
                    q_ours = bip_round(scores, q_ours, k, capacity)
                tol = max(1, int(BIPConfig().tolerance * capacity))
                q_extra = solve_duals(scores, q_extra, k, capacity, t, tolerance=tol, max_extra_iters=16).q
                for name, q in (("literal", q_lit), ("ours", q_ours), ("extra", q_extra)):
                    vios[name].append(max_vio(tokens_per_expert(assign(scores, q, k), m)))
                vios["topk"].append(max_vio(tokens_per_expert(scores.topk(k, 1).indices, m)))
            cells = {name: (sum(v[1:]) / len(v[1:]), max(v[1:])) for name, v in vios.items()}
            out["stream"].append(
                dict(
                    n=n,
                    m=m,
                    k=k,
                    T=t,
                    **{f"{a}_mean": b[0] for a, b in cells.items()},
                    **{f"{a}_max": b[1] for a, b in cells.items()},
                )
            )
            text = " ".join(
                f"{cells[name][0]:>7.3f}/{cells[name][1]:<6.3f}" for name in ("literal", "ours", "extra")
            )
            print(f"{n:>5} {m:>4} {k:>3} {t:>3} {text} {cells['topk'][0]:>7.3f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="qwen1.5-moe-a2.7b", choices=list(REAL_SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--iters", type=int, nargs="+", default=list(range(1, 9)))
    parser.add_argument(
        "--experts", type=int, nargs="+", default=[16, 60, 128, 256], help="m for the solve-only table"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--json", help="also write the measurements to this JSON file")
    parser.add_argument(
        "--end-to-end", action="store_true", help="also time the BIP-routed layer forward at the default T"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: CPU time then counts no idle spinning)",
    )
    parser.add_argument("--quality", action="store_true", help="measure solver quality instead of time")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quality:
        results = quality(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return
    default_t = BIPConfig().num_iters
    on_cuda = args.device.startswith("cuda")
    dims = REAL_SHAPES[args.shape].dims
    print(
        f"device={args.device} ({'CUDA events' if on_cuda else 'process CPU time'}) "
        f"threads={torch.get_num_threads()} {args.dtype} layer {args.shape}: {dims}"
    )
    rows = bench_solve_share(
        args.shape,
        args.tokens,
        args.iters,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        repeats=args.repeats,
        end_to_end=args.end_to_end,
    )
    print(
        f"\nBIP solve time in ms (and % of the layer forward), median of {args.repeats}, default T={default_t}"
    )
    print(f"{'n':>6} {'layer fwd ms':>13} " + " ".join(f"{'T=' + str(t):>14}" for t in args.iters))
    for row in rows:
        cells = [f"{row['solve_s'][t] * 1e3:6.1f} ({100 * row['solve_share'][t]:4.1f}%)" for t in args.iters]
        print(
            f"{row['tokens']:>6} {row['layer_forward_s'] * 1e3:13.1f} " + " ".join(f"{c:>14}" for c in cells)
        )
        if "bip_layer_forward_s" in row:
            change = 100 * (row["bip_layer_forward_s"] / row["layer_forward_s"] - 1)
            print(
                f"{'':>6} BIP-routed layer forward at T={default_t}: "
                f"{row['bip_layer_forward_s'] * 1e3:.1f} ms ({change:+.1f}%)"
            )
    n = max(args.tokens)
    print(f"\nBIP solve time in ms by number of experts m (n={n}, k=4, T={default_t}; random softmax scores)")
    by_experts = bench_solve_by_experts(args.experts, n, device=args.device, repeats=10 * args.repeats)
    for row in by_experts:
        print(f"  m={row['experts']:>4}: {row['solve_s'] * 1e3:7.2f} ms")
    if args.json:
        results = {
            "device": args.device,
            "threads": torch.get_num_threads(),
            "default_T": default_t,
            "shape": args.shape,
            "by_tokens": rows,
            "by_experts": by_experts,
        }
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
