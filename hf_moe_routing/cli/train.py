"""``hf-moe-routing train MODEL``: train Ada-K allocators (warm start + PPO) and save a routing adapter."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from torch import nn

_RENORMALIZE = {"paper": True, "family": None, "never": False}

_EXAMPLES = (
    "examples:\n"
    "  hf-moe-routing train ./my-qwen-moe --dataset wikitext-2/valid --output-dir adak --steps 300\n"
    "  hf-moe-routing train Qwen/Qwen1.5-MoE-A2.7B --dataset HuggingFaceFW/fineweb-edu --split train \\\n"
    "      --output-dir adak --k-penalty 3e-3 --device-map auto\n"
    "  hf-moe-routing train ./my-qwen-moe --dataset wikitext-2/valid --output-dir adak --resume\n"
    "  accelerate launch -m hf_moe_routing.cli.main train ./my-mixtral --dataset data.jsonl --output-dir adak"
)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, data, output and warm-start arguments shared by ``train`` and ``warmup``."""
    from ..training.adak_trainer import AdaKTrainingConfig

    defaults = AdaKTrainingConfig()
    parser.add_argument("model", help="Hub model id or local folder (as for from_pretrained)")
    parser.add_argument("--revision", default=None, help="model revision on the Hub")
    parser.add_argument(
        "--device-map",
        default=None,
        help="passed to from_pretrained, e.g. 'auto' to shard a large model over the GPUs (one process)",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        required=True,
        help="local corpus (wikitext-2/valid, tinyshakespeare), text/json/csv/parquet file, or Hub dataset id",
    )
    data.add_argument("--split", default="train", help="dataset split (default train)")
    data.add_argument("--dataset-config", default=None, help="Hub dataset configuration name")
    data.add_argument("--text-field", default="text", help="column holding the text (chat records also work)")
    data.add_argument(
        "--eval-dataset", default=None, help="held-out data for periodic evaluation (same forms)"
    )
    data.add_argument("--eval-split", default="test", help="split of --eval-dataset (default test)")
    data.add_argument("--max-eval-batches", type=int, default=None, help="evaluate on at most N batches")
    data.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence (default 256)")
    data.add_argument("--data-dir", default=None, help="folder of the local corpora (default ../shared/data)")
    data.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per micro-batch")
    data.add_argument(
        "--grad-accum", type=int, default=defaults.gradient_accumulation_steps, help="micro-batches per step"
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--output-dir", required=True, help="checkpoints, log.jsonl and the routing adapter go here"
    )
    out.add_argument("--overwrite", action="store_true", help="delete an existing --output-dir first")
    out.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --output-dir"
    )
    out.add_argument("--save-steps", type=int, default=defaults.save_steps, help="checkpoint every N steps")
    out.add_argument("--logging-steps", type=int, default=defaults.logging_steps, help="log every N steps")
    out.add_argument("--eval-steps", type=int, default=defaults.eval_steps, help="evaluate every N steps")
    out.add_argument(
        "--report-to", nargs="*", default=None, help="accelerate trackers, e.g. tensorboard wandb"
    )
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    alloc = parser.add_argument_group("allocators")
    alloc.add_argument(
        "--k-max", type=int, default=None, help="largest k an allocator may choose (default all)"
    )
    alloc.add_argument("--decision", choices=("greedy", "sample"), default="greedy", help="k at inference")
    alloc.add_argument("--layers", default=None, help="comma-separated MoE layer indices (default all)")
    alloc.add_argument(
        "--renormalize",
        choices=tuple(_RENORMALIZE),
        default="paper",
        help="weights of the chosen experts: 'paper' divides by their sum, 'family' follows the model's own "
        "rule (e.g. Qwen1.5-MoE does not), 'never' (default paper)",
    )
    alloc.add_argument(
        "--init-adapter", default=None, help="start from the allocators of a saved Ada-K routing adapter"
    )
    warm = parser.add_argument_group("warm start")
    warm.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="warm-start steps")
    warm.add_argument("--warmup-p", type=float, default=None, help="P-Warm threshold (default: calibrated)")
    warm.add_argument("--warmup-lr", type=float, default=defaults.warmup_learning_rate, help="warm-start lr")
    warm.add_argument("--calibration-batches", type=int, default=defaults.calibration_batches)
    parser.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default="auto")
    parser.add_argument("--seed", type=int, default=defaults.seed)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..training.adak_trainer import AdaKTrainingConfig

    defaults = AdaKTrainingConfig()
    parser = subparsers.add_parser(
        "train",
        help="train Ada-K allocators (warm start + PPO) on a frozen model and save the routing adapter",
        description=(
            "Train Ada-K allocators (one tiny linear layer per MoE layer that picks how many experts each "
            "token gets) on a frozen MoE model: P-Warm/K-Warm warm start, then PPO with the log-likelihood "
            "of the next token as reward and the model's own Top-K as baseline. Saves a routing adapter "
            "(load it with hf_moe_routing.load_routing_adapter or `evaluate --adapter`)."
        ),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--warmup", choices=("p-warm", "k-warm", "random"), default=defaults.warmup, help="warm start"
    )
    ppo = parser.add_argument_group("PPO")
    ppo.add_argument("--steps", type=int, default=defaults.max_steps, help="PPO rollouts (default 300)")
    ppo.add_argument("--ppo-epochs", type=int, default=defaults.ppo_epochs)
    ppo.add_argument("--lr", type=float, default=defaults.learning_rate, help="AdamW learning rate (1e-3)")
    ppo.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    ppo.add_argument(
        "--k-penalty", type=float, default=defaults.k_penalty, help="lambda of the expected-k penalty (3e-3)"
    )
    ppo.add_argument("--gamma", type=float, default=defaults.gamma, help="per-layer discount (0.99)")
    ppo.add_argument("--clip-epsilon", type=float, default=defaults.clip_epsilon)
    ppo.add_argument("--advantage-normalization", choices=("none", "scale", "standardize"), default="none")
    ppo.add_argument("--entropy-coef", type=float, default=defaults.entropy_coef)


def training_config(args: argparse.Namespace, warmup_only: bool):
    """The :class:`AdaKTrainingConfig` of the parsed arguments."""
    from ..training.adak_trainer import AdaKTrainingConfig

    kwargs: dict[str, Any] = dict(
        output_dir=args.output_dir,
        warmup="p-warm" if warmup_only and args.warmup == "random" else args.warmup,
        warmup_steps=args.warmup_steps,
        warmup_learning_rate=args.warmup_lr,
        warmup_p=args.warmup_p,
        calibration_batches=args.calibration_batches,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        logging_steps=args.logging_steps,
        eval_steps=args.eval_steps,
        eval_batches=args.max_eval_batches,
        save_steps=args.save_steps,
        report_to=args.report_to or None,
        progress_bar=not args.quiet,
    )
    if warmup_only:
        kwargs["max_steps"] = 0
    else:
        kwargs.update(
            max_steps=args.steps,
            ppo_epochs=args.ppo_epochs,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            k_penalty=args.k_penalty,
            gamma=args.gamma,
            clip_epsilon=args.clip_epsilon,
            advantage_normalization=args.advantage_normalization,
            entropy_coef=args.entropy_coef,
        )
    return AdaKTrainingConfig(**kwargs)


def adak_config(args: argparse.Namespace):
    from ..methods.adak import AdaKConfig

    custom = args.k_max is not None or args.layers or args.decision != "greedy" or args.renormalize != "paper"
    if args.init_adapter and custom:
        raise ValueError(
            "--k-max, --layers, --decision and --renormalize come from the routing adapter given with --init-adapter; "
            "drop them (or start without --init-adapter)."
        )
    layers = None
    if args.layers:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError as error:
            raise ValueError(f"--layers must be comma-separated integers, got {args.layers!r}.") from error
    return AdaKConfig(
        k_max=args.k_max, decision=args.decision, layers=layers, renormalize=_RENORMALIZE[args.renormalize]
    )


def prepare_output(args: argparse.Namespace) -> Path:
    """Check (or clear, with --overwrite) the output folder."""
    output = Path(args.output_dir)
    if args.resume and args.overwrite:
        raise ValueError(
            "Pass either --resume (continue in --output-dir) or --overwrite (start afresh), not both."
        )
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a folder: choose another --output-dir.")
    if args.resume:
        if not output.is_dir():
            raise FileNotFoundError(f"Nothing to resume: {output} does not exist.")
    elif output.is_dir() and any(output.iterdir()):
        if not args.overwrite:
            raise FileExistsError(
                f"{output} is not empty: pass --overwrite to replace it, --resume to continue its training, "
                "or choose another --output-dir."
            )
        shutil.rmtree(output)
    return output


def load_model(args: argparse.Namespace) -> nn.Module:
    from .inspect import load_for_inspection

    if args.device_map is None:
        return load_for_inspection(args.model, revision=args.revision).eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        args.model, revision=args.revision, dtype="auto", device_map=args.device_map
    ).eval()


def run_training(args: argparse.Namespace, warmup_only: bool) -> int:
    """Shared by ``train`` and ``warmup``."""
    from ..hub import load_routing_adapter
    from ..patching import patch_model
    from ..training.adak_trainer import AdaKTrainer
    from .evaluate import load_eval_data

    config = training_config(args, warmup_only)  # bad settings fail before the model is loaded
    routing = adak_config(args)
    output = prepare_output(args)
    model = load_model(args)
    if args.init_adapter:
        load_routing_adapter(model, args.init_adapter)
    else:
        patch_model(model, routing)
    train_data = load_eval_data(args, model, args.dataset, split=args.split)
    eval_data = (
        load_eval_data(args, model, args.eval_dataset, split=args.eval_split) if args.eval_dataset else None
    )
    trainer = AdaKTrainer(model, config, train_data, eval_data)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    info = {
        "command": f"hf-moe-routing {'warmup' if warmup_only else 'train'}",
        "dataset": args.dataset,
        "split": args.split,
        "seq_len": args.seq_len,
    }
    last_eval = next((e for e in reversed(trainer.state.log_history) if "eval_ppl" in e), None)
    results = {
        k: v for k, v in (last_eval or {}).items() if k.startswith("eval_") and not isinstance(v, list)
    }
    trainer.save_adapter(output, training_info=info, results=results)
    if trainer.accelerator.is_main_process:
        print(f"Ada-K routing adapter saved to {output} (load it with hf_moe_routing.load_routing_adapter)")
    return 0


def run(args: argparse.Namespace) -> int:
    return run_training(args, warmup_only=False)
