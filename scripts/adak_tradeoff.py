"""Ada-K against static top-k, top-p and dynamic skipping at matched compute, over seeds, on the reference models.

For each reference model (``hf_moe_routing.training.reference``), on the same held-out WikiText-2 test rows and
under the same weighting rule for every method (the family's own rule over the kept experts):

* ``static-k``: the model's routing with k = 1 .. top_k - 1 experts (``TopKConfig``);
* ``top-p``: Huang et al. 2024 at several p, capped at the model's top-k (``TopPConfig(max_k=top_k)``);
* ``dyn-skip``: Lu et al. 2024 with ``beta_l`` calibrated on training text at several quantiles
  (``DynamicSkipConfig(renormalize=<the family renormalises>)``), one calibration sample per seed; on families that renormalise,
  the paper's weights (``renormalize=False``) are added as ``dyn-skip (paper weights)``;
* ``ada-k (ours)``: our defaults with ``target_experts`` = each ``--fractions`` of the model's top-k;
* ``ada-k (paper)``: the paper's settings (``AdaKConfig.paper(k_max=<all experts>)``, P-Warm, Top-K baseline,
  hand-set lambda, ``--paper-steps`` PPO steps) at each ``--paper-lambdas``.

Every Ada-K setting runs with each ``--seeds`` (training data order, initialisation and k sampling). The
summary compares each Ada-K run with every baseline *at the same mean routed experts* (linear interpolation of
the baseline's perplexity curve) and reports mean and spread over seeds.

Writes ``<out>/<model>/runs.jsonl`` (one line per evaluated routing; finished runs are skipped when the script is
run again), ``<out>/<model>/adapters/`` (the Ada-K routing adapters), and ``<out>/results.json``,
``<out>/tradeoff.md`` and ``<out>/pareto.png`` (routed experts vs perplexity, seed spread as error bars).

    python scripts/adak_tradeoff.py --models mixtral-8x2 qwen-moe mixtral-8x2-large --seeds 0 1 2 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from adak_common import append_jsonl, evaluate, load, read_jsonl, set_threads, train_adak

from hf_moe_routing import AdaKConfig, DynamicSkipConfig, TopKConfig, TopPConfig, patch_model, unpatch_model
from hf_moe_routing.evaluation.evaluate import token_expert_counts
from hf_moe_routing.methods.dynamic_skip import calibrate
from hf_moe_routing.methods.routing import selectable_experts, weights_depend_on_chosen_set
from hf_moe_routing.patching import describe

BASELINES = ("static-k", "top-p", "dyn-skip")
ADAK = ("ada-k (ours)", "ada-k (paper)")


def run_model(name: str, args: argparse.Namespace, out: Path) -> None:
    path = out / name / "runs.jsonl"
    done = {(r["method"], r["setting"], r.get("seed")) for r in read_jsonl(path)}
    base, _, train, held_out = load(name, eval_rows=args.eval_rows, data_dir=args.data_dir)
    top_k = base.config.num_experts_per_tok
    family_renormalises = weights_depend_on_chosen_set(describe(base).blocks[0].spec)

    def record(model, method: str, setting: str, seed: int | None = None, **extra: Any) -> None:
        row = {
            "model": name,
            "method": method,
            "setting": setting,
            "seed": seed,
            **evaluate(model, held_out),
            **extra,
        }
        append_jsonl(path, row)
        print(
            f"{name:<12} {method:<22} {setting:<24} seed {seed}: ppl {row['perplexity']:8.3f} "
            f"({100 * row['perplexity_change']:+6.2f}%)  k {row['mean_activated']:.3f}/{top_k}",
            flush=True,
        )

    def todo(method: str, setting: str, seed: int | None = None) -> bool:
        return (method, setting, seed) not in done

    if todo("topk", "model"):
        record(base, "topk", "model")
    for k in range(1, top_k):
        if todo("static-k", f"k={k}"):
            record(patch_model(base, TopKConfig(top_k=k)), "static-k", f"k={k}")
            unpatch_model(base)
    for p in args.top_p:
        if todo("top-p", f"p={p}"):
            record(patch_model(base, TopPConfig(p=p, max_k=top_k)), "top-p", f"p={p}")
            unpatch_model(base)
    # the family's own rule over the kept experts: renormalise exactly where the family's weights depend on the
    # chosen set (Mixtral); on Qwen-MoE (norm_topk_prob=False) renormalize=True is refused as a no-op
    skip_variants = [("dyn-skip", family_renormalises)] + (
        [("dyn-skip (paper weights)", False)] if family_renormalises else []
    )
    for seed in args.seeds:
        calibration = train.shuffle(seed=seed).select(range(args.batch_size * args.calibration_batches))
        for method, renormalize in skip_variants:
            for q in args.skip_quantiles:
                if todo(method, f"q={q}", seed):
                    patch_model(base, DynamicSkipConfig(quantile=q, renormalize=renormalize))
                    calibrate(base, calibration, batch_size=args.batch_size, progress=False)
                    record(base, method, f"q={q}", seed)
                    unpatch_model(base)
    for seed in args.seeds:
        for fraction in args.fractions:
            setting = f"target={fraction:g}"
            if todo("ada-k (ours)", setting, seed):
                train_and_record(
                    base,
                    train,
                    held_out,
                    record,
                    "ada-k (ours)",
                    setting,
                    seed,
                    out / name,
                    args,
                    AdaKConfig(),
                    max_steps=args.steps,
                    target_experts=fraction * top_k,
                )
        k_max = selectable_experts(describe(base).blocks[0].spec)
        for lam in args.paper_lambdas:
            setting = f"lambda={lam:g}"
            if todo("ada-k (paper)", setting, seed):
                train_and_record(
                    base,
                    train,
                    held_out,
                    record,
                    "ada-k (paper)",
                    setting,
                    seed,
                    out / name,
                    args,
                    AdaKConfig.paper(k_max=k_max),
                    warmup="p-warm",
                    baseline="topk",
                    k_penalty=lam,
                    max_steps=args.paper_steps,
                    warmup_steps=args.paper_warmup_steps,
                )


def train_and_record(
    base, train, held_out, record, method, setting, seed, folder, args, adak_config, **settings
):
    model = copy.deepcopy(base)
    adapter = (
        folder / "adapters" / f"{method.split('(')[1].rstrip(')')}-{setting.replace('=', '')}-seed{seed}"
    )
    info = train_adak(
        model,
        train.shuffle(seed=seed),
        held_out,
        adak_config=adak_config,
        out=adapter,
        seed=seed,
        batch_size=args.batch_size,
        **settings,
    )
    for checkpoint in adapter.glob("checkpoint-*"):  # keep the adapter files only
        shutil.rmtree(checkpoint)
    log = info.pop("log")
    counts = torch.cat(
        list(token_expert_counts(model, held_out, batch_size=args.batch_size)["counts"].values())
    )
    k_hist = {
        str(k): v for k, v in enumerate((torch.bincount(counts).double() / counts.numel()).tolist()) if v > 0
    }
    record(
        model,
        method,
        setting,
        seed,
        train_seconds=info["train_seconds"],
        final_k_penalty=info["final_k_penalty"],
        warmup_p=info["warmup_p"],
        adapter=str(adapter),
        k_hist=k_hist,
        ppo_log=[
            {
                k: e.get(k)
                for k in (
                    "step",
                    "greedy_k_mean",
                    "k_penalty",
                    "reward",
                    "clip_fraction",
                    "advantage_std",
                    "signal_to_noise_per_layer",
                )
            }
            for e in log
        ],
    )


# ---- summary ---------------------------------------------------------------------------------------
def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """The y of a piecewise-linear curve through ``points`` (x sorted) at ``x`` (None outside its range)."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def curves(runs: list[dict[str, Any]], method: str) -> list[list[tuple[float, float]]]:
    """The baseline's (mean experts, ppl change) curve, one per seed (one in all for seedless methods)."""
    seeds = sorted({r["seed"] for r in runs if r["method"] == method}, key=lambda s: (s is None, s))
    out = []
    topk = next(r for r in runs if r["method"] == "topk")
    for seed in seeds:
        points = [
            (r["mean_activated"], r["perplexity_change"])
            for r in runs
            if r["method"] == method and r["seed"] == seed
        ]
        points.append((topk["mean_activated"], 0.0))  # every baseline meets Top-K at top_k
        out.append(points)
    return out


def stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and Ada-K setting: mean/spread over seeds, and each baseline at the same routed experts."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == model]
        methods = [m for m in dict.fromkeys(r["method"] for r in mine) if m not in ("topk",) + ADAK]
        for method in ADAK:
            for setting in dict.fromkeys(r["setting"] for r in mine if r["method"] == method):
                group = [r for r in mine if r["method"] == method and r["setting"] == setting]
                row = {
                    "model": model,
                    "method": method,
                    "setting": setting,
                    "seeds": [r["seed"] for r in group],
                    "top_k": group[0]["top_k"],
                    "mean_activated": stats([r["mean_activated"] for r in group]),
                    "activation_reduction": stats([r["activation_reduction"] for r in group]),
                    "perplexity_change": stats([r["perplexity_change"] for r in group]),
                }
                if setting.startswith("target="):
                    target = float(setting.split("=")[1]) * group[0]["top_k"]
                    row["budget_error"] = stats([r["mean_activated"] / target - 1 for r in group])
                for baseline in methods:
                    gaps = []
                    for r in group:  # each Ada-K seed against each baseline seed, at the same routed experts
                        for curve in curves(mine, baseline):
                            value = interpolate(curve, r["mean_activated"])
                            if value is not None:
                                gaps.append(value)
                    if gaps:
                        row[f"{baseline} at matched compute"] = stats(gaps)
                rows.append(row)
    return rows


def _pct(s: dict[str, float]) -> str:
    return f"{100 * s['mean']:+.2f}% ± {100 * s['std']:.2f}"


def write_tables(results: dict[str, Any], out: Path) -> str:
    lines: list[str] = []
    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in results["summary"]:
        by_model.setdefault(row["model"], []).append(row)
    for model, rows in by_model.items():
        baselines = sorted(
            {k.split(" at matched")[0] for r in rows for k in r if k.endswith("at matched compute")}
        )
        lines += [f"### {model} (perplexity change vs Top-K; mean ± std over seeds)", ""]
        lines.append(
            "| Ada-K | setting | seeds | routed experts | fewer | ppl change | "
            + " | ".join(f"{b} at same experts" for b in baselines)
            + " |"
        )
        lines.append("| --- | --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(baselines))
        for r in rows:
            cells = [r.get(f"{b} at matched compute") for b in baselines]
            lines.append(
                f"| {r['method']} | {r['setting']} | {len(r['seeds'])} | {r['mean_activated']['mean']:.3f} ± "
                f"{r['mean_activated']['std']:.3f} / {r['top_k']} | {100 * r['activation_reduction']['mean']:.1f}% | "
                f"{_pct(r['perplexity_change'])} | "
                + " | ".join(_pct(c) if c else "n/a" for c in cells)
                + " |"
            )
        lines.append("")
    text = "\n".join(lines) + "\n"
    (out / "tradeoff.md").write_text(text)
    return text


def plot(results: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    models = list(dict.fromkeys(r["model"] for r in runs))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    colors = {
        "static-k": "tab:gray",
        "top-p": "tab:orange",
        "dyn-skip": "tab:green",
        "dyn-skip (paper weights)": "tab:olive",
        "ada-k (paper)": "tab:purple",
        "ada-k (ours)": "tab:blue",
    }
    for ax, model in zip(axes[0], models):
        mine = [r for r in runs if r["model"] == model]
        topk = next(r for r in mine if r["method"] == "topk")
        ax.plot([topk["mean_activated"]], [0.0], "k*", markersize=12, label="Top-K (model)")
        for method in colors:
            group = [r for r in mine if r["method"] == method]
            if not group:
                continue
            by_setting: dict[str, list[dict[str, Any]]] = {}
            for r in group:
                by_setting.setdefault(r["setting"], []).append(r)
            xs, ys, xe, ye = [], [], [], []
            for setting_runs in by_setting.values():
                x = [r["mean_activated"] for r in setting_runs]
                y = [100 * r["perplexity_change"] for r in setting_runs]
                xs.append(statistics.fmean(x))
                ys.append(statistics.fmean(y))
                xe.append(statistics.stdev(x) if len(x) > 1 else 0.0)
                ye.append(statistics.stdev(y) if len(y) > 1 else 0.0)
            order = sorted(range(len(xs)), key=lambda i: xs[i])
            adak = method.startswith("ada-k")
            ax.errorbar(
                [xs[i] for i in order],
                [ys[i] for i in order],
                xerr=[xe[i] for i in order],
                yerr=[ye[i] for i in order],
                color=colors[method],
                marker="o" if adak else "s",
                markersize=7 if adak else 4,
                linestyle="none" if adak else "-",
                capsize=3,
                label=method,
            )
        top_k = topk["top_k"]
        ax.axhline(1.0, color="tab:red", linestyle=":", linewidth=1, label="+1% perplexity")
        ax.axvline(0.7 * top_k, color="tab:gray", linestyle=":", linewidth=1, label="30% fewer experts")
        low = min(100 * r["perplexity_change"] for r in mine)
        ax.set_ylim(min(low, 0) - 0.3, 6.0)
        ax.set_xlabel("mean routed experts per token (over MoE layers)")
        ax.set_ylabel("held-out perplexity change vs Top-K (%)")
        ax.set_title(f"{model} (WikiText-2 test, {topk['num_tokens']} tokens)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "pareto.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["mixtral-8x2", "qwen-moe", "mixtral-8x2-large"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--fractions", nargs="*", type=float, default=[0.7, 0.6], help="target_experts / top-k (none: skip)"
    )
    parser.add_argument("--steps", type=int, default=100, help="PPO steps of our defaults")
    parser.add_argument("--paper-lambdas", nargs="*", type=float, default=[0.01, 0.03], help="(none: skip)")
    parser.add_argument("--paper-steps", type=int, default=150)
    parser.add_argument("--paper-warmup-steps", type=int, default=100)
    parser.add_argument("--top-p", nargs="+", type=float, default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--skip-quantiles", nargs="+", type=float, default=[0.2, 0.35, 0.5, 0.65, 0.8, 0.9])
    parser.add_argument("--eval-rows", type=int, default=64, help="held-out rows of 128 tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="results/adak_tradeoff")
    parser.add_argument("--replot", action="store_true", help="only rebuild results.json, tables and plot")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.replot:
        for name in args.models:
            started = time.perf_counter()
            run_model(name, args, out)
            print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    runs = [r for path in sorted(out.glob("*/runs.jsonl")) for r in read_jsonl(path)]
    if not runs:
        raise FileNotFoundError(f"No <model>/runs.jsonl under {out}: run the trade-off first.")
    results = {
        "config": {k: v for k, v in vars(args).items() if k != "replot"},
        "summary": summarize(runs),
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(write_tables(results, out))
    print(f"wrote {out / 'results.json'}, {out / 'tradeoff.md'}, {plot(results, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
