"""Tables of the evidence protocol (``scripts/evidence_protocol.py``): paired bootstrap CIs over test rows.

For every base model and budget fraction:

* Ada-K's perplexity change vs the same base's Top-K on the test rows (per allocator seed, and pooled: the
  per-row NLL averaged over seeds), with its 95% CI;
* every baseline at each Ada-K run's own routed experts, and the margin ``change(baseline) - change(Ada-K)``
  in percentage points (> 0: Ada-K is better) with its paired 95% CI, per seed and pooled over seeds;
* the same pooled over bases (the bases share the test rows: same tokenizer).

An advantage is called *measurable* only where the CI excludes 0.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from hf_moe_routing.evaluation.paired import ppl_change_ci, ppl_margin_ci


def _arr(row: dict[str, Any]) -> np.ndarray:
    return np.asarray(row["nll"], dtype=np.float64)


def _pp(ci: tuple[float, float, float]) -> str:
    return f"{100 * ci[0]:+.2f} ({100 * ci[1]:+.2f}..{100 * ci[2]:+.2f})"


def verdict(ci: tuple[float, float, float]) -> str:
    if ci[1] > 0:
        return "Ada-K better"
    if ci[2] < 0:
        return "baseline better"
    return "no measurable difference"


def same_test_rows(topk_rows: list[dict[str, Any]]) -> bool:
    """Whether every base was scored on the same token rows, so rows can be paired across bases: by the rows'
    hash (``test_rows_sha256``), or, for rows made before it was recorded, by the reference shape (a
    ``<shape>-seed<N>`` build shares its shape's tokenizer)."""
    hashes = {r.get("test_rows_sha256") for r in topk_rows}
    if None not in hashes:
        return len(hashes) == 1
    return len({re.sub(r"-seed\d+$", "", r["base"]) for r in topk_rows}) == 1


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Numbers behind the tables: ``{"cells": [...], "static": [...]}`` (fractions, not percent)."""
    cells, static = [], []
    bases = list(dict.fromkeys(r["base"] for r in rows))
    topk = {b: next(r for r in rows if r["base"] == b and r["kind"] == "topk") for b in bases}
    tokens = np.asarray(topk[bases[0]]["tokens"], dtype=np.float64)
    shared = same_test_rows([topk[b] for b in bases])
    for b in bases:
        for r in rows:
            if r["base"] == b and r["kind"] == "static-k":
                static.append(
                    {"base": b, "k": r["k"], "change": ppl_change_ci(_arr(r), _arr(topk[b]), tokens)}
                )
    fractions = sorted({r["fraction"] for r in rows if r["kind"] == "adak"}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["kind"] == "baseline"))
    for fraction in fractions:
        groups = [[b] for b in bases] + ([bases] if shared and len(bases) > 1 else [])
        for group in groups:
            runs = [
                r for r in rows if r["kind"] == "adak" and r["fraction"] == fraction and r["base"] in group
            ]
            if not runs:
                continue
            ref = np.mean([_arr(topk[r["base"]]) for r in runs], axis=0)
            adak = np.mean([_arr(r) for r in runs], axis=0)
            cell = {
                "bases": group,
                "fraction": fraction,
                "runs": len(runs),
                "seeds": sorted({r["seed"] for r in runs}),
                "target": runs[0]["target_experts"],
                "mean_experts": [r["mean_experts"] for r in runs],
                "adak_change": ppl_change_ci(adak, ref, tokens),
                "adak_change_per_run": [
                    ppl_change_ci(_arr(r), _arr(topk[r["base"]]), tokens)[0] for r in runs
                ],
                "baselines": {},
            }
            for method in methods:
                matched = [
                    next(
                        (
                            x
                            for x in rows
                            if x["kind"] == "baseline"
                            and x["method"] == method
                            and x["base"] == r["base"]
                            and x["fraction"] == fraction
                            and x["seed"] == r["seed"]
                        ),
                        None,
                    )
                    for r in runs
                ]
                if any(m is None for m in matched):
                    continue
                other = np.mean([_arr(m) for m in matched], axis=0)
                cell["baselines"][method] = {
                    "change": ppl_change_ci(other, ref, tokens),
                    "margin": ppl_margin_ci(adak, other, ref, tokens),
                    "margin_per_run": [
                        ppl_margin_ci(_arr(r), _arr(m), _arr(topk[r["base"]]), tokens)[0]
                        for r, m in zip(runs, matched)
                    ],
                    "max_compute_gap": max(
                        abs(m["mean_experts"] - r["mean_experts"]) for r, m in zip(runs, matched)
                    ),
                }
            cells.append(cell)
    return {"cells": cells, "static": static, "test_tokens": int(tokens.sum()), "shared_test_rows": shared}


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"Test rows: {summary['test_tokens']} predicted tokens (WikiText-2 test, second half; used for nothing else).",
        "Perplexity change vs the same base's Top-K in %, with paired bootstrap 95% CI over test rows "
        "(4000 resamples). Margin = baseline's change - Ada-K's change, in percentage points (> 0: Ada-K better).",
        "",
    ]
    methods = list(dict.fromkeys(m for c in summary["cells"] for m in c["baselines"]))
    head = "| base(s) | budget | runs | routed experts (target) | Ada-K ppl change % | "
    head += " | ".join(f"{m}: change % / margin pp" for m in methods) + " |"
    lines += [head, "| --- | ---: | ---: | ---: | ---: |" + " --- |" * len(methods)]
    for c in summary["cells"]:
        experts = c["mean_experts"]
        cells = []
        for m in methods:
            b = c["baselines"].get(m)
            cells.append(
                "n/a" if b is None else f"{_pp(b['change'])} / **{_pp(b['margin'])}** {verdict(b['margin'])}"
            )
        lines.append(
            f"| {'+'.join(c['bases'])} | {c['fraction']:g} | {c['runs']} | {np.mean(experts):.3f} "
            f"[{min(experts):.3f}..{max(experts):.3f}] ({c['target']:g}) | {_pp(c['adak_change'])} | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", "Per run (Ada-K change %; margin pp against each baseline):", ""]
    for c in summary["cells"]:
        if len(c["bases"]) > 1:
            continue
        parts = [f"Ada-K {', '.join(f'{100 * v:+.2f}' for v in c['adak_change_per_run'])}"]
        for m, b in c["baselines"].items():
            parts.append(
                f"{m} {', '.join(f'{100 * v:+.2f}' for v in b['margin_per_run'])} "
                f"(compute gap <= {b['max_compute_gap']:.4f})"
            )
        lines.append(f"- {c['bases'][0]} at {c['fraction']:g} (seeds {c['seeds']}): " + "; ".join(parts))
    lines += ["", "Static k (integer k only):", ""]
    lines += [f"- {s['base']} k={s['k']}: {_pp(s['change'])}" for s in summary["static"]]
    return "\n".join(lines) + "\n"


def verdict_markdown(summary: dict[str, Any]) -> str:
    """Base by base and budget by budget: Ada-K against the strongest baseline of the cell (the lowest pooled
    perplexity change at Ada-K's compute), with the paired margin and its verdict."""
    lines = [
        "| base(s) | budget | Ada-K's routed experts (target) | Ada-K change % | strongest baseline (change %) "
        "| margin over it, pp (95% CI) | verdict |",
        "| --- | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for c in summary["cells"]:
        if not c["baselines"]:
            continue
        name, best = min(c["baselines"].items(), key=lambda item: item[1]["change"][0])
        experts = float(np.mean(c["mean_experts"]))
        lines.append(
            f"| {' + '.join(c['bases'])} | {100 * c['fraction']:.0f}% | {experts:.3f} ({c['target']:g}) | "
            f"{_pp(c['adak_change'])} | {name} ({100 * best['change'][0]:+.2f}) | {_pp(best['margin'])} | "
            f"{verdict(best['margin'])} |"
        )
    return "\n".join(lines) + "\n"


def pareto_plot(summary: dict[str, Any], path: Path) -> Path | None:
    """Perplexity change vs routed experts (share of top-k) per base: Ada-K, every baseline at its compute and
    static k, each with its paired 95% CI as an error bar; one panel per base. None without single-base cells."""
    from hf_moe_routing.recipes.plots import _pyplot

    cells = [c for c in summary["cells"] if len(c["bases"]) == 1]
    bases = list(dict.fromkeys(c["bases"][0] for c in cells))
    if not bases:
        return None
    methods = list(dict.fromkeys(m for c in cells for m in c["baselines"]))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(bases), figsize=(4.2 * len(bases), 3.6), squeeze=False)
    for ax, base in zip(axes[0], bases):
        mine = [c for c in cells if c["bases"][0] == base]
        top_k = mine[0]["target"] / mine[0]["fraction"]

        def bar(x, ci, ax=ax, **kw):
            ax.errorbar(
                [x], [100 * ci[0]], yerr=[[100 * (ci[0] - ci[1])], [100 * (ci[2] - ci[0])]], capsize=2, **kw
            )

        for c in mine:
            x = float(np.mean(c["mean_experts"])) / top_k
            bar(x, c["adak_change"], fmt="o", color="C0", label="Ada-K")
            for m, b in c["baselines"].items():
                i = methods.index(m) + 1  # one colour and offset per baseline in every panel
                bar(x + 0.004 * i, b["change"], fmt="s", color=f"C{i}", label=m, alpha=0.8)
        for s in (s for s in summary["static"] if s["base"] == base):
            bar(s["k"] / top_k, s["change"], fmt="^", color="C7", label="static k")
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_title(base)
        ax.set_xlabel("routed experts / top-k")
        ax.set_ylabel("perplexity change vs Top-K (%)")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
