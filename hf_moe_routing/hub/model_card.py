"""Model cards of routing adapters, rendered with ``huggingface_hub``'s ``ModelCard`` / ``ModelCardData``.

The template is ``model_cards/routing_adapter.md`` (shipped inside the package as
``hf_moe_routing/hub/templates/routing_adapter.md``, a link to it). Measured results become the
card's ``model-index`` metadata (so the Hub shows them as evaluation results) and a table.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE_NAME = "routing_adapter.md"
#: Tag that marks cards written by this library (used to decide whether README.md may be replaced).
LIBRARY_TAG = "hf-moe-routing"
#: Dataset name used for results given as a flat ``{metric: value}`` mapping.
DEFAULT_DATASET = "evaluation"

_METRIC_NAMES = {
    "perplexity": "Perplexity",
    "mean_activated_experts": "Mean activated experts per token",
    "mean_activated": "Mean activated experts per token",
    "activation_reduction": "Activated experts reduction vs. top-k",
    "routed_flops_reduction": "Routed-expert FLOPs reduction vs. top-k",
    "flops_per_token_topk": "FLOPs per token (top-k)",
    "perplexity_change": "Perplexity change vs. top-k",
    "loss": "Loss",
    "activated_experts": "Mean activated experts per token",
    "flops_per_token": "FLOPs per token",
    "flops_reduction": "FLOPs reduction vs. top-k",
    "max_vio": "MaxVio",
    "avg_max_vio": "AvgMaxVio",
    "sup_max_vio": "SupMaxVio",
    "max_vio_global": "MaxVio (global)",
    "acc": "Accuracy",
    "acc_norm": "Accuracy (normalised)",
    "word_perplexity": "Word perplexity",
    "byte_perplexity": "Byte perplexity",
    "bits_per_byte": "Bits per byte",
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def template_path() -> Path:
    """Path of the packaged model-card template."""
    return Path(str(resources.files("hf_moe_routing.hub") / "templates" / TEMPLATE_NAME))


def is_hub_id(name: str | None) -> bool:
    """True for strings that look like Hub repo ids (``org/name``) and are not local paths."""
    return bool(name) and _REPO_ID.match(name) is not None and not os.path.exists(name)


#: keys of evaluation outputs (``evaluate_routing``) that describe the run, not a measured result
_NOT_RESULTS = frozenset(
    {
        "routing",
        "routing_config",
        "seq_len",
        "num_tokens",
        "num_batches",
        "num_experts",
        "top_k",
        "topk",
        "layers",
    }
)


def normalize_results(results: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    """``{dataset: {metric: value}}`` with finite scalar values only.

    Accepts ``{dataset: {metric: value}}``, a flat ``{metric: value}`` (filed under ``"evaluation"``),
    or a mix, e.g. ``{"wikitext-2": evaluate_routing(model, data, ...)}``. FLOPs breakdowns count
    with their ``total``; per-layer mappings, lists and run settings (``seq_len``, ``top_k``,
    ``routing_config``, ...) are left out of the card.
    """
    out: dict[str, dict[str, float]] = {}
    for key, value in (results or {}).items():
        if isinstance(value, Mapping) and not _is_breakdown(value) and key not in _NOT_RESULTS:
            metrics = _metrics(value)
            if metrics:
                out.setdefault(str(key), {}).update(metrics)
        else:
            out.setdefault(DEFAULT_DATASET, {}).update(_metrics({key: value}))
    return {dataset: metrics for dataset, metrics in out.items() if metrics}


def _is_breakdown(value: Mapping[str, Any]) -> bool:
    return "total" in value and _is_number(value["total"])


def _metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """Scalar metrics of one dataset (breakdowns by their total; per-layer data and settings dropped)."""
    out = {}
    for name, value in values.items():
        if name in _NOT_RESULTS:
            continue
        if isinstance(value, Mapping) and _is_breakdown(value):
            value = value["total"]
        if _is_number(value):
            out[str(name)] = float(value)
    return out


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def results_from_lm_eval(output: Mapping[str, Any], *, prefix: str = "") -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from the output of ``lm_eval.simple_evaluate`` (stderr values dropped).

    lm-eval keys metrics as ``"<metric>,<filter>"``; the ``none`` filter is dropped from the name.
    """
    if "results" not in output or not isinstance(output["results"], Mapping):
        raise ValueError("Expected the dict returned by lm_eval.simple_evaluate (with a 'results' key).")
    out: dict[str, dict[str, float]] = {}
    for task, metrics in output["results"].items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            metric, _, filter_name = str(key).partition(",")
            if metric == "alias" or metric.endswith("_stderr") or not _is_number(value):
                continue
            row[metric if filter_name in ("", "none") else f"{metric} ({filter_name})"] = float(value)
        if row:
            out[f"{prefix}{task}"] = row
    return out


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _rows(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(str(k), _format(v)) for k, v in data.items() if v is not None and v != {} and v != []]


def build_model_card(
    config: Mapping[str, Any], *, repo_id: str | None = None, template: str | os.PathLike | None = None
) -> ModelCard:
    """The model card of a routing adapter, from its ``routing_config.json`` contents.

    Args:
        config: the adapter config (see :func:`~hf_moe_routing.hub.adapter_config_dict`).
        repo_id: the Hub repo the card is for (used in the usage snippet and as model name).
        template: a custom Jinja template path (default: the packaged ``routing_adapter.md``).
    """
    routing = dict(config.get("routing") or {})
    routing_type = str(routing.pop("routing_type", "unknown"))
    base = config.get("base_model") or {}
    base_id = base.get("id") if is_hub_id(base.get("id")) else None
    shape = dict(config.get("moe_shape") or {})
    results = normalize_results(config.get("results"))
    family = str(shape.get("family", "moe"))

    model_name = (
        repo_id.split("/")[-1] if repo_id else f"{(base_id or family).split('/')[-1]}-{routing_type}-routing"
    )
    eval_results = [
        EvalResult(
            task_type="text-generation",
            task_name="Language modeling",
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type=metric,
            metric_name=_METRIC_NAMES.get(metric, metric),
            metric_value=value,
        )
        for dataset, metrics in results.items()
        for metric, value in metrics.items()
    ]
    card_data = ModelCardData(
        base_model=base_id,
        library_name=LIBRARY_TAG,
        pipeline_tag="text-generation",
        tags=[LIBRARY_TAG, "mixture-of-experts", "routing-adapter", f"routing-{routing_type}", family],
        model_name=model_name,
        eval_results=eval_results or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template or template_path()),
        title=f"{routing_type} routing for {base_id or family}",
        base_model=base_id,
        adapter_id=repo_id or "path/to/this/folder",
        routing_type=routing_type,
        routing_name={"topk": "top-k", "bip": "BIP-balanced", "adak": "Ada-K adaptive"}.get(
            routing_type, routing_type
        ),
        routing_settings=_rows(routing),
        shape=shape,
        shape_rows=_rows(shape),
        training_rows=_rows(config.get("training") or {}),
        result_rows=[
            (d, _METRIC_NAMES.get(m, m), _format(v)) for d, ms in results.items() for m, v in ms.items()
        ],
        library_version=(config.get("library") or {}).get("version", "unknown"),
    )
    check_model_card(card)
    return card


def check_model_card(card: ModelCard | str) -> ModelCard:
    """Validate a card offline, as far as the Hub's rules can be checked without a network.

    The text is parsed again with strict metadata checks (``ignore_metadata_errors=False``): the
    YAML header must parse, ``model-index`` must round-trip into evaluation results, and the
    fields the Hub expects to be typed (tags, base_model, library_name) must be. Raises ValueError.
    (``ModelCard.validate()`` asks the Hub itself and needs a network connection.)
    """
    text = str(card)
    if not text.startswith("---\n"):
        raise ValueError("The model card has no YAML metadata header.")
    try:
        parsed = ModelCard(text, ignore_metadata_errors=False)
    except yaml.YAMLError as error:
        raise ValueError(f"The model card's YAML metadata does not parse: {error}") from error
    data = parsed.data.to_dict()
    tags = data.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise ValueError(f"Model card tags must be a list of strings, got {tags!r}.")
    for key in ("base_model", "library_name", "pipeline_tag"):
        if key in data and not isinstance(data[key], (str, list)):
            raise ValueError(f"Model card field {key!r} must be a string, got {data[key]!r}.")
    if "base_model" in data and not all(
        is_hub_id(b)
        for b in ([data["base_model"]] if isinstance(data["base_model"], str) else data["base_model"])
    ):
        raise ValueError(f"Model card base_model must be a Hub repo id, got {data['base_model']!r}.")
    if "model-index" in data:
        results = parsed.data.eval_results or []
        expected = sum(
            len(r.get("metrics", [])) for entry in data["model-index"] for r in entry.get("results", [])
        )
        if len(results) != expected or not all(isinstance(r.metric_value, (int, float)) for r in results):
            raise ValueError("The model card's model-index does not parse into numeric evaluation results.")
    return parsed
