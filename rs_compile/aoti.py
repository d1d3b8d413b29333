"""``rs_compile.export``: a converted model as an AOTInductor package (``.pt2``).

torch.export traces the converted model to a graph holding the rs ops (``rs::linear``,
``rs::embedding``, ...); AOTInductor compiles it with rs_compile's lowerings, as ``torch.compile``
would, into a shared library packed with the codes. Its C++ wrapper cannot call Python, so the ops
it does not generate code for (``rs::cpu_linear``, the hand-written CPU kernel, and
``rs::embedding``) are called through the package's proxy executor, i.e. the dispatcher: a process
that loads the package must have registered them, with ``import rs_compile.ops`` (or
``import rs_compile``), before ``torch._inductor.aoti_load_package``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rs_compile.experts import CompressedExperts
from rs_compile.modules import CompressedEmbedding, CompressedLinear


def _compressed_layers(model: nn.Module) -> list[str]:
    kinds = (CompressedLinear, CompressedEmbedding, CompressedExperts)
    return [name for name, m in model.named_modules() if isinstance(m, kinds)]


def _check_model(model: nn.Module) -> None:
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError("rs_compile.export: got a torch.compile'd module; pass the module itself "
                        "(model._orig_mod): torch.export traces the Python module, not its "
                        "compiled graphs")
    if not isinstance(model, nn.Module):
        raise TypeError("rs_compile.export: model must be an nn.Module, got "
                        f"{type(model).__name__}")
    if not _compressed_layers(model):
        raise ValueError("rs_compile.export: the model has no compressed layers, so the package "
                         "would hold its dense weights; run rs_compile.convert(model) first (or, "
                         "for a dense package, torch.export + aoti_compile_and_package directly)")
    if model.training:
        raise ValueError("rs_compile.export: the model is in training mode, so dropout and other "
                         "training-only behaviour would be baked into the package; call "
                         "model.eval() first")
    others = {t.device.type for t in (*model.parameters(), *model.buffers())} - {"cpu"}
    if others:
        raise ValueError(f"rs_compile.export: the model has tensors on {sorted(others)}; "
                         "export packages CPU models only (rs_compile's fast kernels there): "
                         "model.to('cpu') first")


def _check_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"rs_compile.export: the package path must end in .pt2 (AOTInductor's "
                         f"format), got {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"rs_compile.export: {str(path)!r} is a directory; give a file path "
                         "ending in .pt2")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"rs_compile.export: the folder {str(parent)!r} of the package "
                                "does not exist; create it first")
    try:  # the real test (access() says yes to root on read-only places)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise PermissionError(f"rs_compile.export: cannot write into {str(parent)!r} "
                              f"({e.strerror}); choose a writable location for the package") from e
    return path


def export(model: nn.Module, example_inputs: tuple[Any, ...], path: str | os.PathLike,
           dynamic_shapes: Any = None) -> Path:
    """Export a converted model (``rs_compile.convert``) to an AOTInductor package at ``path``.

    ``example_inputs`` (positional arguments; a lone tensor is wrapped in a tuple) and
    ``dynamic_shapes`` are torch.export's, e.g. ``{"ids": {1: torch.export.Dim("seq", max=512)}}``
    for a dynamic sequence length.
    Checks run before anything is traced: ``model`` must hold compressed layers, be in eval
    mode and on CPU, and ``path`` must be a writable ``.pt2`` file path. The model is not
    modified. Returns ``path``.

    Run it elsewhere with::

        import torch, rs_compile.ops   # registers the rs ops the package calls
        runner = torch._inductor.aoti_load_package(path)
        out = runner(*example_inputs)
    """
    path = _check_path(path)
    _check_model(model)
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    from torch._inductor import aoti_compile_and_package

    from rs_compile.lowering import install_lowerings

    install_lowerings()
    with torch.no_grad():
        program = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)
        return Path(aoti_compile_and_package(program, package_path=str(path)))
