"""``hf-moe-routing inspect MODEL``: what hf-moe-routing sees in a MoE model."""

from __future__ import annotations

import argparse
import json

from .common import add_command, add_model_arguments, add_quiet_argument, load_model, setup_logging


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``hf-moe-routing inspect`` and its options on ``subparsers``."""
    parser = add_command(
        subparsers,
        "inspect",
        help="show the MoE structure, router and FLOPs per token of a model",
        description=(
            "Load a model (Hub id or local folder) and print its family, router kind, MoE layers, experts,\n"
            "top-k, shared experts, router class and forward FLOPs per token (matmuls only; see\n"
            "hf_moe_routing.evaluation.flops). A router is reported only if patching accepts it."
        ),
        epilog=(
            "examples:\n"
            "  hf-moe-routing inspect mistralai/Mixtral-8x7B-v0.1 --config-only\n"
            "  hf-moe-routing inspect ./my-qwen-moe --json"
        ),
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--config-only",
        action="store_true",
        help="read only config.json and build the model on the meta device (no weights are downloaded)",
    )
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length for the attention FLOPs")
    parser.add_argument(
        "--full-attention",
        action="store_true",
        help="count all seq_len keys per query (what eager/SDPA compute) instead of the causal average",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_quiet_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``hf-moe-routing inspect`` with the parsed ``args``; returns the exit code (0 = success)."""
    from ..evaluation.summary import format_moe_summary, moe_summary

    setup_logging(args.quiet)
    if args.seq_len < 1:
        raise ValueError(f"--seq-len must be a positive number of tokens, got {args.seq_len}.")
    model = load_model(args, config_only=args.config_only)
    info = moe_summary(model, seq_len=args.seq_len, causal=not args.full_attention)
    print(json.dumps(info, indent=2) if args.json else format_moe_summary(info))
    return 0
