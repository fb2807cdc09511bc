"""``hf-moe-routing``: lm-eval's Hugging Face model (``HFLM``) with a pluggable router and routing statistics.

model_args, on top of all of ``hf``'s (``pretrained``, ``dtype``, ``device``, ``peft``, ...):

* ``routing=NAME`` -- patch the model with a routing method (any name of ``hf_moe_routing.ROUTING_METHODS``:
  ``topk``, ``bip``, ``adak``, ...); its settings as ``routing_<setting>=value`` (``routing_top_k=1``) or
  ``routing_config=`` a JSON object or the path of a JSON file (``{"routing_type": "topk", "top_k": 1}``).
* ``adapter=DIR_OR_HUB_ID`` -- load a saved routing adapter (it holds its routing config and state).

Without either the model keeps its own routing. Either way the model's MoE routing is measured while
lm-eval runs: mean activated experts (overall and per layer), MaxVio and the forward FLOPs per token (and
their reduction against the model's own top-k) are reported in ``results["config"]["routing_stats"]``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ...core.config import parse_json
from ...evaluation.evaluate import moe_shape, routing_name
from ...evaluation.flops import flops_per_token
from ...evaluation.stats import RoutingStats
from ...methods import ROUTING_METHODS, RoutingConfig, get_routing_class
from ...patching import get_patch_state, patch_model, unwrap_model
from .. import LM_EVAL_MODEL_NAME

logger = logging.getLogger(__name__)

#: key of the routing statistics in ``results["config"]``
REPORT_KEY = "routing_stats"

_last_report: dict[str, Any] | None = None


def _json_object(value: str | dict[str, Any], what: str) -> dict[str, Any]:
    """``value`` as a dict: a dict, a JSON object string, or the path of a JSON file holding one."""
    if isinstance(value, dict):
        return dict(value)
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a JSON object or a JSON file path, got {type(value).__name__}.")
    text = value.strip()
    if not text.startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(
                f"{what}={value!r} is neither a JSON object (like '{{\"top_k\": 1}}') nor an existing JSON file."
            )
        text = path.read_text(encoding="utf-8")
    data = parse_json(text, what)  # depth-limited, standard JSON (no NaN literals); names ``what``
    if not isinstance(data, dict):
        raise ValueError(f"{what} must hold a JSON object, got {type(data).__name__}.")
    return data


def routing_config_from_args(
    routing: str | None = None,
    routing_config: str | dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> RoutingConfig | None:
    """The routing config that model_args ask for (None: keep the model's routing).

    ``routing`` names the method, ``routing_config`` (dict, JSON string or JSON file) and ``settings`` (from
    ``routing_<setting>=value``; they win) give its settings. Unknown names or settings raise ValueError
    listing the known ones.
    """
    data = _json_object(routing_config, "routing_config") if routing_config is not None else {}
    settings = dict(settings or {})
    if routing is not None and not isinstance(routing, str):
        raise TypeError(f"routing must be a method name, got {routing!r}.")
    name = routing if routing is not None else data.get("routing_type")
    if name is None:
        if data or settings:
            given = sorted([*data, *(f"routing_{key}" for key in settings)])
            raise ValueError(
                f"Routing settings {given} were given without a method: add routing=NAME "
                f"(known: {', '.join(sorted(ROUTING_METHODS))})."
            )
        return None
    if data.get("routing_type", name) != name:
        raise ValueError(
            f"routing={name!r} contradicts routing_config's routing_type {data['routing_type']!r}."
        )
    get_routing_class(name)  # ValueError listing the known routings
    return RoutingConfig.from_dict({**data, **settings, "routing_type": name})


@register_model(LM_EVAL_MODEL_NAME)
class HFMoERoutingLM(HFLM):
    """lm-eval's ``hf`` model with ``routing=`` / ``adapter=`` model_args and routing statistics.

    Registered as ``hf-moe-routing`` (``import hf_moe_routing`` registers it with lm-eval).
    """

    def __init__(
        self,
        pretrained: Any,
        routing: str | None = None,
        routing_config: str | dict[str, Any] | None = None,
        adapter: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        settings = {
            key[len("routing_") :]: kwargs.pop(key) for key in list(kwargs) if key.startswith("routing_")
        }
        config = routing_config_from_args(routing, routing_config, settings)  # fail before loading the model
        if config is not None and adapter is not None:
            raise ValueError(
                "Pass either routing=... (a routing method) or adapter=... (a saved routing adapter, which "
                "stores its own routing config), not both."
            )
        if "device" not in kwargs and not torch.cuda.is_available():
            kwargs["device"] = "cpu"  # lm-eval's default is "cuda", which a CPU-only torch cannot use
        self._positions = 0  # sum over evaluated forward rows of L (row length)
        self._positions_sq = 0  # sum over evaluated forward rows of L^2
        self._measuring = False  # off while HFLM loads the model and probes batch sizes
        super().__init__(pretrained=pretrained, **kwargs)
        model = self.model
        if adapter is not None:
            from ...hub import load_routing_adapter

            load_routing_adapter(model, str(adapter))
        elif config is not None:
            patch_model(model, config)
        self.adapter_source = None if adapter is None else str(adapter)
        if self.batch_size_per_gpu != 1:
            logger.warning(
                "batch_size=%s: lm-eval right-pads batched requests without an attention mask, so the "
                "routing statistics include padding positions and routings that couple the tokens of a "
                "batch see them. Use batch_size=1 (the default) for exact routing statistics.",
                self.batch_size_per_gpu,
            )
        self.routing_stats = RoutingStats(model).attach()
        self._measuring = True

    @contextlib.contextmanager
    def _stats_paused(self) -> Iterator[None]:
        measuring, self._measuring = self._measuring, False
        if measuring:
            self.routing_stats.detach()
        try:
            yield
        finally:
            if measuring:
                self.routing_stats.attach()
            self._measuring = measuring

    def _detect_batch_size(self, *args: Any, **kwargs: Any) -> int:
        with self._stats_paused():  # probe batches are not part of the evaluation
            return super()._detect_batch_size(*args, **kwargs)

    def _model_call(self, inps: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._count_positions(inps)
        return super()._model_call(inps, *args, **kwargs)

    def _model_generate(self, context: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._count_positions(context)
        return super()._model_generate(context, *args, **kwargs)

    def reset_routing_stats(self) -> None:
        """Forget the routing statistics gathered so far."""
        self.routing_stats.reset()
        self._positions = self._positions_sq = 0

    def _count_positions(self, ids: torch.Tensor) -> None:
        if not self._measuring:
            return
        rows, length = ids.shape[:2]
        self._positions += rows * length
        self._positions_sq += rows * length * length

    @property
    def mean_seq_len(self) -> int:
        """Token-weighted mean length of the evaluated sequences, sum L^2 / sum L.

        Per-token attention FLOPs are linear in the sequence length, so the FLOPs per token at this
        length are the mean FLOPs per evaluated token.
        """
        return max(1, round(self._positions_sq / max(self._positions, 1)))

    def routing_report(self) -> dict[str, Any]:
        """Routing, mean activated experts, MaxVio and FLOPs per token of everything evaluated so far.

        Keys as in :func:`~hf_moe_routing.evaluation.evaluate.evaluate_routing`: ``routing``,
        ``routing_config``, ``adapter``, ``num_experts``, ``top_k``, ``num_tokens``, ``mean_activated``,
        ``activated_per_layer``, ``activation_reduction``, ``avg_max_vio``, ``sup_max_vio``,
        ``max_vio_per_layer``, ``seq_len`` (:attr:`mean_seq_len`), ``flops_per_token`` and
        ``flops_per_token_topk`` (breakdowns), ``flops_reduction``.
        """
        model = unwrap_model(self.model)  # the transformers model inside a PEFT wrapper (peft=...)
        shape = moe_shape(model)
        state = get_patch_state(model)
        summary = self.routing_stats.summary()
        report: dict[str, Any] = {
            "routing": routing_name(model),
            "routing_config": state.config.to_dict() if state is not None else None,
            "adapter": self.adapter_source,
            "num_experts": shape.num_experts,
            "top_k": shape.top_k,
            "num_tokens": summary["num_tokens"],
        }
        if not summary["num_tokens"]:
            return report
        layers = [str(i) for i in summary["layers"]]
        per_layer = [float(v) for v in summary["activated_per_layer"]]
        seq_len = self.mean_seq_len
        flops = flops_per_token(model, seq_len, activated=per_layer)
        flops_topk = flops_per_token(model, seq_len)
        report.update(
            mean_activated=float(summary["mean_activated"]),
            activated_per_layer=dict(zip(layers, per_layer)),
            activation_reduction=1.0 - float(summary["mean_activated"]) / shape.top_k,
            avg_max_vio=float(summary["avg_max_vio"]),
            sup_max_vio=float(summary["sup_max_vio"]),
            max_vio_per_layer=dict(zip(layers, map(float, summary["max_vio_global"]))),
            seq_len=seq_len,
            flops_per_token=flops.to_dict(),
            flops_per_token_topk=flops_topk.to_dict(),
            flops_reduction=1.0 - flops.total / flops_topk.total,
        )
        return report

    def get_model_info(self) -> dict[str, Any]:
        """lm-eval's model info plus :meth:`routing_report` under ``"routing_stats"`` (goes into results["config"])."""
        global _last_report
        info = super().get_model_info()
        _last_report = self.routing_report()
        info[REPORT_KEY] = _last_report
        return info


def evaluate_lm_eval(
    model: Any,
    tasks: list[str],
    *,
    tokenizer: Any = None,
    data_dir: str | os.PathLike | None = None,
    include_defaults: bool = True,
    model_args: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``model`` with our model type and tasks; returns lm-eval's results.

    Args:
        model: a loaded (patched or unpatched) transformers causal LM, or a local path / Hub id.
        tasks: lm-eval task names, e.g. ``["blimp_local", "wikitext2_local"]`` or any lm-eval task.
        tokenizer: the tokenizer (needed for a loaded model whose tokenizer lm-eval cannot find by name).
        data_dir: the data folder of the offline tasks (default: see :mod:`.task_data`).
        include_defaults: also index lm-eval's own tasks (False is ~20 s faster on a small CPU).
        model_args: further model_args (``routing``, ``routing_<setting>``, ``adapter``, ``dtype``, ...).
        kwargs: passed to ``lm_eval.simple_evaluate`` (``limit``, ``log_samples``, ...); ``batch_size``,
            ``max_batch_size`` and ``device`` go to the model.

    The routing statistics are in ``results["config"]["routing_stats"]``.
    """
    from lm_eval import simple_evaluate

    from . import check_tasks, task_manager

    model_args = dict(model_args or {})
    for name in ("batch_size", "max_batch_size", "device"):  # model settings, not simple_evaluate's here
        if name in kwargs:
            model_args[name] = kwargs.pop(name)
    from ...metrics.quiet_git import quiet_git

    manager = kwargs.pop("task_manager", None) or task_manager(
        data_dir=data_dir, include_defaults=include_defaults
    )
    check_tasks(list(tasks), manager)
    lm = HFMoERoutingLM(pretrained=model, tokenizer=tokenizer, **model_args)
    with quiet_git():
        return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, **kwargs)


def last_routing_report() -> dict[str, Any] | None:
    """The routing report of the last finished lm-eval run in this process (None before any)."""
    return _last_report


def format_routing_report(report: dict[str, Any]) -> str:
    """The report as a Markdown table, like lm-eval's result tables."""
    rows = [
        ("routing", report["routing"]),
        ("adapter", report.get("adapter") or "-"),
        ("experts", f"{report['num_experts']} routed, top-{report['top_k']}"),
    ]
    if "mean_activated" in report:
        per_layer = " ".join(f"{v:.2f}" for v in report["activated_per_layer"].values())
        flops, flops_topk = report["flops_per_token"]["total"], report["flops_per_token_topk"]["total"]
        rows += [
            ("tokens routed", str(report["num_tokens"])),
            ("mean activated experts", f"{report['mean_activated']:.3f} (per MoE layer: {per_layer})"),
            ("MaxVio avg / max over batches", f"{report['avg_max_vio']:.3f} / {report['sup_max_vio']:.3f}"),
            (
                f"FLOPs per token (seq_len {report['seq_len']})",
                f"{flops:.4g} (top-k {flops_topk:.4g}: {100 * abs(report['flops_reduction']):.1f}% "
                f"{'fewer' if report['flops_reduction'] >= 0 else 'more'})",
            ),
        ]
    else:
        rows.append(("tokens routed", "0 (no forward pass was run)"))
    rows.insert(0, ("routing statistics", "value"))
    width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    lines = [f"|{name:<{width}}|{value:<{value_width}}|" for name, value in rows]
    lines.insert(1, f"|{'-' * width}|{'-' * value_width}|")
    return "\n".join(lines)
