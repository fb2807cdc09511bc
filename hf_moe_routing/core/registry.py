"""A name -> object registry that refuses duplicate names and can load entries lazily.

As in PEFT (``register_peft_method``) and lm-eval (``register_model``), registering a second object
under a taken name raises instead of silently replacing the first. Built-in entries can be declared
as ``"package.module:attribute"`` strings, imported on first use, so that looking a name up does not
import every implementation (``hf-moe-routing --help`` stays fast)::

    METHODS = Registry("routing method", lazy={"bip": "hf_moe_routing.methods.bip.config:BIPConfig"})

    @METHODS.register("bip")          # in methods/bip/config.py: fulfils the lazy entry
    class BIPConfig(RoutingConfig): ...
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Maps names to registered objects (a read-only ``Mapping``; add entries with :meth:`register`).

    Args:
        kind: what the entries are, for error messages (e.g. ``"routing method"``).
        lazy: built-in entries as ``name -> "module:attribute"``, imported on first lookup.

    Raises:
        ValueError: on a duplicate name (:meth:`register`) or an unknown one (``registry[name]``),
            naming the known entries.
    """

    def __init__(self, kind: str, lazy: Mapping[str, str] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._lazy: dict[str, str] = dict(lazy or {})

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` as ``name``; without ``obj``, a decorator that does so.

        A lazy entry of the same name is fulfilled when ``obj`` is the object it points to
        (same module and qualified name); any other duplicate raises ``ValueError``.
        """

        def add(item: T) -> T:
            if not isinstance(name, str) or not name:
                raise ValueError(f"A {self.kind} name must be a non-empty string, got {name!r}.")
            if name in self._entries and self._entries[name] is not item:
                raise ValueError(
                    f"A {self.kind} named {name!r} is already registered ({_describe(self._entries[name])}); "
                    f"choose another name for {_describe(item)}."
                )
            target = self._lazy.get(name)
            if target is not None and target != _path_of(item):
                raise ValueError(
                    f"The {self.kind} name {name!r} is reserved for the built-in {target}; "
                    f"choose another name for {_describe(item)}."
                )
            self._entries[name] = item
            return item

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove a registered (non built-in) entry; a no-op for unknown names."""
        if name in self._lazy:
            raise ValueError(f"The built-in {self.kind} {name!r} cannot be unregistered.")
        self._entries.pop(name, None)

    def _load(self, name: str) -> None:
        module, _, attribute = self._lazy[name].partition(":")
        item = getattr(importlib.import_module(module), attribute)
        if self._entries.get(name) is not item:  # the module did not register itself
            self._entries[name] = item

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            if name not in self._lazy:
                raise ValueError(f"Unknown {self.kind} {name!r}. Known: {', '.join(sorted(self))}.")
            self._load(name)
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(sorted({*self._entries, *self._lazy}))

    def __len__(self) -> int:
        return len({*self._entries, *self._lazy})

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self)})"


def _path_of(item: object) -> str:
    return f"{getattr(item, '__module__', '?')}:{getattr(item, '__qualname__', '?')}"


def _describe(item: object) -> str:
    return _path_of(item).replace(":", ".")
