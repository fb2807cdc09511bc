"""The demo's analysis (per-token expert counts, balance per layer, experts per word class) and its text report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.batching import iter_batches, model_device
from ..data.synthetic import SYNTHETIC_CLASSES, classify_words
from ..patching import get_patch_state


# ---- step 5: analysis --------------------------------------------------------------------------
def activated_per_token(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) routed experts per token of a patched ``model``, averaged over its MoE layers."""
    state = get_patch_state(model)
    if state is None:
        raise ValueError("activated_per_token needs a patched model (patch_model(model, config)).")
    num_experts = state.shape.num_experts
    counts: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, output: Any) -> None:  # sentinel slots hold index m
        counts.append((output[2] < num_experts).sum(dim=-1).float())

    handles = [block.router.register_forward_hook(hook) for block in state.blocks]
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(counts).mean(dim=0).reshape(batch["input_ids"].shape)


def experts_by_word_class(model: nn.Module, data: Any, batch_size: int) -> dict[str, float]:
    """Mean routed experts per token for each class of the synthetic language (padding excluded)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for batch in iter_batches(data.eval, batch_size, model_device(model)):
        k = activated_per_token(model, batch).cpu()
        mask = batch["attention_mask"].cpu().bool()
        for row, ids in enumerate(batch["input_ids"].cpu().tolist()):
            classes = classify_words(data.tokenizer.convert_ids_to_tokens(ids))
            for pos, label in enumerate(classes):
                if mask[row, pos] and label in SYNTHETIC_CLASSES:
                    sums[label] = sums.get(label, 0.0) + float(k[row, pos])
                    counts[label] = counts.get(label, 0) + 1
    return {label: sums[label] / counts[label] for label in SYNTHETIC_CLASSES if counts.get(label)}


def format_report(report: dict[str, Any]) -> str:
    """The short human-readable report the CLI prints."""
    bip, adak = report["bip"], report["adak"]
    lines = ["", f"Results on held-out text ({report['dataset']}):", ""]
    lines.append(f"  {'routing':<10}{'perplexity':>11}{'experts/token':>15}{'AvgMaxVio':>11}")
    lines.append(
        f"  {'Top-K':<10}{bip['topk_perplexity']:>11.3f}{adak['top_k']:>15.2f}{bip['topk_avg_max_vio']:>11.3f}"
    )
    lines.append(f"  {'BIP':<10}{bip['perplexity']:>11.3f}{adak['top_k']:>15.2f}{bip['avg_max_vio']:>11.3f}")
    lines.append(f"  {'Ada-K':<10}{adak['perplexity']:>11.3f}{adak['mean_activated']:>15.2f}{'':>11}")
    lines.append("")
    lines.append(
        f"  Ada-K vs Top-K: routed-expert activations {-100 * adak['activation_reduction']:+.1f}%, "
        f"FLOPs per token {-100 * adak['flops_reduction']:+.1f}%, perplexity "
        f"{100 * adak['perplexity_change']:+.2f}%."
    )
    if report.get("experts_by_word_class"):
        parts = ", ".join(f"{c} {k:.2f}" for c, k in report["experts_by_word_class"].items())
        lines.append(f"  Experts per token by word class: {parts}.")
    if report.get("pretrain"):
        p = report["pretrain"]
        lines.append(f"  Pre-training: {p['steps']} steps, held-out perplexity {p['val_perplexity']:.3f}.")
    out = Path(report["output_dir"])
    lines += [
        "",
        f"  Routing adapters: {out / 'bip-adapter'}  {out / 'adak-adapter'}  (each with a model card README.md)",
        f"  Report: {out / 'report.json'}" + (f"   plots: {out / 'plots'}" if report.get("plots") else ""),
        f"  Total time: {report['timings_s']['total']:.0f} s",
    ]
    return "\n".join(lines)
