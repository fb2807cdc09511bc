"""``hf-moe-routing demo``: the whole path (pre-train, fit BIP, train Ada-K, evaluate, save) in one command."""

from __future__ import annotations

import argparse

from .common import add_command, add_quiet_argument, setup_logging
from .options import add_output_arguments

#: ``--size`` presets (the recipe's SIZES; listed here so that --help does not import torch)
SIZES = ("default", "quick")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``hf-moe-routing demo`` and its options on ``subparsers``."""
    parser = add_command(
        subparsers,
        "demo",
        help="run the whole path offline: pre-train a small MoE, fit BIP, train Ada-K, evaluate, save",
        description=(
            "Pre-train a small MoE on a generated language (or load --model), fit BIP balancing to it,\n"
            "train Ada-K allocators with PPO, evaluate both against Top-K, save the routing adapters with\n"
            "model cards, print a report and write plots. Offline without --model/--dataset: nothing is\n"
            "downloaded, a few minutes on 2 CPU cores."
        ),
        epilog=(
            "examples:\n"
            "  hf-moe-routing demo\n"
            "  hf-moe-routing demo --output-dir runs/demo --overwrite --seed 1\n"
            "  hf-moe-routing demo --model Qwen/Qwen1.5-MoE-A2.7B --dataset Salesforce/wikitext "
            "--dataset-config wikitext-2-raw-v1"
        ),
    )
    add_output_arguments(
        parser, required=False, what="output folder (default: a new hf-moe-routing-demo[-N] folder here)"
    )
    data = parser.add_argument_group("model and data (default: generated offline)")
    data.add_argument(
        "--model", default=None, help="Hub id or local folder of a MoE causal LM (with --dataset)"
    )
    data.add_argument(
        "--device-map", default=None, help="from_pretrained's device_map for --model (default: auto on GPUs)"
    )
    data.add_argument("--dataset", default=None, help="Hub dataset id, local file/folder or corpus name")
    data.add_argument("--dataset-config", default=None, help="Hub dataset configuration name")
    data.add_argument("--split", default="train", help="dataset split")
    data.add_argument("--text-field", default="text", help="column holding the text")
    data.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (default 64, or 256 for --model)"
    )
    run_group = parser.add_argument_group("run")
    run_group.add_argument(
        "--size", choices=SIZES, default="default", help="amount of work (quick: a smoke test)"
    )
    run_group.add_argument(
        "--k-penalty", type=float, default=0.03, help="Ada-K lambda: cost per expected expert"
    )
    run_group.add_argument("--seed", type=int, default=0, help="seeds data, model, fitting and training")
    run_group.add_argument(
        "--plot", action=argparse.BooleanOptionalAction, default=True, help="write PNG plots"
    )
    add_quiet_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``hf-moe-routing demo`` with the parsed ``args``; returns the exit code (0 = success)."""
    from ..recipes.demo import DemoConfig, format_report, run_demo

    setup_logging(args.quiet)
    config = DemoConfig(
        output_dir=args.output_dir,
        overwrite=args.overwrite,
        model=args.model,
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        split=args.split,
        text_field=args.text_field,
        size=args.size,
        seq_len=args.seq_len,
        k_penalty=args.k_penalty,
        seed=args.seed,
        plot=args.plot,
        progress=not args.quiet,
        device_map=args.device_map,
    )
    report = run_demo(config, log=(lambda message: None) if args.quiet else print)
    if args.quiet:
        print(format_report(report))
    return 0
