"""Model cards of routing adapters, rendered with ``huggingface_hub``'s ``ModelCard`` / ``ModelCardData``.

The template is ``model_cards/routing_adapter.md`` (shipped inside the package as
``hf_moe_routing/hub/templates/routing_adapter.md``, a link to it). Measured results become the
card's ``model-index`` metadata (so the Hub shows them as evaluation results) and a table; only
measured metrics go there, under their proper names (``eval_ppl`` is "Perplexity"), and local
corpora are named by the Hub dataset they come from. Settings that did not take part in the run
(bookkeeping, a warm start that was skipped) are left out of the training table. A folder that
also holds a PEFT (LoRA) adapter gets a card that describes both and loads both.
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

from ..data.corpora import HUB_EQUIVALENTS
from .base_model import is_hub_id

TEMPLATE_NAME = "routing_adapter.md"
#: Tag that marks cards written by this library (used to decide whether README.md may be replaced).
LIBRARY_TAG = "hf-moe-routing"
#: Dataset name used for results given as a flat ``{metric: value}`` mapping.
DEFAULT_DATASET = "evaluation"

#: canonical metric name -> the name shown on the Hub
METRIC_NAMES = {
    "perplexity": "Perplexity",
    "perplexity_topk": "Perplexity (model's own top-k)",
    "perplexity_change": "Perplexity change vs. top-k",
    "loss": "Loss (mean NLL, nats)",
    "loss_topk": "Loss (model's own top-k)",
    "mean_activated_experts": "Mean activated experts per token",
    "activation_reduction": "Activated experts reduction vs. top-k",
    "flops_per_token": "FLOPs per token",
    "flops_per_token_topk": "FLOPs per token (top-k)",
    "flops_reduction": "FLOPs reduction vs. top-k",
    "routed_flops_reduction": "Routed-expert FLOPs reduction vs. top-k",
    "max_vio": "MaxVio",
    "avg_max_vio": "AvgMaxVio",
    "avg_max_vio_topk": "AvgMaxVio (model's own top-k)",
    "sup_max_vio": "SupMaxVio",
    "max_vio_global": "MaxVio (global)",
    "acc": "Accuracy",
    "acc_norm": "Accuracy (normalised)",
    "word_perplexity": "Word perplexity",
    "byte_perplexity": "Byte perplexity",
    "bits_per_byte": "Bits per byte",
}
#: raw result keys (trainer logs, evaluate_routing) -> canonical metric name
METRIC_ALIASES = {
    "ppl": "perplexity",
    "ppl_topk": "perplexity_topk",
    "nll": "loss",
    "nll_topk": "loss_topk",
    "mean_activated": "mean_activated_experts",
    "activated_mean": "mean_activated_experts",
    "activated_experts": "mean_activated_experts",
    "topk_avg_max_vio": "avg_max_vio_topk",
    "topk_perplexity": "perplexity_topk",
}
#: keys of evaluation outputs that describe the run, not a measured result
_NOT_RESULTS = frozenset(
    {"routing", "routing_config", "seq_len", "num_experts", "top_k", "topk", "layers", "default_k", "model"}
)
_NOT_RESULT_PATTERN = re.compile(r"(^num_|_batches$|^batches$|_tokens$|^tokens$|_steps$|^steps$|_per_layer$)")
#: training settings that never change the result (left off the card)
_BOOKKEEPING = frozenset(
    {
        "output_dir",
        "logging_steps",
        "logging_first_step",
        "save_steps",
        "save_total_limit",
        "eval_steps",
        "report_to",
        "progress_bar",
        "disable_tqdm",
        "log_level",
        "verify_base_unchanged",
        "overwrite",
        "resume",
        "resume_from_checkpoint",
        "quiet",
    }
)


def template_path() -> Path:
    """Path of the packaged model-card template."""
    return Path(str(resources.files("hf_moe_routing.hub") / "templates" / TEMPLATE_NAME))


def may_replace_card(path: Path) -> bool:
    """Write README.md if absent, if it is an hf-moe-routing card, or PEFT's unedited generated card.

    PEFT's ``save_pretrained`` writes a template card (``library_name: peft``, "[More Information
    Needed]"); ours replaces it so that the card describes both adapters. Anything else is the user's.
    """
    if not path.exists():
        return True
    try:
        text = path.read_text(encoding="utf-8")
        data = ModelCard(text).data.to_dict() if text.startswith("---") else {}
    except Exception:  # noqa: BLE001 - an unparsable README is the user's: keep it
        return False
    peft_template = data.get("library_name") == "peft" and "[More Information Needed]" in text
    return LIBRARY_TAG in (data.get("tags") or []) or peft_template


# ---- results ----------------------------------------------------------------------------------
def metric_name(key: str) -> str | None:
    """The canonical metric name of a raw result key, or None if the key is not a measured result."""
    name = str(key)
    if name.startswith("eval_"):
        name = name[len("eval_") :]
    name = METRIC_ALIASES.get(name, name)
    if name in METRIC_NAMES:
        return name
    if name in _NOT_RESULTS or _NOT_RESULT_PATTERN.search(name):
        return None
    return name


def normalize_results(results: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    """``{dataset: {metric: value}}`` with canonical metric names and finite scalar values only.

    Accepts ``{dataset: {metric: value}}``, a flat ``{metric: value}`` (filed under ``"evaluation"``),
    or a mix, e.g. ``{"wikitext-2/test": evaluate_routing(model, data, ...)}``. FLOPs breakdowns
    count with their ``total``; raw names are mapped (``eval_ppl`` -> ``perplexity``); per-layer
    data, counts of batches/tokens/steps and run settings (``seq_len``, ``top_k``) are left out.
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
    out = {}
    for key, value in values.items():
        name = metric_name(key)
        if name is None:
            continue
        if isinstance(value, Mapping) and _is_breakdown(value):
            value = value["total"]
        if _is_number(value):
            out[name] = float(value)
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


def dataset_info(name: str) -> dict[str, str | None]:
    """Hub dataset id (``type``), display ``name``, ``config`` and ``split`` of a results key.

    Local corpora map to the Hub dataset they come from (``wikitext-2/test`` -> ``Salesforce/wikitext``,
    configuration ``wikitext-2-v1``, split ``test``); ``"id:split"`` or a Hub id is kept; other
    names (a local file) are used as given.
    """
    if name in HUB_EQUIVALENTS:
        hub_id, config, split = HUB_EQUIVALENTS[name]
        return {"type": hub_id, "name": name, "config": config, "split": split}
    base, _, split = name.partition(":")
    if is_hub_id(base) and "/" in base:
        return {"type": base, "name": name, "config": None, "split": split or None}
    return {"type": name, "name": name, "config": None, "split": None}


# ---- training settings ------------------------------------------------------------------------
def settings_that_ran(training: Mapping[str, Any]) -> dict[str, Any]:
    """The training settings worth showing: bookkeeping and skipped steps left out.

    A warm start that was skipped (``warmup`` ``"random"``/``"none"``, or ``warmup_steps`` 0) drops
    the ``warmup_*`` and calibration settings; a run without optimisation steps (``max_steps`` 0)
    drops the optimiser settings of the main phase.
    """
    out = {k: v for k, v in training.items() if k not in _BOOKKEEPING and v is not None}
    warmup = str(out.get("warmup", "")).lower()
    if warmup in ("random", "none") or out.get("warmup_steps") == 0:
        out = {k: v for k, v in out.items() if not k.startswith(("warmup_", "calibration"))}
    if out.get("max_steps") == 0:
        main_phase = {"learning_rate", "weight_decay", "k_penalty", "gamma", "clip_epsilon", "ppo_epochs"}
        main_phase |= {"advantage_normalization", "entropy_coef", "max_grad_norm", "lr_scheduler_type"}
        out = {k: v for k, v in out.items() if k not in main_phase}
    return out


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _rows(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(str(k), _format(v)) for k, v in data.items() if v is not None and v != {} and v != []]


def _peft_rows(peft: Mapping[str, Any]) -> list[tuple[str, str]]:
    keys = ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "target_parameters")
    keys += ("modules_to_save", "base_model_name_or_path")
    return _rows({k: peft.get(k) for k in keys})


# ---- the card -----------------------------------------------------------------------------------
def build_model_card(
    config: Mapping[str, Any],
    *,
    repo_id: str | None = None,
    template: str | os.PathLike | None = None,
    peft_config: Mapping[str, Any] | None = None,
) -> ModelCard:
    """The model card of a routing adapter, from its ``routing_config.json`` contents.

    Args:
        config: the adapter config (see :func:`~hf_moe_routing.hub.adapter_config_dict`).
        repo_id: the Hub repo the card is for (used in the usage snippet and as model name).
        template: a custom Jinja template path (default: the packaged ``routing_adapter.md``).
        peft_config: PEFT's ``adapter_config.json`` of a LoRA adapter in the same folder: the card
            then describes both adapters and loads both.

    Raises:
        ValueError: the rendered card's metadata does not validate (see :func:`check_model_card`).
    """
    routing = dict(config.get("routing") or {})
    routing_type = str(routing.pop("routing_type", "unknown"))
    base = config.get("base_model") or {}
    base_id = base.get("id") if is_hub_id(base.get("id")) else None
    if base_id is None and peft_config and is_hub_id(peft_config.get("base_model_name_or_path")):
        base_id = peft_config["base_model_name_or_path"]
    shape = dict(config.get("moe_shape") or {})
    results = normalize_results(config.get("results"))
    family = str(shape.get("family", "moe"))

    model_name = (
        repo_id.split("/")[-1] if repo_id else f"{(base_id or family).split('/')[-1]}-{routing_type}-routing"
    )
    eval_results = []
    for dataset, metrics in results.items():
        info = dataset_info(dataset)
        eval_results += [
            EvalResult(
                task_type="text-generation",
                task_name="Language modeling",
                dataset_type=info["type"],
                dataset_name=info["name"],
                dataset_config=info["config"],
                dataset_split=info["split"],
                metric_type=metric,
                metric_name=METRIC_NAMES.get(metric, metric.replace("_", " ")),
                metric_value=value,
            )
            for metric, value in metrics.items()
        ]
    datasets = sorted({t for t in (dataset_info(d)["type"] for d in results) if "/" in t and is_hub_id(t)})
    tags = [LIBRARY_TAG, "mixture-of-experts", "routing-adapter", f"routing-{routing_type}", family]
    if peft_config:
        tags += ["peft", str(peft_config.get("peft_type", "lora")).lower()]
    card_data = ModelCardData(
        base_model=base_id,
        library_name=LIBRARY_TAG,
        pipeline_tag="text-generation",
        tags=tags,
        datasets=datasets or None,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template or template_path()),
        title=f"{routing_type} routing for {base_id or family}"
        + (" (with a LoRA adapter)" if peft_config else ""),
        base_model=base_id,
        adapter_id=repo_id or "path/to/this/folder",
        routing_type=routing_type,
        routing_name=_display_name(routing_type),
        routing_settings=_rows(routing),
        shape=shape,
        shape_rows=_rows(shape),
        training_rows=_rows(settings_that_ran(config.get("training") or {})),
        result_rows=[
            (dataset_info(d)["name"], METRIC_NAMES.get(m, m.replace("_", " ")), _format(v))
            for d, ms in results.items()
            for m, v in ms.items()
        ],
        peft_rows=_peft_rows(peft_config) if peft_config else [],
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


def _display_name(routing_type: str) -> str:
    """The method's name in prose (``RoutingConfig.display_name``); the type itself if unknown."""
    from ..methods import ROUTING_METHODS

    if routing_type not in ROUTING_METHODS:
        return routing_type
    return ROUTING_METHODS[routing_type].display_name or routing_type
