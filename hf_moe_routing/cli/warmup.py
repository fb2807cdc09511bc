"""``hf-moe-routing warmup MODEL``: warm-start Ada-K allocators only, and save them as a routing adapter."""

from __future__ import annotations

import argparse

from .common import add_command
from .training import INTERRUPT_HINT, add_training_arguments, run_training

__all__ = ["INTERRUPT_HINT", "add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``hf-moe-routing warmup`` and its options on ``subparsers``."""
    parser = add_command(
        subparsers,
        "warmup",
        help="warm-start Ada-K allocators on a frozen model and save the routing adapter",
        description=(
            "Warm-start Ada-K allocators only (train with --max-steps 0): the allocators learn pseudo-labels\n"
            "(P-Warm: the fewest experts whose router probabilities reach p; K-Warm: the model's top-k).\n"
            "Continue with `hf-moe-routing train --init-adapter DIR --warmup random`."
        ),
        epilog=(
            "examples:\n"
            "  hf-moe-routing warmup ./my-qwen-moe --dataset wikitext-2/valid --output-dir adak-warm\n"
            "  hf-moe-routing warmup ./my-mixtral --dataset data.txt --warmup k-warm --output-dir adak-warm"
        ),
    )
    add_training_arguments(parser, warmup_only=True)


def run(args: argparse.Namespace) -> int:
    """Run ``hf-moe-routing warmup`` with the parsed ``args``; returns the exit code (0 = success)."""
    return run_training(args)
