"""The demo's headline over seeds and thread counts: does its story hold?

Runs ``hf-moe-routing demo`` (each run in its own process, with ``OMP_NUM_THREADS`` / torch threads
set) for every seed and thread count and reports, as mean and standard deviation over all runs and
per thread count:

* BIP: held-out AvgMaxVio under Top-K and under BIP, and BIP's perplexity change,
* Ada-K: fewer routed experts per token, and Ada-K's perplexity change,
* wall and CPU time of the whole demo.

    python scripts/demo_seeds.py --seeds 0 1 2 --threads 1 2
    python scripts/demo_seeds.py --size quick --seeds 0 --threads 1      # a smoke test

Writes ``<out>/runs.json`` and ``<out>/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_demo(seed: int, threads: int, size: str, out: Path) -> dict[str, Any]:
    folder = out / f"seed{seed}-threads{threads}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "hf_moe_routing.cli.main", "demo", "--output-dir", str(folder)]
    command += ["--overwrite", "--quiet", "--seed", str(seed), "--size", size, "--no-plot"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = json.loads((folder / "report.json").read_text())
    bip, adak = report["bip"], report["adak"]
    return {
        "seed": seed,
        "threads": threads,
        "topk_perplexity": bip["topk_perplexity"],
        "topk_avg_max_vio": bip["topk_avg_max_vio"],
        "bip_avg_max_vio": bip["avg_max_vio"],
        "bip_perplexity_change": bip["perplexity"] / bip["topk_perplexity"] - 1.0,
        "adak_fewer_experts": adak["activation_reduction"],
        "adak_fewer_flops": adak["flops_reduction"],
        "adak_perplexity_change": adak["perplexity_change"],
        "wall_s": wall,
        "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    }


COLUMNS = {
    "topk_avg_max_vio": ("Top-K AvgMaxVio", "{:.3f}"),
    "bip_avg_max_vio": ("BIP AvgMaxVio", "{:.3f}"),
    "bip_perplexity_change": ("BIP perplexity", "{:+.2%}"),
    "adak_fewer_experts": ("Ada-K fewer experts", "{:.1%}"),
    "adak_perplexity_change": ("Ada-K perplexity", "{:+.2%}"),
    "wall_s": ("wall s", "{:.0f}"),
    "cpu_s": ("CPU s", "{:.0f}"),
}


def summary(runs: list[dict[str, Any]]) -> str:
    def cell(rows: list[dict[str, Any]], key: str, fmt: str) -> str:
        values = [r[key] for r in rows]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(sd).lstrip('+')}"

    groups = {
        f"{t} thread{'s' if t > 1 else ''}": [r for r in runs if r["threads"] == t]
        for t in sorted({r["threads"] for r in runs})
    }
    groups["all runs"] = runs
    lines = ["| runs | " + " | ".join(name for name, _ in COLUMNS.values()) + " |"]
    lines.append("| --- |" + " ---: |" * len(COLUMNS))
    for label, rows in groups.items():
        lines.append(
            f"| {label} (n={len(rows)}) | "
            + " | ".join(cell(rows, k, f) for k, (_, f) in COLUMNS.items())
            + " |"
        )
    lines.append("")
    lines.append(
        "Per run (seed, threads): "
        + "; ".join(
            f"({r['seed']}, {r['threads']}) BIP {r['bip_perplexity_change']:+.2%} / {r['bip_avg_max_vio']:.3f}, "
            f"Ada-K -{r['adak_fewer_experts']:.1%} at {r['adak_perplexity_change']:+.2%}"
            for r in runs
        )
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--size", default="default", choices=("default", "quick"))
    parser.add_argument("--out", default="results/demo_seeds")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        for threads in args.threads:
            runs.append(run_demo(seed, threads, args.size, out / "runs"))
            print(json.dumps(runs[-1]), flush=True)
    (out / "runs.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2) + "\n")
    text = summary(runs)
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
