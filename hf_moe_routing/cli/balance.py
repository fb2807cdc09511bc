"""``hf-moe-routing balance MODEL``: fit load balancing on text and save it as a routing adapter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

METHODS = ("bip", "loss-free", "loss-controlled")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from .evaluate import add_data_arguments

    parser = subparsers.add_parser(
        "balance",
        help="fit BIP / Loss-Free balancing (or train routers with the aux loss) on text and save it",
        description=(
            "Balance the expert loads of an existing MoE model on a text dataset.\n\n"
            "  bip              run the model (frozen, no gradients) over the data so that each MoE layer's\n"
            "                   BIP expert prices q settle; saves them as a routing adapter.\n"
            "  loss-free        the same with the Loss-Free selection bias (DeepSeek-V3: its own\n"
            "                   e_score_correction_bias); saves a routing adapter.\n"
            "  loss-controlled  fine-tune only the router weights with the LM loss plus the auxiliary\n"
            "                   balancing loss; the router weights change, so the whole model is saved\n"
            "                   (save_pretrained) instead of an adapter.\n\n"
            "The load balance (MaxVio) under the model's own Top-K routing and under the result is measured\n"
            "on held-out batches of the same data and printed (and stored with the adapter)."
        ),
        epilog=(
            "examples:\n"
            "  hf-moe-routing balance ./my-mixtral --method bip --output ./mixtral-bip\n"
            "  hf-moe-routing balance ./my-qwen-moe --method loss-free --update-rate 1e-2 --steps 200 --output ./lf\n"
            "  load it: hf_moe_routing.load_routing_adapter(model, './mixtral-bip')"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="Hub model id or local folder (as for from_pretrained)")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--output", required=True, help="folder to write the routing adapter (or model) to")
    parser.add_argument("--revision", default=None, help="model revision on the Hub")
    parser.add_argument(
        "--data-dir", default=None, help="folder of the local corpora (default ../shared/data)"
    )
    add_data_arguments(parser, "wikitext-2/valid")
    parser.set_defaults(split="train")
    parser.add_argument("--steps", type=int, default=50, help="batches used for fitting (default 50)")
    parser.add_argument("--eval-batches", type=int, default=4, help="held-out batches for MaxVio (default 4)")
    bip = parser.add_argument_group("bip")
    bip.add_argument(
        "--num-iters", type=int, default=None, help="T, dual rounds per batch (default: BIPConfig)"
    )
    bip.add_argument("--capacity-factor", type=float, default=1.0, help="expert capacity factor (>= 1)")
    bip.add_argument(
        "--update",
        choices=("after", "before"),
        default="after",
        help="routing mode stored in the adapter (see BIPConfig; default 'after', causal)",
    )
    free = parser.add_argument_group("loss-free")
    free.add_argument("--update-rate", type=float, default=1e-3, help="u, bias step per batch (default 1e-3)")
    controlled = parser.add_argument_group("loss-controlled")
    controlled.add_argument("--coefficient", type=float, default=0.01, help="aux-loss coefficient alpha")
    controlled.add_argument("--per-sequence", action="store_true", help="per-sequence auxiliary loss")
    controlled.add_argument("--learning-rate", type=float, default=1e-4, help="router learning rate (AdamW)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def routing_config(args: argparse.Namespace):
    """The routing config the command fits."""
    from ..methods import BIPConfig, LossControlledConfig, LossFreeConfig

    if args.method == "bip":
        extra = {} if args.num_iters is None else {"num_iters": args.num_iters}
        return BIPConfig(capacity_factor=args.capacity_factor, update=args.update, **extra)
    if args.method == "loss-free":
        return LossFreeConfig(update_rate=args.update_rate)
    return LossControlledConfig(coefficient=args.coefficient, per_sequence=args.per_sequence)


def measure_max_vio(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """AvgMaxVio (mean over batches of the layer-averaged MaxVio) with the current routing frozen."""
    from ..evaluation.stats import RoutingStats

    model.eval()
    with torch.no_grad(), RoutingStats(model) as stats:
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return float(stats.summary()["avg_max_vio"])


def fit(model: nn.Module, batches: list[dict[str, torch.Tensor]], args: argparse.Namespace) -> list[float]:
    """Run the fitting batches; returns the per-batch training loss (loss-controlled) or an empty list."""
    from tqdm.auto import tqdm

    from ..patching import routing_aux_loss, routing_layers

    bar = tqdm(batches, desc=f"balancing ({args.method})", disable=args.quiet)
    if args.method != "loss-controlled":
        model.eval()
        for layer in routing_layers(model).values():
            layer.train()  # the balancing state updates in training mode; the rest of the model stays in eval
        with torch.no_grad():
            for batch in bar:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        model.eval()
        return []
    routers = [block.spec.weight(block.router) for block in _blocks(model)]
    for param in model.parameters():
        param.requires_grad_(False)
    for weight in routers:
        weight.requires_grad_(True)
    optimizer = torch.optim.AdamW(routers, lr=args.learning_rate, weight_decay=0.0)
    model.train()
    losses = []
    for batch in bar:
        out = model(**batch)
        aux = routing_aux_loss(model)
        loss = out.loss + aux.to(out.loss.device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"The loss became {float(loss)}: lower --learning-rate.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", aux=f"{float(aux.detach()):.4f}")
    model.eval()
    return losses


def _blocks(model: nn.Module):
    from ..patching import get_patch_state

    return get_patch_state(model).blocks


def run(args: argparse.Namespace) -> int:
    from ..core.batching import iter_batches, model_device
    from ..hub import save_routing_adapter
    from ..patching import patch_model, unpatch_model
    from .evaluate import load_eval_data
    from .inspect import load_for_inspection

    if args.steps < 1 or args.eval_batches < 1:
        raise ValueError("--steps and --eval-batches must be >= 1.")
    config = routing_config(args)  # bad settings fail before the model is loaded
    output = Path(args.output)
    model = load_for_inspection(args.model, revision=args.revision).eval()
    data = load_eval_data(
        args, model, args.dataset, max_rows=(args.steps + args.eval_batches) * args.batch_size
    )
    batches = list(iter_batches(data, args.batch_size, model_device(model)))
    if len(batches) < 2:
        raise ValueError(
            f"{args.dataset!r} gives only {len(batches)} batch of {args.batch_size} x {args.seq_len} tokens; "
            "balancing needs at least 2 (one to fit, one held out). Use more text or a smaller --batch-size."
        )
    held_out = batches[-args.eval_batches :] if len(batches) > args.eval_batches else batches[-1:]
    fitting = batches[: len(batches) - len(held_out)]

    topk_vio = measure_max_vio(model, held_out)
    patch_model(model, config)
    losses = fit(model, fitting, args)
    balanced_vio = measure_max_vio(model, held_out)
    results: dict[str, Any] = {
        "topk_avg_max_vio": topk_vio,
        "avg_max_vio": balanced_vio,
        "fit_batches": len(fitting),
        "held_out_batches": len(held_out),
    }
    info = {
        "command": "hf-moe-routing balance",
        "method": args.method,
        "dataset": args.dataset,
        "split": args.split,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
    }
    print(f"held-out AvgMaxVio: Top-K {topk_vio:.3f} -> {args.method} {balanced_vio:.3f}")
    if args.method == "loss-controlled":
        info["final_loss"] = losses[-1] if losses else None
        unpatch_model(model)
        model.save_pretrained(output)
        _save_tokenizer(args, output)
        (output / "balance_results.json").write_text(
            json.dumps({"training": info, "results": results}, indent=2)
        )
        print(f"routers fine-tuned with the auxiliary loss; model saved to {output}")
    else:
        save_routing_adapter(model, output, training_info=info, results=results)
        print(f"routing adapter saved to {output} (load it with hf_moe_routing.load_routing_adapter)")
    return 0


def _save_tokenizer(args: argparse.Namespace, output: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(args.model, revision=args.revision).save_pretrained(output)
