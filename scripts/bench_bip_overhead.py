"""Time of the BIP solve next to the whole MoE layer forward, at Qwen1.5-MoE-A2.7B layer dimensions.

One Qwen2-MoE block with random weights (hidden 2048, 60 routed experts of intermediate 1408, top-4,
shared expert of intermediate 5632 = 4 x 1408), float32. For each n (tokens) it times

* the MoE layer forward with the model's own Top-K routing (router + routed experts + shared expert),
* the BIP solve alone (``BIPLayer.update_duals``: T dual rounds plus the overload check) for T = 1..8,
* the MoE layer forward with BIP routing at the default T (update="before", training mode),

and prints them side by side with the solve's share of the layer time. A second table shows how the
solve grows with the number of experts m at fixed n. ``--quality`` instead measures what the solver
achieves: the objective against the exact optimum (scipy HiGHS) and the MaxVio over a stream of skewed
batches with q warm-started from batch to batch, for our reading of the update rules and for the
literal rules of the issue (``p = max(0, (k+1)-th)``, ``q = max(0, (C+1)-th)``). Run::

    python scripts/bench_bip_overhead.py                       # n = 512..4096, T = 1..8
    python scripts/bench_bip_overhead.py --tokens 512 --json out.json
    python scripts/bench_bip_overhead.py --quality
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch
from transformers import AutoModelForCausalLM, Qwen2MoeConfig

from hf_moe_routing import BIPConfig, TopKConfig, patch_model, routing_layers
from hf_moe_routing.core.ops import max_vio, tokens_per_expert
from hf_moe_routing.methods.bip.layer import BIPLayer
from hf_moe_routing.methods.bip.solver import (
    assign,
    bip_round,
    expert_capacity,
    solve_duals,
)

QWEN15_MOE_LAYER = dict(
    hidden_size=2048,
    num_experts=60,
    moe_intermediate_size=1408,
    num_experts_per_tok=4,
    shared_expert_intermediate_size=5632,
    intermediate_size=5632,
    norm_topk_prob=False,
)


def timed(fn, repeats: int, clock=time.perf_counter) -> float:
    """Best time of ``fn()`` over ``repeats`` calls, in seconds (after one warm-up call).

    The minimum, not the median: other processes only ever add time. On CPU the clock is the
    process's CPU time (``time.process_time``, all threads), so that other jobs on a shared machine
    do not count; on CUDA it is wall time around a synchronised call.
    """
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def one_layer_model(device: str):
    config = Qwen2MoeConfig(
        vocab_size=256,
        num_hidden_layers=1,
        num_attention_heads=16,
        num_key_value_heads=16,
        **QWEN15_MOE_LAYER,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight.normal_(0.0, 0.02)
    return model


def layer_forward(block: torch.nn.Module, hidden: torch.Tensor, sync) -> None:
    with torch.no_grad():
        block(hidden)
    sync()


def bip_update(layer: BIPLayer, gate: torch.nn.Module, scores: torch.Tensor, sync) -> None:
    with torch.no_grad():
        layer.update_duals(gate, scores, None)
    sync()


def bare_solve(scores: torch.Tensor, k: int, capacity: int, num_iters: int, sync) -> None:
    solve_duals(scores, torch.zeros(scores.shape[1], device=scores.device), k, capacity, num_iters)
    sync()


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
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--iters", type=int, nargs="+", default=list(range(1, 9)))
    parser.add_argument(
        "--experts", type=int, nargs="+", default=[16, 60, 128, 256], help="m for the solve-only table"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    clock = time.perf_counter if on_cuda else time.process_time

    model = one_layer_model(args.device)
    block = model.model.layers[0].mlp
    gate = block.router
    print(
        f"device={args.device} ({'wall' if on_cuda else 'process CPU'} time) threads={torch.get_num_threads()} layer: hidden 2048, 60 x 1408, top-4, shared 5632"
    )
    print(f"\nBIP solve time in ms (and % of the Top-K layer forward), default T={default_t}")
    print(f"{'n':>6} {'layer fwd ms':>13} " + " ".join(f"{'T=' + str(t):>14}" for t in args.iters))
    results = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "default_T": default_t,
        "by_tokens": [],
    }
    for n in args.tokens:
        hidden = torch.randn(1, n, 2048, device=args.device)
        patch_model(model, TopKConfig(), replace=True)
        layer_s = timed(partial(layer_forward, block, hidden, sync), args.repeats, clock)
        with torch.no_grad():
            scores = torch.softmax(gate.routing.adapter.logits(gate, hidden).float(), dim=-1)
        row = {"tokens": n, "layer_forward_s": layer_s, "solve_s": {}}
        cells = []
        for t in args.iters:
            patch_model(model, BIPConfig(num_iters=t, max_extra_iters=0, update="before"), replace=True)
            solve_s = timed(
                partial(bip_update, routing_layers(model)[0], gate, scores, sync), args.repeats * 10, clock
            )
            row["solve_s"][t] = solve_s
            cells.append(f"{solve_s * 1e3:6.1f} ({100 * solve_s / layer_s:4.1f}%)")
        results["by_tokens"].append(row)
        print(f"{n:>6} {layer_s * 1e3:13.1f} " + " ".join(f"{c:>14}" for c in cells), flush=True)
        if args.end_to_end:  # BIP-routed layer forward at the default T (training mode, solve included)
            patch_model(model, BIPConfig(update="before"), replace=True)
            model.train()
            bip_s = timed(partial(layer_forward, block, hidden, sync), args.repeats, clock)
            model.eval()
            row["bip_layer_forward_s"] = bip_s
            change = 100 * (bip_s / layer_s - 1)
            print(f"{'':>6} BIP-routed layer forward at T={default_t}: {bip_s * 1e3:.1f} ms ({change:+.1f}%)")
    del model, block, gate

    n = max(args.tokens)
    print(f"\nBIP solve time in ms by number of experts m (n={n}, k=4, T={default_t}; random softmax scores)")
    results["by_experts"] = []
    for m in args.experts:
        scores = torch.randn(n, m, device=args.device).softmax(-1)
        solve_s = timed(
            partial(bare_solve, scores, 4, expert_capacity(n, m, 4), default_t, sync),
            args.repeats * 10,
            clock,
        )
        results["by_experts"].append({"experts": m, "tokens": n, "solve_s": solve_s})
        print(f"  m={m:>4}: {solve_s * 1e3:7.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
