"""Ada-K of one ``adak-evidence`` folder against Ada-K of another, on the same test rows, with paired CIs.

    python scripts/evidence_compare.py results/evidence/adak-evidence-mixtral-8x2 \\
        results/evidence/adak-evidence-mixtral-8x2-heldout-train

For every budget fraction and base (and pooled over the bases), Ada-K's per-row NLL is averaged over its
allocator seeds in each folder; the margin ``change(A) - change(B)`` of perplexity vs the base's Top-K, in
percentage points, gets a paired bootstrap 95% CI over test rows (> 0: B is better). Routed experts of both are
printed beside it: the two are compared at their own compute, which the protocol matches to within 3% of the
same target. Folders whose reference builds or test rows differ are refused (exit 2): their rows do not pair.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from evidence_results import read_jsonl
from evidence_summary import same_test_rows

from hf_moe_routing.evaluation.paired import ppl_change_ci, ppl_margin_ci


class NotPaired(ValueError):
    """The two folders' rows are not the same tokens of the same builds."""


def _load(folder: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    runs, hashes = folder / "runs.jsonl", folder / "reference.json"
    if not runs.is_file():
        raise NotPaired(f"{folder} has no runs.jsonl: give an adak-evidence results folder.")
    return read_jsonl(runs), json.loads(hashes.read_text()) if hashes.is_file() else {}


def compare(a: Path, b: Path) -> list[dict[str, Any]]:
    """One entry per (fraction, bases): both Ada-K changes and the margin of B over A, as fractions.

    Raises:
        NotPaired: a base of one folder is missing in the other, or its build hash or test rows differ.
    """
    (rows_a, hash_a), (rows_b, hash_b) = _load(a), _load(b)
    bases = list(dict.fromkeys(r["base"] for r in rows_a if r["kind"] == "topk"))
    topk = {}
    for base in bases:
        if hash_a.get(base) != hash_b.get(base):
            raise NotPaired(f"{base}: weights {hash_a.get(base)} in {a}, {hash_b.get(base)} in {b}.")
        ta, tb = (
            next((r for r in rows if r["base"] == base and r["kind"] == "topk"), None)
            for rows in (rows_a, rows_b)
        )
        hashes = {ta.get("test_rows_sha256"), None if tb is None else tb.get("test_rows_sha256")} - {None}
        # rows recorded before their hash was: the same build with the same per-row Top-K scores
        if tb is None or len(hashes) > 1 or (ta["nll"], ta["tokens"]) != (tb["nll"], tb["tokens"]):
            raise NotPaired(f"{base}: the test rows (or their Top-K scores) of {a} and {b} differ.")
        topk[base] = ta
    tokens = np.asarray(topk[bases[0]]["tokens"], dtype=np.float64)
    groups = [[x] for x in bases] + (
        [bases] if len(bases) > 1 and same_test_rows(list(topk.values())) else []
    )
    out = []
    for fraction in sorted({r["fraction"] for r in rows_a if r["kind"] == "adak"}, reverse=True):
        for group in groups:
            runs = [
                [r for r in rows if r["kind"] == "adak" and r["fraction"] == fraction and r["base"] in group]
                for rows in (rows_a, rows_b)
            ]
            if any({r["base"] for r in rs} != set(group) for rs in runs):
                continue
            # each base weighs equally: its seeds' per-row NLL averaged, then the bases averaged
            ref = np.mean([topk[x]["nll"] for x in group], axis=0)
            nll_a, nll_b = (
                np.mean([np.mean([r["nll"] for r in rs if r["base"] == x], axis=0) for x in group], axis=0)
                for rs in runs
            )
            out.append(
                {
                    "bases": group,
                    "fraction": fraction,
                    "experts": [float(np.mean([r["mean_experts"] for r in rs])) for rs in runs],
                    "runs": [len(rs) for rs in runs],
                    "change": [ppl_change_ci(nll, ref, tokens)[0] for nll in (nll_a, nll_b)],
                    "margin": ppl_margin_ci(nll_b, nll_a, ref, tokens),
                }
            )
    return out


def markdown(entries: list[dict[str, Any]], a: str, b: str) -> str:
    lines = [
        f"A = `{a}`, B = `{b}`. Margin = change(A) - change(B) in pp, paired bootstrap 95% CI over test rows "
        "(> 0: B better).",
        "",
        "| base(s) | budget | routed experts A / B | runs A / B | Ada-K change A % | Ada-K change B % | margin pp (95% CI) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in entries:
        lines.append(
            f"| {' + '.join(e['bases'])} | {e['fraction']:.0%} | {e['experts'][0]:.3f} / {e['experts'][1]:.3f} | "
            f"{e['runs'][0]} / {e['runs'][1]} | {100 * e['change'][0]:+.2f} | {100 * e['change'][1]:+.2f} | "
            f"{100 * e['margin'][0]:+.2f} ({100 * e['margin'][1]:+.2f}..{100 * e['margin'][2]:+.2f}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("a", type=Path, help="adak-evidence folder A (e.g. the default protocol)")
    parser.add_argument("b", type=Path, help="adak-evidence folder B, on the same builds and test rows")
    args = parser.parse_args(argv)
    try:
        entries = compare(args.a, args.b)
    except NotPaired as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown(entries, str(args.a), str(args.b)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
