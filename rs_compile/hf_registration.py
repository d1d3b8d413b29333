"""Register ``quant_method="realitystone"`` with transformers without importing it.

``import rs_compile`` must stay cheap and leave transformers unimported (transformers' quantizer
registry alone costs seconds), yet ``from_pretrained`` of a saved rs_compile checkpoint must find
the quantizer in a fresh process after ``import rs_compile``. So: if transformers' registry is
already imported, register now; otherwise register the moment it is imported (every
``from_pretrained`` imports it first), through a one-shot import hook.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

REGISTRY = "transformers.quantizers.auto"


def _register() -> None:
    importlib.import_module("rs_compile.hf_quantizer")  # registers on import


class _Loader(importlib.abc.Loader):
    """transformers' own loader for the registry, then the registration."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Register now if transformers' registry is loaded, else when it loads (once)."""
    if REGISTRY in sys.modules:
        _register()
    elif importlib.util.find_spec("transformers") is not None and not any(
            isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
