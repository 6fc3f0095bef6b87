"""Module-level `__getattr__` / `__dir__` for packages whose public names are imported on first use (PEP 562)."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(
    package: str, exports: dict[str, list[str]], namespace: dict, subpackages: tuple[str, ...] = ()
) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """Returns `(__getattr__, __dir__, __all__)` for the package `package` (its `__name__`) whose `namespace` (its
    `globals()`) exports the names `exports` maps each submodule to; `subpackages` are reachable as attributes."""
    name_to_module = {name: module for module, names in exports.items() for name in names}
    public = sorted(name_to_module)

    def __getattr__(name: str):
        if name in subpackages:
            return importlib.import_module(f".{name}", package)
        if name not in name_to_module:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{name_to_module[name]}", package), name)
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(public))

    return __getattr__, __dir__, public
