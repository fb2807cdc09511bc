"""The Mixture-of-Experts causal-LM families of the installed transformers, found by itself.

No hand list: a family is a ``model_type`` whose causal-LM class (from transformers' auto mapping
``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, or a ``*ForCausalLM`` class that a MoE modeling file defines
but the mapping omits) lives in a modeling file that defines Mixture-of-Experts classes (a class
named ``*Experts``, ``*MoE``/``*Moe``, ``*SparseMoeBlock`` or ``*MoELayer``). Multimodal configs are
represented by their text model type when that type has its own causal-LM entry. The scan reads
source files only (no model is imported or built), so a new transformers release is covered the day
it is installed.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

_CLASS = re.compile(r"^class (\w+)\(", re.M)
_MOE_CLASS = re.compile(r"(Experts|MoE|Moe|SparseMoeBlock|MoELayer)$")


@dataclass(frozen=True)
class CatalogEntry:
    """One MoE causal-LM family of the installed transformers.

    Attributes:
        model_type: ``config.model_type`` (the text model type of multimodal configs).
        causal_lm_class: name of its ``*ForCausalLM`` class in ``transformers``.
        modeling_file: the file that defines that class (relative to ``transformers/models``).
        in_auto_mapping: False for causal-LM classes ``AutoModelForCausalLM`` does not know.
    """

    model_type: str
    causal_lm_class: str
    modeling_file: str
    in_auto_mapping: bool = True


@functools.lru_cache(maxsize=1)
def _modeling_classes() -> tuple[dict[str, Path], frozenset[Path]]:
    """``(class name -> modeling file, modeling files that define MoE classes)``."""
    import transformers

    root = Path(transformers.__file__).parent / "models"
    defined: dict[str, Path] = {}
    moe_files: set[Path] = set()
    for path in sorted(root.glob("*/modeling_*.py")):
        for name in _CLASS.findall(path.read_text(encoding="utf-8")):
            defined.setdefault(name, path)
            if _MOE_CLASS.search(name):
                moe_files.add(path)
    return defined, frozenset(moe_files)


@functools.lru_cache(maxsize=1)
def moe_families() -> tuple[CatalogEntry, ...]:
    """Every MoE causal-LM family of the installed transformers, sorted by model type."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

    defined, moe_files = _modeling_classes()
    root = Path(transformers.__file__).parent / "models"
    entries: dict[str, CatalogEntry] = {}
    for model_type, class_name in CAUSAL.items():
        path = defined.get(class_name)
        if path not in moe_files:
            continue
        text = getattr(CONFIG_MAPPING[model_type], "sub_configs", {}).get("text_config")
        text_type = getattr(text, "model_type", None)
        if text_type and text_type != model_type and text_type in CAUSAL:
            continue  # a multimodal config: its text model type has its own entry
        entries[model_type] = CatalogEntry(model_type, class_name, str(path.relative_to(root)))
    listed = set(CAUSAL.values())
    for path in sorted(moe_files):
        for class_name in _CLASS.findall(path.read_text(encoding="utf-8")):
            if not class_name.endswith("ForCausalLM") or class_name in listed:
                continue
            cls = getattr(transformers, class_name, None)
            model_type = getattr(getattr(cls, "config_class", None), "model_type", None)
            if model_type and model_type not in entries:
                entries[model_type] = CatalogEntry(
                    model_type, class_name, str(path.relative_to(root)), in_auto_mapping=False
                )
    return tuple(entries[name] for name in sorted(entries))


def catalog_entry(model_type: str) -> CatalogEntry:
    """The :class:`CatalogEntry` of ``model_type`` (ValueError if it is not an MoE causal-LM family)."""
    for entry in moe_families():
        if entry.model_type == model_type:
            return entry
    known = ", ".join(e.model_type for e in moe_families())
    raise ValueError(
        f"{model_type!r} is not a Mixture-of-Experts causal-LM family of the installed transformers; known: {known}."
    )


def causal_lm_class(model_type: str) -> type:
    """The ``*ForCausalLM`` class of an MoE family (also those ``AutoModelForCausalLM`` does not map)."""
    import transformers

    return getattr(transformers, catalog_entry(model_type).causal_lm_class)
