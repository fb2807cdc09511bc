"""The files ``scripts/gpu_check.py`` writes: the merged JSON, a Markdown summary and a PNG of four panels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpu_check_sections import dump


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "" if value is None else format(value, spec)


def summary_markdown(report: dict) -> str:
    meta, sections = report["meta"], report["sections"]
    lines = [
        f"# GPU check ({'smoke run on CPU, tiny shapes' if meta.get('smoke') else meta.get('device_name', '')})",
        "",
        f"`{meta.get('command')}` at {meta.get('started')}, commit {meta.get('git_commit')}, torch "
        f"{meta.get('torch')}, transformers {meta.get('transformers')}, CUDA {meta.get('cuda')}; "
        f"{meta.get('seconds', 0):.0f} s in all.",
        "",
        "| section | status | seconds | budget s |",
        "| --- | --- | ---: | ---: |",
    ]
    for name, s in sections.items():
        lines.append(
            f"| {name} | {s.get('status')} | {_fmt(s.get('seconds'), '.0f')} | {s.get('budget_s', '')} |"
        )
    res = {name: s.get("results", {}) for name, s in sections.items()}
    if res.get("tests", {}).get("tests"):
        lines += ["", "## CUDA tests", "", "| test | outcome | s |", "| --- | --- | ---: |"]
        lines += [
            f"| {t['test']} | {t['outcome']} | {_fmt(t['seconds'], '.1f')} |" for t in res["tests"]["tests"]
        ]
    if res.get("families", {}).get("families"):
        lines += [
            "",
            "## Families on the device",
            "",
            "| family | ok | TopK routing identical | TopK logits identical (max diff / run-to-run) "
            "| MaxVio Top-K -> BIP | Ada-K mean experts | Ada-K sentinel vs eager max diff |",
            "| --- | --- | --- | --- | --- | ---: | ---: |",
        ]
        for f in res["families"]["families"]:
            if "topk_routing_identical" not in f:
                lines.append(
                    f"| {f['family']} | {f.get('ok', '')} | {f.get('error') or f.get('skipped') or ('refused: ' + f['refused'] if 'refused' in f else '')} | | | | |"
                )
                continue
            lines.append(
                f"| {f['family']} | {f['ok']} | {f['topk_routing_identical']} | {f['topk_logits_identical']} "
                f"({f['topk_max_abs_diff']:.1e} / {f['run_to_run_max_abs_diff']:.1e}) "
                f"| {f['maxvio_topk']:.2f} -> {f['maxvio_bip']:.2f} | {f['adak_mean_experts']:.2f} "
                f"| {_fmt(f.get('adak_sentinel_vs_eager_max_abs_diff'), '.1e') or f.get('adak_eager_error', '')} |"
            )
    rows = [r for r in res.get("experts", {}).get("rows", []) if "median_ms" in r]
    if rows:
        lines += [
            "",
            "## sentinel_grouped_mm (time saved / FLOPs-predicted saving; ms at all slots)",
            "",
            "| layer | phase | tokens | impl | ms, all slots | kept 0.75 | kept 0.5 | kept 0.25 | vs grouped_mm at 0.5 |",
            "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        keys = sorted(
            {(r["shape"], r["phase"], r["tokens"], r["impl"]) for r in rows}, key=lambda k: (k[0], k[2], k[3])
        )
        for shape, phase, tokens, impl in keys:
            if impl == "grouped_mm":
                continue
            by_kept = {
                r["kept"]: r for r in rows if (r["shape"], r["tokens"], r["impl"]) == (shape, tokens, impl)
            }
            cells = [_fmt(by_kept.get(k, {}).get("saved_over_predicted")) for k in (0.75, 0.5, 0.25)]
            full = by_kept.get(1.0, {}).get("median_ms")
            vs = by_kept.get(0.5, {}).get("saved_over_predicted_vs_grouped_mm")
            lines.append(
                f"| {shape} | {phase} | {tokens} | {impl} | {_fmt(full)} | {' | '.join(cells)} | {_fmt(vs)} |"
            )
    rows = [r for r in res.get("bip", {}).get("rows", []) if "layer_forward_s" in r]
    if rows:
        lines += [
            "",
            "## BIP solve share of the MoE layer forward",
            "",
            "| layer | n | layer ms | T=1 | T=4 | BIP layer vs own |",
        ]
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            share = r["solve_share"]
            ratio = r.get("bip_layer_forward_s", 0) / r["layer_forward_s"]
            lines.append(
                f"| {r['shape']} | {r['tokens']} | {1e3 * r['layer_forward_s']:.2f} "
                f"| {100 * share.get('1', share.get(1, 0)):.1f}% | {100 * share.get('4', share.get(4, 0)):.1f}% | {ratio:.2f}x |"
            )
    rows = [r for r in res.get("adak", {}).get("rows", []) if "speedup" in r]
    if rows:
        lines += [
            "",
            "## Ada-K end to end (random allocators; stack of real-size layers)",
            "",
            "| stack | tokens | mean k | Top-K ms | Ada-K ms | speed-up | saved / predicted | peak MB Top-K / Ada-K |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in rows:
            k = sum(r["mean_k_per_layer"]) / len(r["mean_k_per_layer"])
            peak = r.get("peak_memory_mb")  # CUDA only
            peak_cell = f"{_fmt(peak['topk'], '.0f')} / {_fmt(peak['adak'], '.0f')}" if peak else "CUDA only"
            lines.append(
                f"| {r['shape']} x{r['layers']} | {r['tokens']} | {k:.2f} | {r['median_ms']['topk']:.1f} "
                f"| {r['median_ms']['adak']:.1f} | {r['speedup']:.2f}x | {_fmt(r['saved_over_predicted'])} "
                f"| {peak_cell} |"
            )
    ppo = res.get("ppo", {}).get("result")
    if ppo:
        tps = ppo["tokens_per_s"]
        lines += [
            "",
            f"## PPO ({ppo['shape']} x{ppo['layers']}, {ppo['tokens_per_step']} tokens per step)",
            "",
            "tokens/s: " + ", ".join(f"{k} {v:.0f}" for k, v in tps.items()),
        ]
    rows = res.get("compile", {}).get("rows", [])
    if rows:
        lines += [
            "",
            "## torch.compile (fullgraph) vs eager",
            "",
            "| routing | eager ms | compiled ms | speed-up | compile s |",
        ]
        lines.append("| --- | ---: | ---: | ---: | ---: |")
        for r in rows:
            if "speedup" in r:
                lines.append(
                    f"| {r['routing']} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | {r['speedup']:.2f}x | {r['compile_s']:.0f} |"
                )
            else:
                lines.append(f"| {r['routing']} | {r.get('error') or r.get('skipped')} | | | |")
    for name, s in sections.items():
        if s.get("error"):
            lines += ["", f"## {name}: error", "", "```", s["error"][-1500:], "```"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = {name: s.get("results", {}) for name, s in report["sections"].items()}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    rows = [
        r
        for r in res.get("experts", {}).get("rows", [])
        if r.get("impl") == "sentinel_grouped_mm" and "median_ms" in r
    ]
    for shape in sorted({r["shape"] for r in rows}):
        for phase, style in (("prefill", "-o"), ("decode", "--x")):
            mine = [r for r in rows if r["shape"] == shape and r["phase"] == phase]
            if mine:
                tokens = max(r["tokens"] for r in mine)
                pts = sorted((r["kept"], r["time_vs_all_slots"]) for r in mine if r["tokens"] == tokens)
                ax.plot(*zip(*pts), style, label=f"{shape} {phase} n={tokens}")
    ax.plot([0, 1], [0, 1], ":", color="gray", label="time ∝ slots (FLOPs)")
    ax.set(xlabel="share of slots kept", ylabel="time / all slots", title="sentinel_grouped_mm")
    ax.legend(fontsize=6)  # always has the FLOPs line
    ax = axes[0][1]
    rows = [r for r in res.get("bip", {}).get("rows", []) if "solve_share" in r]
    for shape in sorted({r["shape"] for r in rows}):
        pts = [
            (r["tokens"], 100 * r["solve_share"].get("4", r["solve_share"].get(4, 0)))
            for r in rows
            if r["shape"] == shape
        ]
        ax.plot(*zip(*sorted(pts)), "-o", label=shape)
    ax.set(xscale="log", xlabel="tokens n", ylabel="% of the layer forward", title="BIP solve (T=4)")
    if rows:
        ax.legend(fontsize=7)
    ax = axes[1][0]
    rows = [r for r in res.get("adak", {}).get("rows", []) if "speedup" in r]
    if rows:
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["predicted_saving"] for r in rows], 0.4, label="predicted (FLOPs)")
        ax.bar([i + 0.2 for i in x], [r["measured_saving"] for r in rows], 0.4, label="measured (time)")
        ax.set_xticks(list(x), [r["shape"] for r in rows], fontsize=7)
        ax.legend(fontsize=7)
    ax.set(ylabel="forward time saved vs Top-K", title="Ada-K end to end")
    ax = axes[1][1]
    rows = [r for r in res.get("compile", {}).get("rows", []) if "speedup" in r]
    if rows:
        ax.bar([r["routing"] for r in rows], [r["speedup"] for r in rows])
        ax.axhline(1.0, color="gray", linestyle=":")
    ax.set(ylabel="eager time / compiled time", title="torch.compile(fullgraph=True)")
    meta = report["meta"]
    fig.suptitle(f"gpu_check: {'smoke (CPU, tiny)' if meta.get('smoke') else meta.get('device_name', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: Path) -> list[Path]:
    """gpu_check.json (always first), summary.md and gpu_check.png; a failing plot is noted, not fatal."""
    paths = [out / "gpu_check.json", out / "summary.md", out / "gpu_check.png"]
    dump(paths[0], report)
    paths[1].write_text(summary_markdown(report))
    try:
        plot(report, paths[2])
    except Exception as error:  # noqa: BLE001 - the JSON and summary are written already
        report["meta"]["plot_error"] = f"{type(error).__name__}: {error}"
        dump(paths[0], report)
        paths.pop()
    return paths
