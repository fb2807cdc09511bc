"""``hf-moe-routing bench MODEL``: forward wall-clock of a routing next to the model's own Top-K."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .evaluate import add_data_arguments, add_model_arguments, load_eval_data, load_model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="forward speed of a routing against the model's Top-K",
        description=(
            "Time the forward pass of a model under a routing (--routing or --adapter) and under its own "
            "Top-K, in alternating rounds on the same batch, and print the medians and the speed-up."
        ),
        epilog=(
            "examples:\n"
            "  hf-moe-routing bench ./my-mixtral --routing top_p:p=0.5 --batch-size 4 --seq-len 512\n"
            "  hf-moe-routing bench ./my-qwen-moe --adapter ./adak-allocators --dataset wikitext-2/test"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    add_data_arguments(parser, None)
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards of each routing")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards before timing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token batch")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the timings as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _batch(args: argparse.Namespace, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The first packed batch of ``--dataset``, or random token ids when no dataset is given."""
    if args.dataset:
        data = load_eval_data(args, model, args.dataset, max_rows=args.batch_size)
        rows = data[: args.batch_size]
        return {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]}
    vocab = int(model.get_input_embeddings().weight.shape[0])
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run(args: argparse.Namespace) -> int:
    from ..evaluation.speed import compare_speed

    if args.repeats < 1 or args.batch_size < 1 or args.seq_len < 2:
        raise ValueError("--repeats and --batch-size must be >= 1 and --seq-len >= 2.")
    model = load_model(args)
    batch = _batch(args, model)
    result = compare_speed(model, batch, repeats=args.repeats, warmup=args.warmup)
    tokens = result["routing"]["tokens"]
    print(f"batch: {tuple(batch['input_ids'].shape)} ({tokens} tokens), {args.repeats} timed forwards each")
    print(f"{'routing':<28} {'median ms':>10} {'tokens/s':>10}")
    for label, key in ((result["routing_name"], "routing"), ("topk (model)", "topk")):
        print(f"{label:<28} {1e3 * result[key]['median_s']:10.2f} {result[key]['tokens_per_s']:10.0f}")
    print(f"speed-up vs Top-K: {result['speedup']:.3f}x ({100 * result['time_saved']:+.1f}% time saved)")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model": args.model, **result}, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    return 0
