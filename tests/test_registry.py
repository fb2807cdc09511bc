"""Registration (issue 21): one table of built-ins, no silent fall-through, wrong bases refused."""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from hf_moe_routing import (
    FAMILIES,
    ROUTING_METHODS,
    MoEFamily,
    RoutingConfig,
    register_family,
    register_routing,
)
from hf_moe_routing.core import registry as registry_module
from hf_moe_routing.core.registry import Registry
from hf_moe_routing.families import GenericFamily
from hf_moe_routing.methods import TopKConfig

PACKAGE = Path(__file__).resolve().parents[1] / "hf_moe_routing"


def _family_classes() -> list[type[MoEFamily]]:
    """Every family class defined in a module of ``families/`` (the generic detector excepted)."""
    found = []
    for path in sorted((PACKAGE / "families").glob("*.py")):
        module = importlib.import_module(
            f"hf_moe_routing.families.{path.stem}" if path.stem != "__init__" else "hf_moe_routing.families"
        )
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (
                cls.__module__ == module.__name__
                and issubclass(cls, MoEFamily)
                and cls not in (MoEFamily, GenericFamily)
            ):
                found.append(cls)
    return found


def test_every_family_file_is_registered():
    classes = _family_classes()
    assert classes, "no family classes found"
    for cls in classes:
        assert cls.model_types, f"{cls.__qualname__} serves no model_types"
        for model_type in cls.model_types:
            assert FAMILIES.builtin().get(model_type) == f"{cls.__module__}:{cls.__qualname__}", (
                f"{cls.__module__}.{cls.__qualname__} serves {model_type!r} but is not in families/__init__.py:_BUILTIN "
                "(a family file that is not listed there is never used)"
            )
            assert FAMILIES[model_type] is cls
    # and every table entry points at a class that serves that model type
    for model_type in FAMILIES.builtin():
        assert model_type in FAMILIES[model_type].model_types, model_type


def test_every_method_folder_is_registered():
    folders = sorted(p.name for p in (PACKAGE / "methods").iterdir() if (p / "__init__.py").is_file())
    assert folders, "no method folders found"
    table = ROUTING_METHODS.builtin()
    assert sorted(table) == folders, (
        "a method folder without a line in methods/base.py:ROUTING_METHODS, or the reverse"
    )
    for name in folders:
        cls = ROUTING_METHODS[name]
        assert cls.routing_type == name
        assert cls.__module__.startswith(f"hf_moe_routing.methods.{name}."), cls.__module__
        assert cls.requires in ("nothing", "fitting", "training", "router_training"), (name, cls.requires)


def test_the_registries_refuse_a_class_of_the_wrong_base():
    with pytest.raises(TypeError, match="must be a subclass of hf_moe_routing.methods.base.RoutingConfig"):
        register_routing(type("NotAConfig", (), {"routing_type": "not_a_config"}))
    with pytest.raises(TypeError, match="must be a subclass of hf_moe_routing.families.base.MoEFamily"):
        FAMILIES.register("not_a_family", TopKConfig)
    with pytest.raises(TypeError, match="MoEFamily"):
        register_family(type("Nope", (), {"model_types": ("nope",)}))
    assert "not_a_config" not in ROUTING_METHODS and "not_a_family" not in FAMILIES
    # a lazy entry is checked when it loads
    lazy = Registry("model family", MoEFamily, {"x": "hf_moe_routing.methods.topk.config:TopKConfig"})
    with pytest.raises(TypeError, match="must be a subclass"):
        lazy["x"]


def test_a_name_is_registered_once_and_built_ins_stay():
    with pytest.raises(ValueError, match="named .bip. is already registered|reserved for"):
        ROUTING_METHODS.register("bip", TopKConfig)
    with pytest.raises(ValueError, match="cannot be unregistered"):
        ROUTING_METHODS.unregister("bip")
    with pytest.raises(ValueError, match="Unknown routing method 'nope'. Known: adak, bip"):
        ROUTING_METHODS["nope"]


def test_third_party_entry_points_are_found_on_first_use(monkeypatch):
    point = EntryPoint(
        "third_party_topk", "hf_moe_routing.methods.topk.config:TopKConfig", "hf_moe_routing.methods"
    )
    seen = []

    def fake_entry_points(group):
        seen.append(group)
        return [point] if group == "hf_moe_routing.methods" else []

    monkeypatch.setattr(registry_module, "entry_points", fake_entry_points)
    registry = Registry(
        "routing method",
        RoutingConfig,
        {"topk": "hf_moe_routing.methods.topk.config:TopKConfig"},
        entry_point_group="hf_moe_routing.methods",
    )
    assert registry["topk"] is TopKConfig and seen == []  # a built-in needs no scan
    assert registry["third_party_topk"] is TopKConfig and seen == ["hf_moe_routing.methods"]
    assert "third_party_topk" in list(registry) and seen == ["hf_moe_routing.methods"]  # scanned once


def test_fitting_follows_the_requires_trait(ids):
    """What a routing needs before use is one trait on its config; ``fit_routing`` reads only that."""
    from hf_moe_routing import AdaKConfig, BIPConfig, LossControlledConfig, fit_routing, patch_model
    from hf_moe_routing.recipes.fitting import changes_weights, fit_on_data
    from hf_moe_routing.testing import tiny_model

    refused = [
        (TopKConfig(), "no state to fit"),
        (AdaKConfig(), "trained, not fitted.*AdaKTrainer"),
        (LossControlledConfig(), "fine-tunes the router weights"),
    ]
    for config, match in refused:
        with pytest.raises(ValueError, match=match):
            fit_routing(patch_model(tiny_model("mixtral"), config), ids, progress=False)
    with pytest.raises(ValueError, match="trained, not fitted"):
        fit_on_data(tiny_model("mixtral"), AdaKConfig(), ids, ids, progress=False)
    assert changes_weights(LossControlledConfig()) and not changes_weights(BIPConfig())
    fitted = fit_routing(patch_model(tiny_model("mixtral"), BIPConfig()), ids, progress=False)
    assert fitted["routing"] == "bip" and fitted["tokens"] == ids.numel()


def test_names_of_earlier_versions_still_import_and_name_their_replacement():
    import hf_moe_routing
    from hf_moe_routing.testing import tiny_model

    with pytest.warns(FutureWarning, match="use hf_moe_routing.FAMILIES"):
        from hf_moe_routing import ADAPTERS
    assert ADAPTERS is hf_moe_routing.FAMILIES
    with pytest.warns(FutureWarning, match="MoEFamily"):
        assert hf_moe_routing.MoEAdapter is hf_moe_routing.MoEFamily
    with pytest.warns(FutureWarning, match="register_family"):
        assert hf_moe_routing.register_adapter is hf_moe_routing.register_family
    model = tiny_model("mixtral")
    with pytest.warns(FutureWarning, match="describe_model"):
        family, blocks = hf_moe_routing.get_adapter(model)
    described = hf_moe_routing.describe_model(model)
    assert type(family) is type(described.family)
    assert len(blocks) == len(described.blocks) == model.config.num_hidden_layers
