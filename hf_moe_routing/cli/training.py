"""What ``train`` and ``warmup`` share (not a command): options generated from the Ada-K configs, the run.

Every training option comes from :class:`~hf_moe_routing.AdaKTrainingConfig` and every allocator
option from :class:`~hf_moe_routing.AdaKConfig` (names, defaults, help, choices): the command line
and the Python configs cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from .common import (
    add_data_arguments,
    add_model_arguments,
    add_quiet_argument,
    check_positive,
    dataset_label,
    load_data,
    load_model,
    load_tokenizer,
    setup_logging,
)
from .options import add_dataclass_arguments, add_output_arguments, dataclass_kwargs, prepare_output_dir

#: files and folders a training run writes into --output-dir
OUTPUT_FILES = (
    "checkpoint-*",
    ".checkpoint-*",
    "log.jsonl",
    "routing_config.json",
    "routing_adapter.safetensors",
)
#: what --overwrite removes first (the adapter itself is replaced atomically at the end)
REMOVE_ON_OVERWRITE = (
    "checkpoint-*",
    ".checkpoint-*",
    ".tmp-checkpoint-*",
    ".tmp-old-checkpoint-*",
    "log.jsonl",
)
#: the run's own options (not generated from the config)
_HANDLED = {"output_dir", "overwrite_output_dir", "progress_bar"}
INTERRUPT_HINT = "run the same command again with --resume to continue from the last checkpoint"


def _configs() -> tuple[type, type]:
    from ..methods.adak import AdaKConfig
    from ..training.adak import AdaKTrainingConfig

    return AdaKTrainingConfig, AdaKConfig


def add_training_arguments(parser: argparse.ArgumentParser, *, warmup_only: bool) -> None:
    """Model, data and output options, then one option per field of the two Ada-K configs."""
    training, allocators = _configs()
    add_model_arguments(parser)
    add_data_arguments(parser, dataset=None, split="train", required=True, eval_dataset=True)
    out = add_output_arguments(
        parser, required=True, what="checkpoints, log.jsonl and the routing adapter go here"
    )
    out.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --output-dir"
    )
    add_quiet_argument(parser)
    exclude = _HANDLED | ({"max_steps"} if warmup_only else set())
    names = add_dataclass_arguments(
        parser.add_argument_group(f"training ({training.__name__})"), training, exclude=exclude
    )
    group = parser.add_argument_group(
        f"allocators ({allocators.__name__}; from the adapter with --init-adapter)"
    )
    group.add_argument(
        "--init-adapter", default=None, help="start from the allocators of a saved Ada-K routing adapter"
    )
    routing_names = add_dataclass_arguments(group, allocators)
    parser.set_defaults(_training_fields=names, _routing_fields=routing_names, _warmup_only=warmup_only)


def run_training(args: argparse.Namespace) -> int:
    """Train (or warm-start) Ada-K allocators as the parsed options say, then save the routing adapter."""
    from ..hub.output_dir import output_dir_lock

    setup_logging(args.quiet)
    training, allocators = _configs()
    config = training(**_training_kwargs(args, training))  # bad settings fail before the model loads
    routing = _routing_config(args, allocators)
    check_positive(args, "eval_batches")  # evaluating 0 batches would report a perplexity of nothing
    with output_dir_lock(args.output_dir):  # one writer per folder; a failed run leaves no empty folder
        return _train(args, config, routing)


def _train(args: argparse.Namespace, config: Any, routing: Any) -> int:
    from ..hub import load_routing_adapter
    from ..patching import patch_model
    from ..training.adak import AdaKTrainer

    output = prepare_output_dir(
        args.output_dir,
        ours=OUTPUT_FILES,
        overwrite=args.overwrite,
        resume=args.resume,
        remove=REMOVE_ON_OVERWRITE,
    )
    model = load_model(args)
    tokenizer = load_tokenizer(args)
    if args.init_adapter:
        load_routing_adapter(model, args.init_adapter)
    else:
        patch_model(model, routing)
    train_data = load_data(args, model, tokenizer, args.dataset, args.split)
    eval_data, eval_name = None, None
    if args.eval_dataset:
        eval_data = load_data(args, model, tokenizer, args.eval_dataset, args.eval_split)
        eval_name = dataset_label(args.eval_dataset, args.eval_split)
    elif args.eval_batches is not None:  # as `fit`: the end of --dataset is held out
        train_data, eval_data = _hold_out_end(train_data, args.eval_batches * config.batch_size, args)
        eval_name = f"{dataset_label(args.dataset, args.split)} (held-out end)"
    trainer = AdaKTrainer(model, config, train_data, eval_data, tokenizer=tokenizer)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    info = {
        "command": f"hf-moe-routing {'warmup' if args._warmup_only else 'train'}",
        "dataset": dataset_label(args.dataset, args.split),
        "seq_len": args.seq_len,
    }
    if args.init_adapter:
        info["init_adapter"] = args.init_adapter
    results = _last_evaluation(trainer)
    if results and eval_name:
        results = {eval_name: results}
    trainer.save_adapter(output, training_info=info, results=results)
    if trainer.accelerator.is_main_process:
        print(_summary(trainer, output))
    return 0


def _hold_out_end(rows: Any, wanted: int, args: argparse.Namespace) -> tuple[Any, Any]:
    """``(train, held-out)``: the last ``wanted`` rows (at most half) of ``rows`` are held out."""
    if len(rows) < 2:
        raise ValueError(
            f"--eval-batches without --eval-dataset holds out the end of --dataset, but {args.dataset!r} gives "
            f"only {len(rows)} row of {args.seq_len} tokens. Use more text, a smaller --seq-len, or --eval-dataset."
        )
    held = min(wanted, len(rows) // 2)
    return rows.select(range(len(rows) - held)), rows.select(range(len(rows) - held, len(rows)))


def _training_kwargs(args: argparse.Namespace, training: type) -> dict[str, Any]:
    kwargs = dataclass_kwargs(args, args._training_fields)
    kwargs["output_dir"] = str(args.output_dir)
    if "overwrite_output_dir" in {f.name for f in dataclasses.fields(training)}:
        kwargs["overwrite_output_dir"] = bool(args.overwrite)  # prepare_output_dir already cleared the folder
    fields = {f.name for f in dataclasses.fields(training)}
    if args.quiet:
        kwargs["progress_bar"] = False
        kwargs.update({"log_level": "warning"} if "log_level" in fields else {"logging_steps": 0})
    if args._warmup_only:
        kwargs["max_steps"] = 0
    return kwargs


def _routing_config(args: argparse.Namespace, allocators: type) -> Any:
    kwargs = dataclass_kwargs(args, args._routing_fields)
    defaults = {f.name: f.default for f in dataclasses.fields(allocators) if f.name in kwargs}
    changed = sorted(name for name, value in kwargs.items() if value != defaults.get(name))
    if args.init_adapter and changed:
        options = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise ValueError(
            f"{options} come from the routing adapter given with --init-adapter: drop them "
            "(or start without --init-adapter)."
        )
    return allocators(**kwargs)


def _last_evaluation(trainer: Any) -> dict[str, float]:
    last = next((e for e in reversed(trainer.state.log_history) if "eval_ppl" in e), None)
    return {k: v for k, v in (last or {}).items() if k.startswith("eval_") and isinstance(v, (int, float))}


def _summary(trainer: Any, output: Any) -> str:
    state = trainer.state
    lines = [
        f"Ada-K routing adapter saved to {output} ({state.warmup_step} warm-up + {state.ppo_step} PPO steps)"
    ]
    last = _last_evaluation(trainer)
    if "eval_ppl" in last and "eval_ppl_topk" in last:
        change = 100 * (last["eval_ppl"] / last["eval_ppl_topk"] - 1)
        lines.append(
            f"held-out perplexity {last['eval_ppl']:.3f} (Top-K {last['eval_ppl_topk']:.3f}, {change:+.2f}%)"
        )
    if "eval_activated_mean" in last:
        lines.append(f"mean activated experts {last['eval_activated_mean']:.3f} of top-{trainer.shape.top_k}")
    lines.append(
        f"load it: AutoRoutedModelForCausalLM.from_pretrained({str(output)!r}) or evaluate --adapter {output}"
    )
    return "\n".join(lines)
