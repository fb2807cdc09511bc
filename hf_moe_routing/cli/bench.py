"""``hf-moe-routing bench MODEL``: forward wall-clock of a routing next to the model's own Top-K."""

from __future__ import annotations

import argparse

from .common import (
    add_command,
    add_data_arguments,
    add_model_arguments,
    add_quiet_argument,
    add_routing_arguments,
    check_positive,
    load_data,
    load_model,
    load_tokenizer,
    parse_routing,
    setup_logging,
)
from .options import check_output_file


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``hf-moe-routing bench`` and its options on ``subparsers``."""
    parser = add_command(
        subparsers,
        "bench",
        help="forward speed of a routing against the model's Top-K",
        description=(
            "Time the forward pass of a MoE model under a routing (--routing or --adapter) and under its\n"
            "own Top-K, in alternating rounds on the same batch, and print the medians and the speed-up.\n"
            "Without --dataset the batch is random token ids."
        ),
        epilog=(
            "examples:\n"
            "  hf-moe-routing bench ./my-mixtral --routing top_p:p=0.5 --batch-size 4 --seq-len 512\n"
            "  hf-moe-routing bench ./my-qwen-moe --adapter ./qwen-adak --dataset wikitext-2/test"
        ),
    )
    add_model_arguments(parser)
    add_routing_arguments(parser)
    add_data_arguments(parser, dataset=None, split="test")
    group = parser.add_argument_group("timing")
    group.add_argument("--batch-size", type=int, default=8, help="sequences in the timed batch")
    group.add_argument("--repeats", type=int, default=10, help="timed forwards of each routing")
    group.add_argument("--warmup", type=int, default=2, help="untimed forwards before timing")
    group.add_argument("--seed", type=int, default=0, help="seed of the random token batch")
    group.add_argument("--json", default=None, metavar="PATH", help="also write the timings as JSON here")
    group.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    add_quiet_argument(parser)


def _batch(args: argparse.Namespace, model):
    """The first packed batch of ``--dataset``, or random token ids when no dataset is given."""
    import torch

    if args.dataset:
        data = load_data(
            args, model, load_tokenizer(args), args.dataset, args.split, max_rows=args.batch_size
        )
        rows = data[: args.batch_size]
        return {
            "input_ids": torch.as_tensor(rows["input_ids"]),
            "attention_mask": torch.as_tensor(rows["attention_mask"]),
        }
    vocab = int(model.get_input_embeddings().weight.shape[0])
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run(args: argparse.Namespace) -> int:
    """Run ``hf-moe-routing bench`` with the parsed ``args``; returns the exit code (0 = success)."""
    from ..core.config import write_json
    from ..evaluation.speed import compare_speed
    from ..evaluation.summary import format_speed
    from ..patching import describe, patch_model

    setup_logging(args.quiet)
    check_positive(args, "repeats", "batch_size")
    check_positive(args, "warmup", minimum=0)
    check_positive(args, "seq_len", minimum=2)
    if args.adapter and args.routing:
        raise ValueError("Pass either --adapter (a saved routing) or --routing (a new one), not both.")
    routing = parse_routing(args.routing) if args.routing else None
    json_path = check_output_file(args.json, args.overwrite) if args.json else None
    model = load_model(args)
    describe(model)  # a model without MoE blocks has no routing to time: ValueError
    if args.adapter:
        from ..hub import load_routing_adapter

        load_routing_adapter(model, args.adapter)
    elif routing is not None:
        patch_model(model, routing)
    batch = _batch(args, model)
    result = compare_speed(model, batch, repeats=args.repeats, warmup=args.warmup)
    print(format_speed(result, tuple(batch["input_ids"].shape), args.repeats))
    if json_path is not None:
        write_json(json_path, {"model": args.model, **result})
        print(f"wrote {json_path}")
    return 0
