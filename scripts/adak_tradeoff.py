"""Accuracy / compute trade-off of Ada-K against dynamic-k baselines on the pre-trained reference models.

For each reference model (``hf_moe_routing.training.reference``: "mixtral-8x2", "qwen-moe") the same held-out
WikiText-2 test rows are evaluated with :func:`hf_moe_routing.evaluation.evaluate.evaluate_routing` under

* Top-K (the model's own routing) and static top-k for k = 1 .. top_k + 1;
* top-p routing (Huang et al. 2024) at several p;
* dynamic skipping (Lu et al. 2024) with beta_l calibrated on training text at several quantiles (0.5 = paper);
* Ada-K (allocators warm-started with P-Warm, then PPO) at several lambda (the expected-k penalty),
  trained on the models' training text (tinyshakespeare + WikiText-2 valid) while the model stays frozen.

Writes ``<model>/runs.json`` (incrementally; models may run as parallel processes with the same ``--out``),
then ``results.json`` (all models found under ``--out``), ``tradeoff.md`` (tables) and ``pareto.png`` (held-out
perplexity against mean activated routed experts) into ``--out``, and the Ada-K routing adapters into
``--out/<model>/adak-lambda<value>``. Targets (issue 4): Ada-K removes >= 30% of routed activations with
perplexity within 1% of Top-K, and no baseline reaches a better perplexity at the same or lower compute.

    python scripts/adak_tradeoff.py --models mixtral-8x2 qwen-moe --lambdas 0.003 0.01 0.03
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hf_moe_routing import DynamicSkipConfig, TopKConfig, TopPConfig, patch_model, unpatch_model
from hf_moe_routing.data import pack_dataset, read_corpus
from hf_moe_routing.evaluation.evaluate import evaluate_routing, token_expert_counts
from hf_moe_routing.methods.dynamic_skip import calibrate
from hf_moe_routing.training.reference import reference_model

SHAPE_OF = {"mixtral-8x2": "mixtral", "qwen-moe": "qwen"}  # layer shapes of bench_adak_speed.py


def k_histogram(model, data, batch_size: int) -> dict[str, float]:
    """Share of (token, layer) pairs that got k experts, over all MoE layers."""
    counts = token_expert_counts(model, data, batch_size=batch_size)["counts"]
    flat = torch.cat(list(counts.values()))
    hist = torch.bincount(flat).double() / flat.numel()
    return {str(k): float(v) for k, v in enumerate(hist.tolist()) if v > 0}


def summarize(result: dict[str, Any], method: str, setting: str) -> dict[str, Any]:
    keep = (
        "perplexity",
        "perplexity_change",
        "mean_activated",
        "activation_reduction",
        "flops_reduction",
        "routed_flops_reduction",
        "activated_per_layer",
        "avg_max_vio",
        "top_k",
        "num_tokens",
        "routing",
    )
    return {"method": method, "setting": setting, **{k: result[k] for k in keep if k in result}}


def train_adak(model, tokenizer, train, eval_rows, lam: float, args, folder: Path) -> dict[str, Any]:
    from hf_moe_routing.methods.adak import AdaKConfig
    from hf_moe_routing.training.adak_trainer import AdaKTrainer, AdaKTrainingConfig

    config = AdaKTrainingConfig(
        output_dir=str(folder / "checkpoints"),
        warmup_steps=args.warmup_steps,
        max_steps=args.ppo_steps,
        k_penalty=lam,
        batch_size=args.batch_size,
        logging_steps=max(1, args.ppo_steps // 5),
        save_total_limit=1,
        eval_batches=2,
        progress_bar=not args.quiet,
        seed=args.seed,
    )
    adak = AdaKConfig(renormalize=args.adak_renormalize == "paper")
    trainer = AdaKTrainer(model, config, train, eval_rows, tokenizer=tokenizer, adak_config=adak)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    trainer.save_adapter(
        folder / "adapter", training_info={"k_penalty": lam, "script": "scripts/adak_tradeoff.py"}
    )
    return {
        "train_seconds": seconds,
        "warmup_p": trainer.state.warmup_p,
        "ppo_steps": args.ppo_steps,
        "warmup_steps": args.warmup_steps,
        "weights": args.adak_renormalize,
        "adapter": str(folder / "adapter"),
    }


def run_model(name: str, args, out: Path) -> None:
    model, tokenizer = reference_model(
        name, args.cache_dir, data_dir=args.data_dir, max_steps=args.reference_steps, progress=not args.quiet
    )
    model.eval()
    eval_rows = pack_dataset(read_corpus("wikitext-2/test", args.data_dir), tokenizer, args.seq_len)
    eval_rows = eval_rows.select(range(min(args.eval_rows, len(eval_rows))))
    train_texts = [t for c in ("tinyshakespeare", "wikitext-2/valid") for t in read_corpus(c, args.data_dir)]
    train = pack_dataset(train_texts, tokenizer, args.seq_len).shuffle(seed=args.seed)
    calib = train.select(range(min(len(train), args.batch_size * args.calibration_batches)))
    runs: list[dict[str, Any]] = []

    def record(method: str, setting: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        res = evaluate_routing(model, eval_rows, batch_size=args.batch_size, progress=False)
        row = {
            "model": name,
            "family_shape": SHAPE_OF.get(name),
            **summarize(res, method, setting),
            **(extra or {}),
        }
        runs.append(row)
        save_model_runs(out, name, runs)
        print(
            f"{name:<12} {method:<12} {setting:<14} ppl {row['perplexity']:8.3f} ({100 * row['perplexity_change']:+6.2f}%)"
            f"  k {row['mean_activated']:.3f}/{row['top_k']}  ({100 * row['activation_reduction']:5.1f}% fewer)",
            flush=True,
        )
        return row

    record("topk", "model")
    top_k = runs[-1]["top_k"]
    for k in range(1, top_k + 2) if not args.skip_baselines else ():
        if k != top_k:
            patch_model(model, TopKConfig(top_k=k))
            record("static-k", f"k={k}")
            unpatch_model(model)
    if args.skip_baselines:
        args.top_p, args.skip_quantiles = [], []
    for p in args.top_p:
        patch_model(model, TopPConfig(p=p))
        record("top-p", f"p={p}")
        unpatch_model(model)
    for q in args.skip_quantiles:
        patch_model(model, DynamicSkipConfig(quantile=q))
        betas = calibrate(model, calib, batch_size=args.batch_size, progress=False)
        record("dyn-skip", f"q={q}", {"betas": betas})
        unpatch_model(model)
    for lam in args.lambdas:
        setting = f"lambda={lam:g} ppo={args.ppo_steps}" + (
            " family-w" if args.adak_renormalize == "family" else ""
        )
        folder = out / name / f"adak-lambda{lam:g}-ppo{args.ppo_steps}-{args.adak_renormalize}"
        info = train_adak(model, tokenizer, train, eval_rows, lam, args, folder)
        row = record("ada-k", setting, info)
        row["k_hist"] = k_histogram(model, eval_rows, args.batch_size)
        save_model_runs(out, name, runs)
        unpatch_model(model)


def save_model_runs(out: Path, name: str, runs: list[dict[str, Any]]) -> None:
    """``<out>/<model>/runs.json``: the runs of one model (models can run in parallel processes).

    Runs already in the file are kept unless this process re-ran the same (method, setting).
    """
    path = out / name / "runs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = [r for r in runs if r["model"] == name]
    done = {(r["method"], r["setting"]) for r in mine}
    old = (
        [r for r in json.loads(path.read_text()) if (r["method"], r["setting"]) not in done]
        if path.is_file()
        else []
    )
    path.write_text(json.dumps(old + mine, indent=2) + "\n")


def collect(out: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Every model's ``runs.json`` under ``out`` merged into one results dict."""
    runs = [r for path in sorted(out.glob("*/runs.json")) for r in json.loads(path.read_text())]
    if not runs:
        raise FileNotFoundError(f"No <model>/runs.json under {out}: run the trade-off first.")
    return {"config": config, "runs": runs, "pareto": pareto_check(runs)}


def pareto_check(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each Ada-K run: the baselines with <= its activated experts and a lower perplexity."""
    checks = []
    for a in (r for r in runs if r["method"] == "ada-k"):
        same = [r for r in runs if r["model"] == a["model"] and r["method"] not in ("ada-k", "topk")]
        better = [
            f"{r['method']} {r['setting']}"
            for r in same
            if r["mean_activated"] <= a["mean_activated"] + 1e-9 and r["perplexity"] < a["perplexity"]
        ]
        target = a["activation_reduction"] >= 0.30 and a["perplexity_change"] <= 0.01
        checks.append(
            {"model": a["model"], "setting": a["setting"], "meets_30pct_1pct": target, "beaten_by": better}
        )
    return checks


def write_tables(results: dict[str, Any], out: Path) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in results["runs"]):
        lines += [
            f"### {model}",
            "",
            "| method | setting | held-out ppl | vs Top-K | mean activated | fewer activations | FLOPs/token saved |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        rows = sorted((r for r in results["runs"] if r["model"] == model), key=lambda r: r["mean_activated"])
        for r in rows:
            lines.append(
                f"| {r['method']} | {r['setting']} | {r['perplexity']:.3f} | {100 * r['perplexity_change']:+.2f}% | "
                f"{r['mean_activated']:.3f} / {r['top_k']} | {100 * r['activation_reduction']:.1f}% | "
                f"{100 * r['flops_reduction']:.1f}% |"
            )
        lines.append("")
    checks = pareto_check(results["runs"])
    if checks:
        lines += [
            "| model | Ada-K | >=30% fewer and <=1% ppl | baselines with lower ppl at <= compute |",
            "| --- | --- | --- | --- |",
        ]
        for c in checks:
            lines.append(
                f"| {c['model']} | {c['setting']} | {'yes' if c['meets_30pct_1pct'] else 'no'} | "
                f"{', '.join(c['beaten_by']) or 'none'} |"
            )
    text = "\n".join(lines) + "\n"
    (out / "tradeoff.md").write_text(text)
    return text


def plot(results: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results["runs"]))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    styles = {
        "topk": ("*", "black"),
        "static-k": ("s", "tab:gray"),
        "top-p": ("^", "tab:orange"),
        "dyn-skip": ("D", "tab:green"),
        "ada-k": ("o", "tab:blue"),
    }
    for ax, model in zip(axes[0], models):
        runs = [r for r in results["runs"] if r["model"] == model]
        ref = next(r for r in runs if r["method"] == "topk")
        series: dict[str, list[dict[str, Any]]] = {}
        for r in runs:  # one Ada-K series per training set-up (lambda varies along it)
            key = r["method"] if r["method"] != "ada-k" else "ada-k " + r["setting"].partition(" ")[2]
            series.setdefault(key, []).append(r)
        adak_colors = iter(["tab:blue", "tab:purple", "tab:cyan", "tab:brown", "tab:pink"])
        for key, pts in series.items():
            method = pts[0]["method"]
            marker, color = styles.get(method, ("o", "tab:blue"))
            if method == "ada-k":
                color = next(adak_colors, "tab:blue")
            pts = sorted(pts, key=lambda r: r["mean_activated"])
            xs, ys = [r["mean_activated"] for r in pts], [r["perplexity"] for r in pts]
            ax.plot(
                xs,
                ys,
                marker=marker,
                color=color,
                label=key,
                linestyle="-" if len(pts) > 1 else "none",
                markersize=10 if method == "topk" else 6,
            )
            for r in pts:
                if method != "topk":
                    label = r["setting"].split(" ")[0] if method == "ada-k" else r["setting"]
                    ax.annotate(
                        label,
                        (r["mean_activated"], r["perplexity"]),
                        fontsize=6,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
        ax.axhline(
            ref["perplexity"] * 1.01, color="tab:red", linestyle=":", linewidth=1, label="Top-K ppl +1%"
        )
        ax.axvline(
            ref["top_k"] * 0.7, color="tab:purple", linestyle=":", linewidth=1, label="30% fewer experts"
        )
        low = min(r["perplexity"] for r in runs)
        ax.set_ylim(low * 0.98, min(max(r["perplexity"] for r in runs), ref["perplexity"] * 1.5))
        ax.set_xlabel("mean activated routed experts per token")
        ax.set_ylabel("held-out perplexity (WikiText-2 test)")
        ax.set_title(model)
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
    parser.add_argument("--models", nargs="+", default=["mixtral-8x2", "qwen-moe"])
    parser.add_argument("--lambdas", nargs="+", type=float, default=[3e-3, 1e-2, 3e-2])
    parser.add_argument("--top-p", nargs="+", type=float, default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--skip-quantiles", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-rows", type=int, default=64, help="held-out rows of --seq-len tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--ppo-steps", type=int, default=150)
    parser.add_argument(
        "--adak-renormalize",
        default="paper",
        choices=["paper", "family"],
        help="Ada-K weights: renormalised over the chosen experts (paper) or the family's own rule",
    )
    parser.add_argument(
        "--skip-baselines",
        action="store_true",
        help="only Top-K and Ada-K (add Ada-K runs to earlier results)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--cache-dir", default=None, help="reference-model cache root (default: the library's)"
    )
    parser.add_argument(
        "--reference-steps",
        type=int,
        default=None,
        help="build missing reference models with this many steps",
    )
    parser.add_argument("--out", default="results/adak_tradeoff")
    parser.add_argument(
        "--replot", action="store_true", help="only merge <model>/runs.json and rebuild the tables and plot"
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("replot", "quiet")}
    config["machine"] = f"CPU, {args.threads} torch threads, torch {torch.__version__}"
    if not args.replot:
        for name in args.models:
            started = time.perf_counter()
            run_model(name, args, out)
            print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    results = collect(out, config)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(write_tables(results, out))
    print(f"wrote {out / 'results.json'}, {out / 'tradeoff.md'}, {plot(results, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
