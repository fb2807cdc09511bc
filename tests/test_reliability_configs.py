"""Reliability, settings and saved state: strict routing configs (issue 10, item 3) and non-finite
settings and adapters refused where they enter (item 2)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from reliability_models import make_model
from safetensors.torch import load_file, save_file

from hf_moe_routing import (
    ROUTING_METHODS,
    AdaKConfig,
    BIPConfig,
    DynamicSkipConfig,
    LossControlledConfig,
    LossFreeConfig,
    RoutingConfig,
    TopKConfig,
    TopPConfig,
    fit_routing,
    get_patch_state,
    load_routing_adapter,
    patch_model,
    routing_layers,
    save_routing_adapter,
)
from hf_moe_routing.core.config import MAX_JSON_DEPTH, parse_json, read_json

NAN, INF = math.nan, math.inf

#: (config class, field, bad value, error type, message pattern), from every registered method's
#: ``RoutingConfig.bad_settings()``; every routing field is covered (the test below checks it).
BAD_SETTINGS = [
    (ROUTING_METHODS[name], *row) for name in ROUTING_METHODS for row in ROUTING_METHODS[name].bad_settings()
]
IDS = [f"{c.__name__}-{f}-{v!r}" for c, f, v, _, _ in BAD_SETTINGS]


@pytest.mark.parametrize(("cls", "field", "value", "error", "match"), BAD_SETTINGS, ids=IDS)
def test_bad_settings_are_refused_at_construction_and_at_json_load(cls, field, value, error, match):
    with pytest.raises(error, match=match):
        cls(**{field: value})
    with pytest.raises(error, match=match):
        RoutingConfig.from_dict({"routing_type": cls.routing_type, field: value})


@pytest.mark.parametrize(("cls", "field", "value", "error", "match"), BAD_SETTINGS[::4], ids=IDS[::4])
def test_a_setting_changed_after_construction_is_refused_by_patch_model(cls, field, value, error, match, ids):
    model = make_model("mixtral")
    before = model(ids).logits
    config = cls()
    setattr(config, field, value)
    with pytest.raises(error, match=match):
        patch_model(model, config)
    assert get_patch_state(model) is None
    assert torch.equal(model(ids).logits, before)


def test_every_routing_field_is_covered_by_the_bad_settings_table():
    from dataclasses import fields

    covered = {(cls.routing_type, f) for cls, f, *_ in BAD_SETTINGS}
    for name in ROUTING_METHODS:
        for f in fields(ROUTING_METHODS[name]):
            assert (name, f.name) in covered, (name, f.name)


def test_good_values_round_trip_through_json():
    configs = [
        TopKConfig(top_k=1),
        BIPConfig(num_iters=2, capacity_factor=1.5, update="before", update_in_eval=True, top_k=1),
        LossFreeConfig(update_rate=0.01, update_in_eval=True, sync_global=False),
        LossControlledConfig(coefficient=0, per_sequence=True),
        TopPConfig(p=1, max_k=2, normalize=False),
        DynamicSkipConfig(beta=0, quantile=0.25, renormalize=True),
        AdaKConfig(k_max=3, decision="sample", layers=[1, 0, 1], renormalize=None),
    ]
    for config in configs:
        again = RoutingConfig.from_dict(json.loads(config.to_json_string()))
        assert again == config and type(again) is type(config)
    assert configs[3].coefficient == 0.0 and isinstance(configs[3].coefficient, float)  # int -> float
    assert configs[-1].layers == [0, 1]


# ---- JSON files ------------------------------------------------------------------------------------
def _adapter(tmp_path, config=None):
    model = make_model("mixtral")
    patch_model(model, config or BIPConfig())
    fit_routing(
        model, torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0)), progress=False
    )
    return save_routing_adapter(model, tmp_path / "adapter", model_card=False)


def _edit_config(folder, edit):
    path = folder / "routing_config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (lambda d: d["routing"].update(update_in_eval="false"), TypeError, r"update_in_eval=.*true or false"),
        (lambda d: d["routing"].update(top_k=2.0), TypeError, r"top_k=.*integer"),
        (lambda d: d["routing"].update(capacity_factor=float("nan")), ValueError, "NaN"),
        (lambda d: d["routing"].update(num_iters=True), TypeError, "integer"),
        (lambda d: d["routing"].update(no_such_setting=1), ValueError, "Unknown BIPConfig settings"),
        (lambda d: d["routing"].update(routing_type="nope"), ValueError, "nope"),
    ],
    ids=["string-false", "float-k", "nan", "bool-int", "unknown", "unknown-method"],
)
def test_bad_settings_in_an_adapters_json_are_refused_and_the_model_stays_unpatched(
    tmp_path, edit, error, match
):
    folder = _adapter(tmp_path)
    _edit_config(folder, edit)
    model = make_model("mixtral")
    with pytest.raises(error, match=match):
        load_routing_adapter(model, folder)
    assert get_patch_state(model) is None


def test_a_deeply_nested_adapter_config_is_a_clear_error_not_a_recursion_error(tmp_path):
    folder = _adapter(tmp_path)
    depth = 200_000
    (folder / "routing_config.json").write_text('{"routing": ' + "[" * depth + "]" * depth + "}")
    model = make_model("mixtral")
    with pytest.raises(ValueError, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
        load_routing_adapter(model, folder)
    assert get_patch_state(model) is None


def test_json_reader_refuses_depth_nan_literals_and_truncation(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"routing_type": "bip", "capacity_factor": NaN}')
    with pytest.raises(ValueError, match="non-standard JSON number NaN"):
        read_json(path)
    assert math.isnan(read_json(path, allow_nan=True)["capacity_factor"])  # old results may hold NaN
    with pytest.raises(ValueError, match="finite"):  # ... but a config field never accepts it
        RoutingConfig.from_dict(read_json(path, allow_nan=True))
    path.write_text('{"routing_type": "bip", "num_')
    with pytest.raises(ValueError, match="truncated"):
        read_json(path)
    with pytest.raises(ValueError, match="nested deeper"):
        parse_json("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    assert parse_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_json(path)


def _rewrite_weights(folder, tensors):
    """Write ``tensors`` as the adapter's weights *with* a matching content hash: an adapter saved with
    corrupt state by another tool (a hash mismatch alone is refused earlier, see test_adapter_io)."""
    path = folder / "routing_adapter.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((folder / "routing_config.json").read_text())
    config["weights_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "routing_config.json").write_text(json.dumps(config))


# ---- item 2: non-finite saved state is refused at load ------------------------------------------
@pytest.mark.parametrize(
    ("config", "key", "value"),
    [
        (BIPConfig(), "q", float("nan")),
        (BIPConfig(), "q", float("inf")),
        (LossFreeConfig(), "bias", float("nan")),
        (DynamicSkipConfig(), "beta", float("inf")),  # NaN means "not calibrated"; inf is corrupt
        (AdaKConfig(), "allocator.weight", float("nan")),
        (AdaKConfig(), "allocator.weight", -float("inf")),
    ],
    ids=["bip-nan", "bip-inf", "loss-free-nan", "skip-inf", "adak-nan", "adak-inf"],
)
def test_an_adapter_with_non_finite_tensors_is_refused_at_load(tmp_path, config, key, value, ids):
    model = make_model("mixtral")
    patch_model(model, config)
    if config.requires == "training":  # trained state: mark it trained
        for layer in routing_layers(model).values():
            layer.num_updates.fill_(1)
    elif config.requires == "fitting":
        fit_routing(model, ids, progress=False)
    folder = save_routing_adapter(model, tmp_path / "adapter", model_card=False)
    path = folder / "routing_adapter.safetensors"
    tensors = load_file(path)
    tensors[f"layers.1.{key}"].view(-1)[0] = value
    _rewrite_weights(folder, tensors)

    target = make_model("mixtral")
    before = target(ids).logits
    with pytest.raises(ValueError, match=rf"'{key}' of .*layer 1 .*NaN or infinite.*corrupt"):
        load_routing_adapter(target, folder)
    assert get_patch_state(target) is None
    assert torch.equal(target(ids).logits, before)

    patch_model(target, TopKConfig(top_k=1))  # a previous routing is restored after the refusal
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_routing_adapter(target, folder, replace=True)
    assert get_patch_state(target).config == TopKConfig(top_k=1)


def test_a_skip_threshold_outside_0_1_is_refused_at_load(tmp_path, ids):
    model = make_model("mixtral")
    patch_model(model, DynamicSkipConfig(beta=0.3))
    folder = save_routing_adapter(model, tmp_path / "adapter", model_card=False)
    path = folder / "routing_adapter.safetensors"
    tensors = load_file(path)
    tensors["layers.0.beta"].fill_(5.0)
    _rewrite_weights(folder, tensors)
    target = make_model("mixtral")
    with pytest.raises(
        ValueError, match=r"'beta' of dynamic-skipping routing of layer 0 .* is 5.0, outside \[0, 1\]"
    ):
        load_routing_adapter(target, folder)
    assert get_patch_state(target) is None
