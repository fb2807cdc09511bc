"""Fit a routing on text and keep it: the recipe behind ``hf-moe-routing fit``.

1. evaluate the model as it is (its own Top-K) on held-out batches: perplexity and MaxVio;
2. patch it with the routing and fit it: :func:`~hf_moe_routing.fit_routing` for routings with state
   fitted without gradients (BIP, Loss-Free, dynamic skipping), or :func:`finetune_routers` for a
   routing trained through an auxiliary loss (Loss-Controlled: the router weights change);
3. evaluate again, and save a routing adapter (or, when router weights changed, the whole model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.batching import iter_batches, model_device
from ..evaluation.evaluate import evaluate_routing
from ..hub import save_routing_adapter
from ..hub.output_dir import output_dir_lock
from ..methods import RoutingConfig
from ..patching import fit_routing, get_patch_state, patch_model, routing_aux_loss, unpatch_model


def finetune_routers(
    model: nn.Module,
    data: Any,
    *,
    learning_rate: float = 1e-4,
    batch_size: int = 8,
    max_steps: int | None = None,
    progress: bool = True,
) -> list[float]:
    """Train only the router weights with the LM loss plus the routing's auxiliary loss (AdamW).

    ``model`` is patched with a routing that adds an auxiliary loss (``LossControlledConfig``:
    ``m * sum_j f_j P_j``, Switch Transformer / Mixtral). Every other weight stays frozen (its
    ``requires_grad`` is restored afterwards). Returns the loss of each step.

    Raises:
        ValueError: the model is not patched. FloatingPointError: the loss became NaN or infinite.
    """
    state = get_patch_state(model)
    if state is None:
        raise ValueError(
            "finetune_routers needs a patched model (e.g. patch_model(model, LossControlledConfig()))."
        )
    routers = [block.spec.weight(block.router) for block in state.blocks]
    flags = {param: param.requires_grad for param in model.parameters()}
    for param in flags:
        param.requires_grad_(False)
    for weight in routers:
        weight.requires_grad_(True)
    optimizer = torch.optim.AdamW(routers, lr=learning_rate, weight_decay=0.0)
    was_training = model.training
    model.train()
    losses: list[float] = []
    try:
        for batch in iter_batches(
            data, batch_size, model_device(model), max_batches=max_steps, progress=progress, desc="routers"
        ):
            out = model(**batch)
            aux = routing_aux_loss(model)
            loss = out.loss + (aux.to(out.loss.device) if aux is not None else 0.0)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"The loss became {float(loss)}: lower the learning rate.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        for param, flag in flags.items():
            param.requires_grad_(flag)
            param.grad = None
        model.train(was_training)
    return losses


def changes_weights(routing: RoutingConfig) -> bool:
    """Whether fitting ``routing`` trains router weights (then the whole model is saved, not an adapter)."""
    return routing.requires == "router_training"


@dataclass
class FitResult:
    """What :func:`fit_on_data` did: the numbers before and after, and whether weights changed."""

    routing: RoutingConfig
    before: dict[str, Any]
    after: dict[str, Any]
    changed_weights: bool
    info: dict[str, Any] = field(default_factory=dict)

    def results(self) -> dict[str, float]:
        """Held-out metrics for the adapter / model card (after, with the model's own Top-K before)."""
        return {
            "perplexity": self.after["perplexity"],
            "perplexity_topk": self.before["perplexity"],
            "perplexity_change": self.after["perplexity"] / self.before["perplexity"] - 1.0,
            "avg_max_vio": self.after["avg_max_vio"],
            "avg_max_vio_topk": self.before["avg_max_vio"],
            "mean_activated_experts": self.after["mean_activated"],
        }

    def summary(self) -> str:
        """One readable paragraph (what the command prints)."""
        r = self.results()
        return (
            f"held-out AvgMaxVio: Top-K {r['avg_max_vio_topk']:.3f} -> {self.routing.routing_type} "
            f"{r['avg_max_vio']:.3f}\n"
            f"held-out perplexity: Top-K {r['perplexity_topk']:.3f} -> {self.routing.routing_type} "
            f"{r['perplexity']:.3f} ({100 * r['perplexity_change']:+.2f}%)"
        )


def fit_on_data(
    model: nn.Module,
    routing: RoutingConfig,
    fit_data: Any,
    eval_data: Any,
    *,
    batch_size: int = 8,
    max_steps: int | None = None,
    eval_batches: int | None = None,
    learning_rate: float = 1e-4,
    progress: bool = True,
) -> FitResult:
    """Evaluate ``model`` (its Top-K), patch it with ``routing``, fit it on ``fit_data``, evaluate again.

    Args:
        model: an unpatched MoE causal LM.
        routing: a routing with state to fit (``requires == "fitting"``), or one that fine-tunes the
            router weights (``requires == "router_training"``, e.g. ``LossControlledConfig``).
        fit_data, eval_data: token ids (packed datasets, tensors, lists; see ``iter_batches``).
        batch_size: sequences per forward (BIP balances each batch: use the size you will serve with).
        max_steps: fit on at most this many batches (None: all of ``fit_data``).
        eval_batches: evaluate on at most this many batches (None: all of ``eval_data``).
        learning_rate: router learning rate (Loss-Controlled only).

    Raises:
        ValueError: the model is already patched, or the routing has nothing to fit (Top-K, top-p)
            or is trained rather than fitted (Ada-K: use ``AdaKTrainer`` / ``hf-moe-routing train``).
    """
    if get_patch_state(model) is not None:
        raise ValueError("fit_on_data needs an unpatched model: it measures the model's own Top-K first.")
    if routing.requires == "training":
        raise ValueError(
            f"The {routing.routing_type} routing is trained, not fitted: use its trainer "
            "(Ada-K: hf_moe_routing.AdaKTrainer, or hf-moe-routing train)."
        )
    if routing.requires == "nothing":
        raise ValueError(
            f"The {routing.routing_type} routing has no state to fit: evaluate it directly "
            "(hf-moe-routing evaluate --routing ...)."
        )
    before = evaluate_routing(
        model,
        eval_data,
        batch_size=batch_size,
        max_batches=eval_batches,
        topk_reference=False,
        progress=progress,
    )
    patch_model(model, routing)
    try:
        if changes_weights(routing):
            losses = finetune_routers(
                model,
                fit_data,
                learning_rate=learning_rate,
                batch_size=batch_size,
                max_steps=max_steps,
                progress=progress,
            )
            info: dict[str, Any] = {"steps": len(losses), "final_loss": losses[-1] if losses else math.nan}
        else:
            fitted = fit_routing(
                model, fit_data, batch_size=batch_size, max_batches=max_steps, progress=progress
            )
            info = {"batches": fitted["batches"], "tokens": fitted["tokens"]}
        after = evaluate_routing(
            model,
            eval_data,
            batch_size=batch_size,
            max_batches=eval_batches,
            topk_reference=False,
            progress=progress,
        )
    except BaseException:
        unpatch_model(model)
        raise
    return FitResult(routing, before, after, changes_weights(routing), info)


def save_fit(
    model: nn.Module,
    result: FitResult,
    output_dir: str | Path,
    *,
    tokenizer: Any = None,
    base_model_id: str | None = None,
    training_info: dict[str, Any] | None = None,
    dataset_name: str = "evaluation",
) -> Path:
    """Save what :func:`fit_on_data` produced: a routing adapter, or the whole model if weights changed.

    A model whose router weights were fine-tuned is unpatched and saved with ``save_pretrained``
    (plus its tokenizer and ``fit_results.json``): the routing is the model's own again. The folder
    is locked meanwhile (:func:`~hf_moe_routing.hub.output_dir.output_dir_lock`): a second process
    writing it gets ``OutputDirBusyError``.
    """
    from ..core.config import write_json
    from ..hub.json_values import to_json

    output = Path(output_dir)
    info = {**(training_info or {}), **result.info}
    results = {dataset_name: result.results()}
    with output_dir_lock(output):  # one writer per folder (re-entrant under the fit command's lock)
        if not result.changed_weights:
            return save_routing_adapter(
                model, output, base_model_id=base_model_id, training_info=info, results=results
            )
        unpatch_model(model)
        model.save_pretrained(output)
        if tokenizer is not None:
            tokenizer.save_pretrained(output)
        write_json(output / "fit_results.json", to_json({"training": info, "results": results}))
        return output
