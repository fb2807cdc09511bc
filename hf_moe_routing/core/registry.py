"""A name -> class registry: the one way families and routing methods are found.

**Built-ins** are declared in one table, where the registry is created, as
``name -> "package.module:attribute"`` strings; a module is imported on first lookup, so that looking
a name up does not import every implementation (``hf-moe-routing --help`` stays fast)::

    ROUTING_METHODS = Registry("routing method", RoutingConfig, lazy={
        "bip": "hf_moe_routing.methods.bip.config:BIPConfig",   # the only line a built-in method adds
    })

Built-in modules do not register themselves: the table is the whole list. ``tests/test_structure.py``
checks that every family file in ``families/`` and every method folder in ``methods/`` is in it, so a
new one cannot be silently ignored. The two tables are ``FAMILIES`` (``families/__init__.py``) and
``ROUTING_METHODS`` (``methods/base.py``).

**Third-party** classes register in either of two ways:

* at run time, with ``register_family(cls)`` / ``register_routing(cls)`` (or ``registry.register``),
  in a module the user imports;
* without an import, through a package entry point in the group ``hf_moe_routing.families`` or
  ``hf_moe_routing.methods`` (name = model type / routing type, value = ``"module:Class"``), e.g. in
  ``pyproject.toml``::

      [project.entry-points."hf_moe_routing.methods"]
      my_routing = "my_package.routing:MyRoutingConfig"

  Entry points are read on the first lookup of an unknown name (or when the names are listed) and
  load like built-ins, on first use.

As in PEFT (``register_peft_method``) and lm-eval (``register_model``), a second object under a taken
name raises ValueError instead of silently replacing the first, and, as in lm-eval, a class that is
not a subclass of the registry's base class raises TypeError (at ``register``, or when a lazy entry
loads).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Maps names to registered classes (a read-only ``Mapping``; add entries with :meth:`register`).

    Args:
        kind: what the entries are, for error messages (e.g. ``"routing method"``).
        base: the class every entry must subclass (TypeError otherwise); None accepts any object.
        lazy: built-in entries as ``name -> "module:attribute"``, imported on first lookup.
        entry_point_group: the package entry-point group third parties register in (None: none).

    Raises:
        ValueError: on a duplicate name (:meth:`register`) or an unknown one (``registry[name]``),
            naming the known entries.
        TypeError: an entry is not a subclass of ``base``.
    """

    def __init__(
        self,
        kind: str,
        base: type | None = None,
        lazy: Mapping[str, str] | None = None,
        *,
        entry_point_group: str | None = None,
    ) -> None:
        self.kind = kind
        self.base = base
        self._entries: dict[str, T] = {}
        self._lazy: dict[str, str] = dict(lazy or {})
        self._builtin = frozenset(self._lazy)
        self._group = entry_point_group
        self._scanned = entry_point_group is None

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` as ``name``; without ``obj``, a decorator that does so.

        Raises:
            ValueError: ``name`` is empty, taken by another object, or reserved for a built-in.
            TypeError: ``obj`` is not a subclass of the registry's base class.
        """

        def add(item: T) -> T:
            if not isinstance(name, str) or not name:
                raise ValueError(f"A {self.kind} name must be a non-empty string, got {name!r}.")
            self._check_base(name, item)
            if name in self._entries and self._entries[name] is not item:
                raise ValueError(
                    f"A {self.kind} named {name!r} is already registered ({_describe(self._entries[name])}); "
                    f"choose another name for {_describe(item)}."
                )
            target = self._lazy.get(name)
            if target is not None and target != _path_of(item):
                raise ValueError(
                    f"The {self.kind} name {name!r} is reserved for {target}; "
                    f"choose another name for {_describe(item)}."
                )
            self._entries[name] = item
            return item

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove a registered (non built-in) entry; a no-op for unknown names."""
        if name in self._builtin:
            raise ValueError(f"The built-in {self.kind} {name!r} cannot be unregistered.")
        self._entries.pop(name, None)
        self._lazy.pop(name, None)

    def builtin(self) -> dict[str, str]:
        """The built-in table: ``name -> "module:attribute"``."""
        return {name: self._lazy[name] for name in sorted(self._builtin)}

    def _check_base(self, name: str, item: object) -> None:
        if self.base is not None and not (isinstance(item, type) and issubclass(item, self.base)):
            raise TypeError(
                f"The {self.kind} {name!r} must be a subclass of {self.base.__module__}.{self.base.__qualname__}, "
                f"got {_describe(item)} ({type(item).__name__})."
            )

    def _scan_entry_points(self) -> None:
        if self._scanned:
            return
        self._scanned = True
        for point in entry_points(group=self._group):
            if point.name not in self._entries and point.name not in self._lazy:
                self._lazy[point.name] = point.value

    def _load(self, name: str) -> None:
        module, _, attribute = self._lazy[name].partition(":")
        item = getattr(importlib.import_module(module), attribute)
        self._check_base(name, item)
        self._entries[name] = item

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            if name not in self._lazy:
                self._scan_entry_points()
            if name not in self._lazy:
                raise ValueError(f"Unknown {self.kind} {name!r}. Known: {', '.join(sorted(self))}.")
            self._load(name)
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        if name in self._entries or name in self._lazy:
            return True
        self._scan_entry_points()
        return name in self._lazy

    def __iter__(self) -> Iterator[str]:
        self._scan_entry_points()
        return iter(sorted({*self._entries, *self._lazy}))

    def __len__(self) -> int:
        self._scan_entry_points()
        return len({*self._entries, *self._lazy})

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self)})"


def _path_of(item: object) -> str:
    return f"{getattr(item, '__module__', '?')}:{getattr(item, '__qualname__', '?')}"


def _describe(item: object) -> str:
    return _path_of(item).replace(":", ".")
