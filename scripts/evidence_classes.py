"""Per-token-class table of the Ada-K evidence (used by ``scripts/reproduce.py adak-evidence``).

An honest accuracy proxy while the reference models do not beat word n-grams on BLiMP: for every base and
budget, perplexity change against Top-K and next-token accuracy, split by the class of the predicted token
(``hf_moe_routing.evaluation.token_classes``), for Ada-K and the strongest baseline at Ada-K's compute (the
baseline with the lowest overall perplexity in that cell). Ada-K's and the baseline's per-row sums are
averaged over allocator seeds (each baseline row is matched to its seed's Ada-K run), and every interval is
a paired bootstrap over test rows. Rows without per-class scores (made before they were recorded) are left
out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hf_moe_routing.evaluation.paired import bootstrap_ci, ppl_change_ci, ppl_margin_ci
from hf_moe_routing.evaluation.token_classes import CLASSES


def _classes(row: dict[str, Any], field: str) -> np.ndarray:
    return np.asarray(row[field], dtype=np.float64)  # (R, C)


def _pp(ci: tuple[float, float, float]) -> str:
    return f"{100 * ci[0]:+.2f} ({100 * ci[1]:+.2f}..{100 * ci[2]:+.2f})"


def accuracy_difference_ci(correct_a: np.ndarray, correct_b: np.ndarray, tokens: np.ndarray):
    """Token-weighted accuracy of A minus B on the same rows (a fraction), with its paired interval."""
    diff, tokens = correct_a - correct_b, np.asarray(tokens, dtype=np.float64)
    return bootstrap_ci(lambda w: (w @ diff) / (w @ tokens), len(diff))


def class_markdown(rows: list[dict[str, Any]]) -> str:
    """The table (markdown), or ``""`` where no row has per-class scores."""
    have = [r for r in rows if r.get("class_nll") is not None]
    topk = {r["base"]: r for r in have if r["kind"] == "topk"}
    runs = [r for r in have if r["kind"] == "adak" and r["base"] in topk]
    if not runs:
        return ""
    lines = [
        "### By token class (test rows): perplexity change vs Top-K % and next-token accuracy",
        "",
        "Ada-K against the strongest baseline at its compute (lowest perplexity in the cell); margin > 0 and "
        "accuracy difference > 0: Ada-K better. Paired bootstrap 95% CIs over test rows.",
        "",
        "| base | budget | baseline | class | tokens | Top-K accuracy | Ada-K change % | baseline change % | "
        "margin pp | accuracy Ada-K - baseline pp |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for base in topk:
        ref = topk[base]
        for fraction in sorted({r["fraction"] for r in runs if r["base"] == base}, reverse=True):
            cell = [r for r in runs if r["base"] == base and r["fraction"] == fraction]
            matched: dict[str, list[dict[str, Any]]] = {}
            for r in cell:
                for x in have:
                    if x["kind"] == "baseline" and (x["base"], x["fraction"], x["seed"]) == (
                        base,
                        fraction,
                        r["seed"],
                    ):
                        matched.setdefault(x["method"], []).append(x)
            matched = {m: xs for m, xs in matched.items() if len(xs) == len(cell)}
            if not matched:
                continue
            total = lambda xs: np.mean([np.sum(x["nll"]) for x in xs])  # noqa: E731
            strongest = min(matched, key=lambda m: total(matched[m]))
            adak = {
                f: np.mean([_classes(r, f) for r in cell], axis=0) for f in ("class_nll", "class_correct")
            }
            other = {
                f: np.mean([_classes(x, f) for x in matched[strongest]], axis=0)
                for f in ("class_nll", "class_correct")
            }
            ref_nll, tokens = _classes(ref, "class_nll"), _classes(ref, "class_tokens")
            for c in range(tokens.shape[1]):
                name, n = CLASSES[c] if c < len(CLASSES) else f"class {c}", tokens[:, c]
                if n.sum() < 100:  # too few tokens for a class-level figure
                    continue
                args = (ref_nll[:, c], n)
                accuracy = _classes(ref, "class_correct")[:, c].sum() / n.sum()
                lines.append(
                    f"| {base} | {fraction:g} | {strongest} | {name} | {int(n.sum())} | {accuracy:.3f} | "
                    f"{_pp(ppl_change_ci(adak['class_nll'][:, c], *args))} | "
                    f"{_pp(ppl_change_ci(other['class_nll'][:, c], *args))} | "
                    f"**{_pp(ppl_margin_ci(adak['class_nll'][:, c], other['class_nll'][:, c], *args))}** | "
                    f"{_pp(accuracy_difference_ci(adak['class_correct'][:, c], other['class_correct'][:, c], n))} |"
                )
    return "\n".join(lines) + "\n"
