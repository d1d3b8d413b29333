"""Submodules a package imports on first attribute access (PEP 562), so that importing the
package stays cheap and ``package.submodule`` still works after a plain ``import package``."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_submodules(package: str, names: tuple[str, ...],
                    namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` (whose globals are ``namespace``)."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*namespace, *names})

    return __getattr__, __dir__
