"""Save a converted model; load it into a freshly built (even meta-device) uncompressed model.

A folder holds two files:

* ``rs_compile.safetensors``: every tensor of the model, once: the packed buffers of each
  CompressedLinear (``<module>.codes/.scales/.curv/.bias``) and every remaining parameter and
  buffer (non-persistent buffers too, so a meta-device model comes back complete);
* ``rs_compile.json``: ``{"format", "version", "modules": {name: CompressedLinear.meta()},
  "aliases": {name: name it shares its tensor with}}``.

The codes cannot be rebuilt from the safetensors alone (bits, group size and curvature step are
module attributes, not tensors), which is why the module map exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rs_compile.codec.encode import EncodedWeight
from rs_compile.convert import linear_weight
from rs_compile.modules import CompressedLinear

FORMAT = "rs_compile"
VERSION = 1
TENSORS_FILE = "rs_compile.safetensors"
META_FILE = "rs_compile.json"
PACKED = ("codes", "scales", "curv")


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer under every name it is reachable by (tied ones repeat)."""
    return [*model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False)]


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (converted or not) to the folder ``path``; returns the folder."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, t in _named_tensors(model):
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device; load real weights before saving")
        if id(t) in first_name:
            aliases[name] = first_name[id(t)]
        else:
            first_name[id(t)] = name
            tensors[name] = t.detach().contiguous()
    modules = {n: m.meta() for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / TENSORS_FILE, metadata={"format": "pt"})
    meta = {"format": FORMAT, "version": VERSION, "modules": modules, "aliases": aliases}
    (path / META_FILE).write_text(json.dumps(meta, indent=1))
    return path


def _read_meta(path: Path) -> dict:
    files = [path / META_FILE, path / TENSORS_FILE]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not an rs_compile folder: {missing} missing; write one with rs_compile.save"
        )
    meta = json.loads(files[0].read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{files[0]} has format={meta.get('format')!r} version={meta.get('version')!r}; this "
            f"rs_compile reads format={FORMAT!r} version={VERSION}: re-save with this version"
        )
    return meta


def _compressed_module(name: str, module: nn.Module | None, m: dict, tensors: dict) -> CompressedLinear:
    """Build the CompressedLinear for ``name`` after checking the model's layer matches the file."""
    lw = None if module is None else linear_weight(module)
    if lw is None:
        found = "no such module" if module is None else f"a {type(module).__name__}"
        raise ValueError(
            f"the file compresses layer {name!r} but the model has {found} there (expected "
            "nn.Linear or Conv1D): load into a freshly built, unconverted model of the same architecture"
        )
    shape = (m["out_features"], m["in_features"])
    if tuple(lw[0].shape) != shape:
        raise ValueError(
            f"layer {name!r}: the model's weight is [out, in] = {list(lw[0].shape)} but the file "
            f"holds {list(shape)}: the model config differs from the one saved"
        )
    keys = [f"{name}.{k}" for k in PACKED] + ([f"{name}.bias"] if m["bias"] else [])
    absent = [k for k in keys if k not in tensors]
    if absent:
        raise ValueError(f"the file lacks {absent} for compressed layer {name!r}; it is truncated")
    codes, scales, curv = (tensors.pop(k) for k in keys[:3])
    enc = EncodedWeight(codes, scales, curv, m["bits"], m["group_size"], m["in_features"],
                        m["curv_step"])
    return CompressedLinear(enc, tensors.pop(keys[3]) if m["bias"] else None, m.get("act_bits", 0))


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    old = module._parameters.get(leaf)
    if old is not None and not isinstance(value, nn.Parameter):
        value = nn.Parameter(value, requires_grad=old.requires_grad)
    setattr(module, leaf, value)


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a folder written by :func:`save` into ``model`` in place and return it.

    ``model`` is a freshly built uncompressed instance of the saved architecture, possibly built
    under ``torch.device("meta")``: the listed layers become CompressedLinear and every other
    tensor is replaced by the file's (assigned, not copied, so no fp32 copy of a compressed
    weight ever exists). Every check runs before the model is touched, so a mismatched model
    raises ValueError and stays as it was.
    """
    path = Path(path)
    meta = _read_meta(path)
    tensors = load_file(path / TENSORS_FILE)
    modules = dict(model.named_modules())
    new = {n: _compressed_module(n, modules.get(n), m, tensors) for n, m in meta["modules"].items()}
    aliases: dict[str, str] = meta["aliases"]

    expected = {n: t for n, t in _named_tensors(model)
                if not any(n.startswith(f"{c}.") for c in new)}
    missing = sorted(set(expected) - set(tensors) - set(aliases))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"model and {path} disagree: tensors missing from the file {missing[:8]}, tensors "
            f"the model lacks {unexpected[:8]}: build the model from the config it was saved with"
        )
    wrong = [f"{n}: model {list(expected[n].shape)} vs file {list(t.shape)}"
             for n, t in tensors.items() if expected[n].shape != t.shape]
    if wrong:
        raise ValueError(f"shape mismatch between the model and {path}: {wrong[:8]}")

    for name, module in new.items():
        model.set_submodule(name, module)
    for name, t in tensors.items():
        _assign(model, name, t)
    for name, target in aliases.items():
        owner, _, leaf = target.rpartition(".")
        _assign(model, name, getattr(model.get_submodule(owner), leaf))
    return model
