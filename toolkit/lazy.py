"""Lazy re-exports for a package's __init__ (PEP 562).

Each package names its public API in one table,

    EXPORTS = {"sources": ("load_data",), "specs": ("DataOptions", "Split")}
    __all__, __getattr__, __dir__ = lazy_exports(__name__, EXPORTS)

so callers write `from toolkit.data import load_data`, but importing the package loads none
of its modules until a name is used. That keeps the command line quick to start and lets
`toolkit serve` run where torch is not installed at all (the demo install).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, table: dict[str, tuple[str, ...]]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """`__all__`, `__getattr__` and `__dir__` for `package`, whose modules export `table`."""
    where = {name: f"{package}.{module}" for module, names in table.items() for name in names}
    # Importing a submodule sets it as an attribute of the package, over an export's name.
    shadowed = sorted(set(where) & set(table))
    if shadowed:
        raise ImportError(f"{package}: exports named like its modules: {', '.join(shadowed)}")

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(sys.modules[package], name, value)  # the next lookup is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(where)

    return sorted(where), __getattr__, __dir__
