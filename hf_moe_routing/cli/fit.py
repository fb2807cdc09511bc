"""``hf-moe-routing fit MODEL --routing bip``: fit a routing's state on text and save it as a routing adapter."""

from __future__ import annotations

import argparse
from typing import Any

from .common import (
    add_command,
    add_data_arguments,
    add_model_arguments,
    add_quiet_argument,
    add_routing_arguments,
    check_positive,
    dataset_label,
    load_data,
    load_model,
    load_tokenizer,
    parse_routing,
    setup_logging,
)
from .options import add_output_arguments, prepare_output_dir

#: what ``fit`` writes into --output-dir: a routing adapter (replaced atomically), or a whole model
ADAPTER_FILES = ("routing_config.json", "routing_adapter.safetensors")
MODEL_FILES = ("config.json", "model*.safetensors*", "fit_results.json")
#: what --overwrite removes first: a previous training run of ours in the folder (its checkpoints would
#: sit beside the new adapter, and `train --resume` would continue them)
PREVIOUS_RUN = ("checkpoint-*", ".checkpoint-*", ".tmp-checkpoint-*", ".tmp-old-checkpoint-*", "log.jsonl")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``hf-moe-routing fit`` and its options on ``subparsers``."""
    parser = add_command(
        subparsers,
        "fit",
        help="fit a routing's state (BIP, Loss-Free, dynamic skipping) on text and save a routing adapter",
        description=(
            "Fit the state of a routing on text, with the model frozen (no gradients), and save it as a\n"
            "routing adapter: BIP's expert prices q, the Loss-Free selection bias, dynamic skipping's\n"
            "thresholds. A routing patched without fitting routes exactly like the model's own Top-K.\n"
            "loss_controlled instead fine-tunes only the router weights with the LM loss plus the\n"
            "auxiliary balancing loss, and saves the whole model (save_pretrained).\n\n"
            "Held-out perplexity and MaxVio under the model's own Top-K and under the fitted routing are\n"
            "printed and stored with the adapter (on its model card)."
        ),
        epilog=(
            "examples:\n"
            "  hf-moe-routing fit ./my-mixtral --routing bip --output-dir mixtral-bip\n"
            "  hf-moe-routing fit ./my-mixtral --routing bip:capacity_factor=1.25 --batch-size 16 --output-dir bip-c125\n"
            "  hf-moe-routing fit ./my-qwen-moe --routing loss_free:update_rate=0.01 --output-dir qwen-lf\n"
            "  hf-moe-routing fit ./my-mixtral --routing loss_controlled --learning-rate 1e-4 --output-dir mixtral-aux\n"
            "load it: AutoRoutedModelForCausalLM.from_pretrained('mixtral-bip') or evaluate --adapter mixtral-bip"
        ),
    )
    add_model_arguments(parser)
    add_routing_arguments(parser, adapter=False)
    add_data_arguments(parser, dataset="wikitext-2/valid", split="train", eval_dataset=True)
    run_group = parser.add_argument_group("fitting")
    run_group.add_argument(
        "--batch-size", type=int, default=8, help="sequences per forward (BIP balances each batch)"
    )
    run_group.add_argument("--max-steps", type=int, default=50, help="batches to fit on")
    run_group.add_argument(
        "--eval-batches",
        type=int,
        default=4,
        help="held-out batches for perplexity and MaxVio (from --eval-dataset, else the end of --dataset)",
    )
    run_group.add_argument(
        "--learning-rate", type=float, default=1e-4, help="router learning rate (loss_controlled)"
    )
    add_output_arguments(
        parser, required=True, what="the routing adapter (or, for loss_controlled, the model) goes here"
    )
    add_quiet_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``hf-moe-routing fit`` with the parsed ``args``; returns the exit code (0 = success)."""
    from ..hub.output_dir import output_dir_lock
    from ..recipes.fitting import changes_weights

    setup_logging(args.quiet)
    if args.routing is None:
        raise ValueError(
            "Pass --routing, e.g. --routing bip (or bip:capacity_factor=1.25, loss_free, dynamic_skip)."
        )
    check_positive(args, "batch_size", "max_steps", "eval_batches", "seq_len")
    routing = parse_routing(args.routing)  # bad settings fail before the model is loaded
    model_out = changes_weights(routing)  # router weights change: the whole model is saved
    with output_dir_lock(args.output_dir):  # one writer per folder; a failed run leaves no empty folder
        return _fit(args, routing, model_out)


def _fit(args: argparse.Namespace, routing: Any, model_out: bool) -> int:
    from ..recipes.fitting import fit_on_data, save_fit

    output = prepare_output_dir(
        args.output_dir,
        ours=MODEL_FILES if model_out else ADAPTER_FILES,
        overwrite=args.overwrite,
        remove=PREVIOUS_RUN,
    )
    model = load_model(args)
    tokenizer = load_tokenizer(args)
    n_fit, n_eval = args.max_steps * args.batch_size, args.eval_batches * args.batch_size
    if args.eval_dataset:
        fit_data = load_data(args, model, tokenizer, args.dataset, args.split, max_rows=n_fit)
        eval_data = load_data(args, model, tokenizer, args.eval_dataset, args.eval_split, max_rows=n_eval)
        eval_name = dataset_label(args.eval_dataset, args.eval_split)
    else:
        rows = load_data(args, model, tokenizer, args.dataset, args.split, max_rows=n_fit + n_eval)
        if len(rows) < 2:
            raise ValueError(
                f"{args.dataset!r} gives only {len(rows)} row of {args.seq_len} tokens: fitting needs at least 2 "
                "(one to fit on, one held out). Use more text, a smaller --seq-len, or --eval-dataset."
            )
        held = min(n_eval, len(rows) // 2)
        fit_data, eval_data = (
            rows.select(range(len(rows) - held)),
            rows.select(range(len(rows) - held, len(rows))),
        )
        eval_name = f"{dataset_label(args.dataset, args.split)} (held-out end)"
    result = fit_on_data(
        model,
        routing,
        fit_data,
        eval_data,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        eval_batches=args.eval_batches,
        learning_rate=args.learning_rate,
        progress=not args.quiet,
    )
    info = {
        "command": "hf-moe-routing fit",
        "dataset": dataset_label(args.dataset, args.split),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
    }
    if result.changed_weights:
        info["learning_rate"] = args.learning_rate
    save_fit(model, result, output, tokenizer=tokenizer, training_info=info, dataset_name=eval_name)
    print(result.summary())
    what = "model (router weights fine-tuned)" if result.changed_weights else "routing adapter"
    print(f"{what} saved to {output}")
    return 0
