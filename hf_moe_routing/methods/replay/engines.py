"""Routed experts returned by inference engines, as :class:`~.record.RoutedExperts` rows.

**vLLM** (``LLM(..., enable_return_routed_experts=True)``, PR #28284): every
``CompletionOutput`` of a ``RequestOutput`` carries ``routed_experts``, a NumPy int32 array
``(num_tokens - 1, num_hidden_layers, num_experts_per_tok)`` where ``num_tokens = len(prompt_token_ids)
+ len(token_ids)``: row t holds the experts token t of prompt + completion used (the last sampled
token is never forwarded, hence the ``- 1``); the layer axis is the decoder-layer index
(``vllm/model_executor/layers/fused_moe/routed_experts_capturer.py`` sizes it ``num_hidden_layers``
and writes ``[:, layer_id, :]``; dense layers stay 0). Ids are logical expert ids (keep expert-
parallel load balancing, EPLB, off: it maps them to physical replicas).

**SGLang** (``--enable-return-routed-experts``, request ``return_routed_experts=True``): the
response's ``meta_info["routed_experts"]`` is a base64 string of the same array flattened
row-major, ``(seqlen - 1, num_layers, top_k)`` in int32 (or in ``meta_info["routed_experts_dtype"]``
where the server sends a narrower type); ``seqlen`` counts prompt + output tokens.

Both give one row per completion; a layer axis of ``num_hidden_layers`` is read at the model's MoE
layers (an axis of exactly the MoE layers is taken as is). A -1 slot (SGLang's placeholder) becomes
an unused slot.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from ...families import MoEModel, describe_model
from .tokens import prefix_hashes

_DTYPES = {"int32": np.int32, "int16": np.int16, "uint16": np.uint16, "uint8": np.uint8, "int64": np.int64}


def _described(model: Any) -> MoEModel:
    return model if isinstance(model, MoEModel) else describe_model(model)


def engine_row(
    token_ids: Sequence[int], routed: Any, described: MoEModel, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row ``(experts (T, L, S), token_hashes (T,))`` from an engine's ``(T, layers, k)`` array.

    ``token_ids`` are the prompt + completion ids (T + 1 of them, or T); ``where`` names the row in errors.
    """
    array = np.asarray(routed)
    if array.ndim != 3:
        raise ValueError(f"{where}: routed experts must be (tokens, layers, top_k), got shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{where}: routed experts must be integers, got {array.dtype}.")
    ids = [int(t) for t in token_ids]
    tokens = array.shape[0]
    if tokens not in (len(ids) - 1, len(ids)):
        raise ValueError(
            f"{where}: {tokens} tokens of routed experts for {len(ids)} prompt + completion tokens; the engine "
            f"returns one per forwarded token ({len(ids) - 1}: all but the last sampled one)."
        )
    shape = described.shape
    moe = [b.layer_index for b in described.blocks]
    if array.shape[1] == shape.num_hidden_layers:
        array = array[:, moe]
    elif array.shape[1] != len(moe):
        raise ValueError(
            f"{where}: the layer axis has {array.shape[1]} entries; the model has {shape.num_hidden_layers} layers, "
            f"{len(moe)} of them MoE ({moe}). Was it recorded on another model?"
        )
    experts = torch.from_numpy(array.astype(np.int64))
    experts = experts.masked_fill(experts == -1, shape.num_experts)
    hashes = torch.tensor(prefix_hashes(ids[:tokens]), dtype=torch.int64)
    return experts, hashes


def from_vllm(cls: type, outputs: Any, model: Any) -> Any:
    """``RoutedExperts`` with one row per vLLM completion, in order.

    Args:
        outputs: vLLM ``RequestOutput`` objects (or one): ``prompt_token_ids`` and ``outputs[i].token_ids``
            / ``.routed_experts`` are read; or ``(token_ids, routed_experts)`` pairs with the full
            prompt + completion ids.
        model: the transformers model (or its :class:`MoEModel`) the rollout ran.

    Raises:
        ValueError: a completion without ``routed_experts`` (start vLLM with
            ``enable_return_routed_experts=True``), or shapes / ids that do not fit the model.
    """
    described = _described(model)
    rows = []
    for number, (ids, routed) in enumerate(_vllm_pairs(outputs)):
        if routed is None:
            raise ValueError(
                f"vLLM completion {number} has no routed_experts: start the engine with "
                "enable_return_routed_experts=True (vLLM >= 0.12)."
            )
        rows.append(engine_row(ids, routed, described, f"vLLM completion {number}"))
    return _build(cls, described, rows)


def _vllm_pairs(outputs: Any) -> Iterable[tuple[list[int], Any]]:
    if hasattr(outputs, "outputs") and hasattr(outputs, "prompt_token_ids"):
        outputs = [outputs]
    for item in outputs:
        if hasattr(item, "outputs") and hasattr(item, "prompt_token_ids"):
            prompt = list(item.prompt_token_ids or [])
            for completion in item.outputs:
                yield prompt + list(completion.token_ids), getattr(completion, "routed_experts", None)
        elif isinstance(item, tuple) and len(item) == 2:
            yield list(item[0]), item[1]
        else:
            raise TypeError(
                f"Expected vLLM RequestOutput objects or (token_ids, routed_experts) pairs, got {type(item).__name__}."
            )


def decode_sglang(payload: Any, dtype: str | None = None) -> np.ndarray:
    """SGLang's base64 ``routed_experts`` payload as a flat NumPy array (int32 unless ``dtype`` says otherwise)."""
    name = (dtype or "int32").strip().lower()
    if name not in _DTYPES:
        raise ValueError(f"Unknown routed_experts dtype {dtype!r}; SGLang sends one of {sorted(_DTYPES)}.")
    if isinstance(payload, str):
        return np.frombuffer(base64.b64decode(payload.encode("ascii")), dtype=_DTYPES[name])
    return np.asarray(payload)


def from_sglang(cls: type, responses: Any, model: Any) -> Any:
    """``RoutedExperts`` with one row per SGLang response, in order.

    Args:
        responses: ``(token_ids, response)`` pairs: the full prompt + output ids, and the response dict
            (its ``meta_info["routed_experts"]`` is read), its ``meta_info`` alone, the base64 string, or an
            array (flat or ``(tokens, layers, top_k)``).
        model: the transformers model (or its :class:`MoEModel`) the rollout ran.
    """
    described = _described(model)
    rows = []
    for number, item in enumerate(responses):
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(
                f"SGLang response {number}: pass (token_ids, response) pairs, got {type(item).__name__}."
            )
        ids, response = item
        meta = response.get("meta_info", response) if isinstance(response, dict) else {}
        payload = meta.get("routed_experts") if isinstance(response, dict) else response
        if payload is None:
            raise ValueError(
                f"SGLang response {number} has no routed_experts: launch the server with "
                "--enable-return-routed-experts and send return_routed_experts=True."
            )
        flat = decode_sglang(payload, meta.get("routed_experts_dtype"))
        rows.append(
            engine_row(
                ids, _reshape(flat, len(ids), described, number), described, f"SGLang response {number}"
            )
        )
    return _build(cls, described, rows)


def _reshape(flat: np.ndarray, num_ids: int, described: MoEModel, number: int) -> np.ndarray:
    if flat.ndim == 3:
        return flat
    shape = described.shape
    for layers in (shape.num_hidden_layers, len(described.blocks)):
        per_token = layers * shape.top_k
        for tokens in (num_ids - 1, num_ids):
            if flat.size == tokens * per_token:
                return flat.reshape(tokens, layers, shape.top_k)
    raise ValueError(
        f"SGLang response {number}: {flat.size} expert ids do not make (tokens = {num_ids - 1}, layers = "
        f"{shape.num_hidden_layers} or {len(described.blocks)}, top_k = {shape.top_k}) for this model."
    )


def _build(cls: type, described: MoEModel, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    return cls(
        [b.layer_index for b in described.blocks],
        described.shape.num_experts,
        [r[0] for r in rows],
        [r[1] for r in rows],
    )
