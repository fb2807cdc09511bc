"""``hf-moe-routing export BASE ADAPTER --output-dir OUTPUT``: write the routing into a standard transformers checkpoint."""

from __future__ import annotations

import argparse

from .common import add_command, add_quiet_argument, setup_logging


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``hf-moe-routing export`` and its options on ``subparsers``."""
    parser = add_command(
        subparsers,
        "export",
        help="write a routing into a standard checkpoint (loads and serves without hf-moe-routing)",
        description=(
            "Write a new checkpoint folder whose own routing equals the routing adapter's: BIP prices and\n"
            "Loss-Free biases folded into the family's selection bias (float32), a static top-k written into\n"
            "the config. Plain AutoModelForCausalLM.from_pretrained, vLLM and SGLang load it as it is.\n"
            "Routings a checkpoint cannot express exactly (per-token k, top-p, offsets on routers without a\n"
            "selection bias) are refused before anything is written: serve those with the vLLM plugin.\n"
            "Shards are streamed; only shards holding a changed tensor are rewritten."
        ),
        epilog=(
            "examples:\n"
            "  hf-moe-routing export ./glm-4.5-air ./glm-bip-adapter --output-dir ./glm-4.5-air-bip\n"
            "  hf-moe-routing export ./qwen3-moe ./qwen3-top4 --output-dir ./qwen3-moe-top4 --overwrite"
        ),
    )
    parser.add_argument("base", metavar="BASE", help="local folder of the base checkpoint (safetensors)")
    parser.add_argument("adapter", metavar="ADAPTER", help="routing adapter folder (or Hub id)")
    parser.add_argument(
        "--output-dir", required=True, metavar="OUTPUT", help="folder to write the exported checkpoint into"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the model files of an --output-dir that already holds a model (other files are kept)",
    )
    add_quiet_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``hf-moe-routing export`` with the parsed ``args``; returns the exit code (0 = success)."""
    import json

    from ..hub.export import EXPORT_RECORD
    from ..hub.files_export import export_checkpoint

    setup_logging(args.quiet)
    folder = export_checkpoint(args.base, args.adapter, args.output_dir, overwrite=args.overwrite)
    record = json.loads((folder / EXPORT_RECORD).read_text(encoding="utf-8"))
    print(f"Exported {record['routing']['routing_type']} routing to {folder}: {record['changes']}")
    return 0
