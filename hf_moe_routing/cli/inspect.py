"""``hf-moe-routing inspect MODEL``: what hf-moe-routing sees in a MoE model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from torch import nn


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show the MoE structure, router and FLOPs per token of a model",
        description=(
            "Load a model (Hub id or local folder) and print its family, router kind, MoE layers, experts, "
            "top-k, shared experts, router class and forward FLOPs per token (matmuls only; see "
            "hf_moe_routing.evaluation.flops)."
        ),
        epilog=(
            "examples:\n"
            "  hf-moe-routing inspect mistralai/Mixtral-8x7B-v0.1 --config-only\n"
            "  hf-moe-routing inspect ./my-qwen-moe --json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="Hub model id or local folder (as for from_pretrained)")
    parser.add_argument(
        "--config-only",
        action="store_true",
        help="read only config.json and build the model on the meta device (no weights are downloaded)",
    )
    parser.add_argument("--revision", default=None, help="model revision (branch, tag or commit) on the Hub")
    parser.add_argument(
        "--seq-len", type=int, default=2048, help="sequence length for the attention FLOPs (default: 2048)"
    )
    parser.add_argument(
        "--full-attention",
        action="store_true",
        help="count all seq_len keys per query (what eager/SDPA compute) instead of the causal average",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def load_for_inspection(
    name_or_path: str, config_only: bool = False, revision: str | None = None
) -> nn.Module:
    """The causal LM of ``name_or_path``: with weights, or built on the meta device from its config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(name_or_path).expanduser()
    if not path.exists() and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1):
        raise FileNotFoundError(f"No model folder at {name_or_path!r} (and it is not a Hub model id).")
    if config_only:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else name_or_path, revision=revision)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    return AutoModelForCausalLM.from_pretrained(
        str(path) if path.exists() else name_or_path, revision=revision, dtype="auto"
    )


def describe(model: nn.Module, seq_len: int = 2048, causal: bool = True) -> dict[str, Any]:
    """The MoE facts of ``model`` (see :func:`hf_moe_routing.evaluation.summary.moe_summary`)."""
    from ..evaluation.summary import moe_summary

    return moe_summary(model, seq_len=seq_len, causal=causal)


def _layers_text(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    parts: list[str] = []
    start = prev = None
    for index in [*layers, None]:
        if start is not None and (index is None or index != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if index is not None and start is None:
            start = index
        prev = index
    return ", ".join(parts)


def format_table(info: dict[str, Any]) -> str:
    """A readable two-column table of :func:`describe` output."""
    shared = "none"
    if info["shared_experts"]:
        shared = f"{info['shared_experts']} (intermediate {info['shared_intermediate_size']})"
        if info["shared_expert_gate"]:
            shared += ", sigmoid-gated"
    rows = [
        ("model", f"{info['model_class']} (model_type {info['model_type']})"),
        ("family", f"{info['family']} ({info['family_class']})"),
        (
            "MoE layers",
            f"{len(info['moe_layers'])} of {info['num_hidden_layers']}: {_layers_text(info['moe_layers'])}",
        ),
        (
            "routed experts",
            f"{info['num_experts']} per layer, intermediate {info['expert_intermediate_size']}",
        ),
        ("top-k", str(info["top_k"])),
        (
            "parameters",
            f"{_count(info['num_parameters'])} total, {_count(info['num_active_parameters'])} activated per token",
        ),
        ("shared experts", shared),
        ("router", f"{info['router_class']} (`{info['router_attr']}`): {info['router_kind']}"),
        ("top-k renormalised", "yes" if info["renormalizes_top_k"] else "no"),
    ]
    if info["routed_scaling_factor"] is not None:
        rows.append(("routed scaling", f"{info['routed_scaling_factor']:g}"))
    rows.append(("experts impl.", str(info["experts_implementation"])))
    flops = info["flops_per_token"]
    scale, unit = (1e9, "GFLOPs") if flops["total"] >= 1e8 else (1e6, "MFLOPs")
    attention = "causal" if info["causal_attention_flops"] else "full"
    rows.append(
        (
            "FLOPs / token",
            f"{flops['total'] / scale:.3f} {unit} (seq_len {info['seq_len']}, {attention} attention)",
        )
    )
    for name in ("attention", "dense_mlp", "shared_experts", "routed_experts", "router", "lm_head"):
        share = 100 * flops[name] / flops["total"] if flops["total"] else 0.0
        rows.append((f"  {name.replace('_', ' ')}", f"{flops[name] / scale:.3f} {unit}  {share:5.1f}%"))
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def run(args: argparse.Namespace) -> int:
    if args.seq_len < 1:
        raise ValueError(f"--seq-len must be a positive number of tokens, got {args.seq_len}.")
    model = load_for_inspection(args.model, config_only=args.config_only, revision=args.revision)
    info = describe(model, seq_len=args.seq_len, causal=not args.full_attention)
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    return 0
