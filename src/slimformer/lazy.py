"""Lazy public names of a package: imported from their module on first access."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_getattr(package: str, table: dict[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``package``.

    Args:
        package: The package's ``__name__`` (for the error message).
        table: Public name -> ``module`` or ``module:attribute`` (when the name differs).
    """

    def __getattr__(name: str) -> object:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attr = table[name].partition(":")
        return getattr(importlib.import_module(module), attr or name)

    return __getattr__
