"""``hf-moe-routing families``: which MoE families of the installed transformers hf-moe-routing patches."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .common import add_command, add_quiet_argument


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``hf-moe-routing families`` and its options on ``subparsers``."""

    parser = add_command(
        subparsers,
        "families",
        help="the support table: every MoE family of the installed transformers, supported or refused",
        description=(
            "Find the Mixture-of-Experts causal-LM families of the installed transformers (from its auto "
            "mappings and modeling files), build a tiny random model of each (no download) and check that "
            "TopKConfig() reproduces its routing bit for bit. Prints each family's router kind, status "
            "(supported / refused / not testable here) and, if not supported, why. Takes about a minute on a CPU."
        ),
        epilog=(
            "examples:\n"
            "  hf-moe-routing families\n"
            "  hf-moe-routing families --json > families.json\n"
            "  hf-moe-routing families --only mixtral glm4_moe gpt_oss"
        ),
    )
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument("--only", nargs="+", metavar="MODEL_TYPE", help="check these model types only")
    add_quiet_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``hf-moe-routing families`` with the parsed ``args``; returns the exit code (0 = success)."""
    import transformers

    from ..testing.catalog import moe_families
    from ..testing.support import support_table

    known = [e.model_type for e in moe_families()]
    names = known if not args.only else list(args.only)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"Not a Mixture-of-Experts causal-LM family of transformers {transformers.__version__}: "
            f"{', '.join(unknown)}. Known: {', '.join(known)}."
        )
    transformers.logging.set_verbosity_error()

    def progress(name: str) -> None:
        if not args.quiet:
            print(f"checking {name} ...", file=sys.stderr, flush=True)

    rows = [row.to_dict() for row in support_table(names, progress=progress)]
    summary = _summary(rows, transformers.__version__)
    if args.json:
        print(json.dumps({**summary, "families": rows}, indent=2))
    else:
        print(format_table(rows))
        untestable = f", {summary['not_testable']} not testable here" if summary["not_testable"] else ""
        print(
            f"\ntransformers {summary['transformers']}: {summary['supported']} of {summary['total']} MoE "
            f"causal-LM families supported, {summary['refused']} refused{untestable}."
        )
    return 0


def _summary(rows: list[dict[str, Any]], version: str) -> dict[str, Any]:
    statuses = ("supported", "refused", "mismatch", "not testable")
    count = {status.replace(" ", "_"): sum(r["status"] == status for r in rows) for status in statuses}
    return {"transformers": version, "total": len(rows), **count}


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table: family, router kind, status, reason."""
    header = ("family", "router kind", "status", "reason")
    body = [(r["model_type"], r["router_kind"] or "-", r["status"], r["reason"]) for r in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(3)]
    lines = []
    for row in [header, *body]:
        lines.append(
            "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3]
        )
    return "\n".join(line.rstrip() for line in lines)
