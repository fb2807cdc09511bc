"""``hf-moe-routing warmup MODEL``: warm-start Ada-K allocators (P-Warm or K-Warm) and save them."""

from __future__ import annotations

import argparse

from .train import add_common_arguments, run_training


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "warmup",
        help="warm-start Ada-K allocators (P-Warm / K-Warm) on a frozen model and save the routing adapter",
        description=(
            "Warm-start Ada-K allocators with cross-entropy on pseudo-labels: P-Warm labels each token with "
            "the fewest experts whose router probabilities reach p (p calibrated so the mean label is the "
            "model's top-k), K-Warm with the model's top-k. Continue with `hf-moe-routing train "
            "--init-adapter DIR --warmup random`."
        ),
        epilog=(
            "examples:\n"
            "  hf-moe-routing warmup ./my-qwen-moe --dataset wikitext-2/valid --output-dir adak-warm\n"
            "  hf-moe-routing warmup ./my-mixtral --dataset data.txt --warmup k-warm --output-dir adak-warm"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument("--warmup", choices=("p-warm", "k-warm"), default="p-warm", help="warm-start labels")


def run(args: argparse.Namespace) -> int:
    return run_training(args, warmup_only=True)
