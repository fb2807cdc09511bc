"""What hf-moe-routing sees in a MoE model: family, router kind, MoE layers, experts, parameters, FLOPs."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..families import model_type_of
from ..patching import describe, get_patch_state, patch_model, unpatch_model
from .flops import flops_per_token


def moe_summary(model: nn.Module, seq_len: int = 2048, causal: bool = True) -> dict[str, Any]:
    """The MoE facts of ``model`` as a JSON-serialisable dict.

    Keys: ``model_class``, ``model_type``, ``family``, ``family_class``, ``router_kind``,
    ``num_hidden_layers``, ``moe_layers``, ``num_experts``, ``top_k``, ``hidden_size``,
    ``expert_intermediate_size``, ``shared_experts`` (attribute name or None),
    ``shared_intermediate_size``, ``shared_expert_gate``, ``router_class``, ``router_attr``,
    ``num_parameters``, ``num_active_parameters`` (per token), ``renormalizes_top_k``,
    ``routed_scaling_factor``, ``experts_implementation``, ``seq_len``, ``causal_attention_flops``,
    ``flops_per_token`` (a :class:`~.flops.FlopsBreakdown` dict).

    ``router_check`` says what the router was verified on: its loaded weights plus random copies,
    or (a model built from its config on the meta device) random copies only, in which case
    patching checks the loaded weights again. The summary is made only after the same check that
    :func:`~hf_moe_routing.patch_model` runs passed (the model is patched with ``TopKConfig`` and
    unpatched), so a router reported here is one patching accepts.

    Raises:
        ValueError: the model has no MoE block. TypeError: a router cannot be reproduced exactly.
    """
    from ..methods import TopKConfig

    if get_patch_state(model) is None:  # what patching checks, checked here too
        unpatch_model(patch_model(model, TopKConfig()))
    described = describe(model)
    family, shape, first = described.family, described.shape, described.blocks[0]
    shared = [attr for attr in family.shared_expert_attrs if getattr(first.block, attr, None) is not None]
    config = getattr(model, "config", None)
    total = sum(p.numel() for p in model.parameters())
    routed = [sum(p.numel() for p in b.experts.parameters()) for b in described.blocks]
    inactive = sum(
        n * (1 - b.spec.top_k / b.spec.num_experts) for n, b in zip(routed, described.blocks, strict=True)
    )
    router_class = getattr(type(first.router), "_original_class", type(first.router))
    return {
        "model_class": type(model).__name__,
        "model_type": model_type_of(model),
        "family": family.name,
        "family_class": type(family).__name__,
        "router_kind": first.spec.kind.describe(),
        "num_hidden_layers": shape.num_hidden_layers,
        "moe_layers": list(shape.moe_layers),
        "num_experts": shape.num_experts,
        "top_k": shape.top_k,
        "hidden_size": shape.hidden_size,
        "expert_intermediate_size": shape.expert_intermediate_size,
        "shared_experts": shared[0] if shared else None,
        "shared_intermediate_size": shape.shared_intermediate_size,
        "shared_expert_gate": getattr(first.block, "shared_expert_gate", None) is not None,
        "router_class": router_class.__name__,
        "router_attr": first.router_attr,
        "num_parameters": total,
        "num_active_parameters": round(total - inactive),
        "renormalizes_top_k": first.spec.renorm or first.spec.kind.score == "softmax_topk",
        "routed_scaling_factor": first.spec.scaling,
        "experts_implementation": getattr(config, "_experts_implementation", None),
        "router_check": (
            "random float32/bfloat16 copies only (built from the config: patching checks the loaded weights)"
            if first.spec.weight(first.router).device.type == "meta"
            else "as loaded and on random float32/bfloat16 copies"
        ),
        "seq_len": seq_len,
        "causal_attention_flops": causal,
        "flops_per_token": flops_per_token(model, seq_len, causal=causal).to_dict(),
    }


# ---- text reports (what the command line prints) --------------------------------------------------
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


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def format_moe_summary(info: dict[str, Any]) -> str:
    """A readable two-column table of :func:`moe_summary` output."""
    shared = "none"
    if info["shared_experts"]:
        shared = f"{info['shared_experts']} (intermediate {info['shared_intermediate_size']})"
        if info["shared_expert_gate"]:
            shared += ", sigmoid-gated"
    layers = info["moe_layers"]
    rows = [
        ("model", f"{info['model_class']} (model_type {info['model_type']})"),
        ("family", f"{info['family']} ({info['family_class']})"),
        ("MoE layers", f"{len(layers)} of {info['num_hidden_layers']}: {_layers_text(layers)}"),
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
        ("router check", str(info.get("router_check", ""))),
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
    return _table(rows)


def _fewer(reduction: float) -> str:
    """``0.25`` -> ``"25.0% fewer"``, ``-0.5`` -> ``"50.0% more"``, ``0`` -> ``"as many"``."""
    if abs(reduction) < 5e-4:
        return "as many"
    return f"{100 * abs(reduction):.1f}% {'fewer' if reduction > 0 else 'more'}"


def format_evaluation(results: dict[str, Any]) -> str:
    """A readable summary of :func:`~hf_moe_routing.evaluation.evaluate.evaluate_routing` output."""
    ppl = f"{results['perplexity']:.3f}"
    if "topk" in results:
        ppl += f"   (Top-K {results['topk']['perplexity']:.3f}, {100 * results['perplexity_change']:+.2f}%)"
    flops, flops_topk = results["flops_per_token"]["total"], results["flops_per_token_topk"]["total"]
    max_vio = f"avg {results['avg_max_vio']:.3f}, sup {results['sup_max_vio']:.3f}"
    if "topk" in results:
        max_vio += f"   (Top-K avg {results['topk']['avg_max_vio']:.3f})"
    rows = [
        ("routing", results["routing"]),
        ("perplexity", ppl),
        ("predicted tokens", f"{results['num_tokens']} (seq_len {results['seq_len']})"),
        (
            "activated experts",
            f"{results['mean_activated']:.3f} of top-{results['top_k']} ({_fewer(results['activation_reduction'])})",
        ),
        (
            "FLOPs / token",
            f"{flops / 1e6:.2f} M vs Top-K {flops_topk / 1e6:.2f} M ({_fewer(results['flops_reduction'])}; "
            f"routed experts {_fewer(results['routed_flops_reduction'])})",
        ),
        ("MaxVio", max_vio),
    ]
    topk_vio = (results.get("topk") or {}).get("max_vio_per_layer") or {}
    lines = [_table(rows), "", "layer  activated  MaxVio" + ("  Top-K MaxVio" if topk_vio else "")]
    for layer, k in results["activated_per_layer"].items():
        line = f"{layer:>5}  {k:9.3f}  {results['max_vio_per_layer'][layer]:6.3f}"
        lines.append(line + (f"  {topk_vio[layer]:12.3f}" if layer in topk_vio else ""))
    return "\n".join(lines)


def format_speed(result: dict[str, Any], shape: tuple[int, ...], repeats: int) -> str:
    """The table the ``bench`` command prints for :func:`~hf_moe_routing.evaluation.speed.compare_speed`."""
    tokens = result["routing"]["tokens"]
    lines = [f"batch: {tuple(shape)} ({tokens} tokens), {repeats} timed forwards each"]
    lines.append(f"{'routing':<28} {'median ms':>10} {'tokens/s':>10}")
    for label, key in ((result["routing_name"], "routing"), ("topk (model)", "topk")):
        lines.append(f"{label:<28} {1e3 * result[key]['median_s']:10.2f} {result[key]['tokens_per_s']:10.0f}")
    lines.append(
        f"speed-up vs Top-K: {result['speedup']:.3f}x ({100 * result['time_saved']:+.1f}% time saved)"
    )
    return "\n".join(lines)
