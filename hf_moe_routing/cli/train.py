"""``hf-moe-routing train MODEL``: train Ada-K allocators (warm start + PPO) and save a routing adapter."""

from __future__ import annotations

import argparse

from .common import add_command
from .training import INTERRUPT_HINT, add_training_arguments, run_training

__all__ = ["INTERRUPT_HINT", "add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``hf-moe-routing train`` and its options on ``subparsers``."""
    parser = add_command(
        subparsers,
        "train",
        help="train Ada-K allocators (warm start + PPO) on a frozen model and save the routing adapter",
        description=(
            "Train Ada-K allocators (one tiny layer per MoE layer that picks how many experts each token\n"
            "gets) on a frozen MoE model: a warm start, then PPO with the log-likelihood of the next token\n"
            "as reward. Checkpoints every --save-steps; the routing adapter is saved into --output-dir at\n"
            "the end (load it with AutoRoutedModelForCausalLM.from_pretrained or `evaluate --adapter`).\n"
            "Every option below the data ones is a field of AdaKTrainingConfig / AdaKConfig."
        ),
        epilog=(
            "examples:\n"
            "  hf-moe-routing train ./my-qwen-moe --dataset wikitext-2/valid --output-dir adak --max-steps 300\n"
            "  hf-moe-routing train Qwen/Qwen1.5-MoE-A2.7B --dataset HuggingFaceFW/fineweb-edu --split train \\\n"
            "      --output-dir adak --k-penalty 3e-3 --device-map auto\n"
            "  hf-moe-routing train ./my-qwen-moe --dataset wikitext-2/valid --output-dir adak --resume\n"
            "  accelerate launch -m hf_moe_routing.cli.main train ./my-mixtral --dataset data.jsonl --output-dir adak"
        ),
    )
    add_training_arguments(parser, warmup_only=False)


def run(args: argparse.Namespace) -> int:
    """Run ``hf-moe-routing train`` with the parsed ``args``; returns the exit code (0 = success)."""
    return run_training(args)
