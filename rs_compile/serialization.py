"""Save a converted model; load it into a freshly built (even meta-device) uncompressed model.

A folder holds two files:

* ``rs_compile.safetensors``: every tensor of the model, once: the packed buffers of each
  CompressedLinear and CompressedEmbedding (``<module>.<name>`` for each name of
  ``Format.packed_specs``, and ``<module>.bias``), of each CompressedExperts (``<module>.
  gate_up_proj_codes`` etc., stacked per expert: rs_compile.experts.experts_specs) and every
  remaining parameter and buffer
  (non-persistent buffers too, so a meta-device model comes back complete); a tied output layer's
  buffers are aliases of its embedding's;
* ``rs_compile.json``: ``{"format", "version", "modules": {name: module.meta()},
  "aliases": {name: name it shares its tensor with}, "tensors": {name: {"dtype", "shape",
  "sha256"}}, "sha256"}``; the last is the sha256 of the rest of the JSON.

The codes cannot be rebuilt from the safetensors alone (bits, group size and the other module
attributes are not tensors), which is why the module map exists. The checksums exist because
neither file can tell on its own that it was damaged: a flipped payload byte loads as NaN weights,
an edited module field as a layer computing something else. :func:`load` checks every recorded
tensor, the metadata and the model before it changes the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rs_compile.codec.encode import EncodedWeight
from rs_compile.codec.format import Format
from rs_compile.config import CompileConfig, EncodingConfig, split_options
from rs_compile.convert import linear_weight
from rs_compile.modules import PACKED, CompressedEmbedding, CompressedLinear, compress_embedding

COMPRESSED = (CompressedLinear, CompressedEmbedding)

FORMAT = "rs_compile"
VERSION = 3  # 2: per-tensor and metadata checksums; 3: codec format v2, embeddings
TENSORS_FILE = "rs_compile.safetensors"
META_FILE = "rs_compile.json"
RESAVE = ("convert the original model with this rs_compile and save it again (rs_compile.save, "
          "rs_compile.hub.save_model or `rs-compile convert`)")


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer under every name it is reachable by (tied ones repeat)."""
    return [*model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False)]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sha256(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy()).hexdigest()


def _record(t: torch.Tensor) -> dict:
    return {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "sha256": _sha256(t)}


def _meta_sha256(meta: Mapping) -> str:
    body = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _check_layer(where: str, name: str, m: Mapping, tensors: Mapping[str, torch.Tensor]) -> None:
    """ValueError unless layer ``name``'s metadata ``m`` is valid and its tensors are exactly the
    ones the format stores for it: the checks the op would otherwise make at the first forward."""
    if not isinstance(m, Mapping):
        raise ValueError(f"{where}: the entry of compressed layer {name!r} is not an object")
    sizes = {k: m.get(k) for k in ("out_features", "in_features")}
    if not all(type(v) is int and v > 0 for v in sizes.values()) or type(m.get("bias")) is not bool:
        raise ValueError(f"{where}: compressed layer {name!r} has invalid {sizes} or "
                         f"bias={m.get('bias')!r} (positive ints and a bool expected)")
    options = {*EncodingConfig.option_names(), *CompileConfig.option_names()}
    try:  # bits, group_size, act_bits, ...: the one validation every option goes through
        split_options({k: v for k, v in m.items() if k in options})
    except ValueError as err:
        raise ValueError(f"{where}: compressed layer {name!r}: {err}") from None
    fmt = (f"{m['bits']}-bit codes in groups of {m['group_size']}, [out, in] = "
           f"[{m['out_features']}, {m['in_features']}]")
    specs = Format(m["bits"], m["group_size"]).packed_specs(m["out_features"], m["in_features"])
    if m["bias"]:
        specs["bias"] = ((m["out_features"],), None)
    for key, (shape, dtype) in specs.items():
        t = tensors.get(f"{name}.{key}")
        if t is None:
            raise ValueError(f"{where}: tensor {name}.{key} of compressed layer {name!r} is missing")
        if tuple(t.shape) != shape or (t.dtype != dtype if dtype else not t.is_floating_point()):
            raise ValueError(
                f"{where}: tensor {name}.{key} is {_dtype_name(t.dtype)} {list(t.shape)}, but layer "
                f"{name!r} ({fmt}) stores {_dtype_name(dtype) if dtype else 'floating point'} "
                f"{list(shape)}"
            )


def pack(model: nn.Module, where: str,
         names: set[str] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)``: each tensor of ``model`` once (a second name of the same tensor becomes
    an alias) and the checksummed metadata describing them, as :func:`save` writes them and
    transformers' ``save_pretrained`` does through rs_compile.hf_quantizer. ``names`` keeps only
    those names (a state dict's: no non-persistent buffers). ValueError (prefixed by ``where``)
    for a model whose compressed layers no longer hold what the format stores."""
    named = {n: t for n, t in _named_tensors(model) if names is None or n in names}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, t in named.items():
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device; load real weights before saving")
        if id(t) in first_name:
            aliases[name] = first_name[id(t)]
        else:
            first_name[id(t)] = name
            tensors[name] = t.detach().contiguous()
    from rs_compile.experts import CompressedExperts, check_experts

    modules = {n: m.meta() for n, m in model.named_modules()
               if isinstance(m, (*COMPRESSED, CompressedExperts))}
    for name, m in modules.items():
        if m.get("kind") == "experts":
            check_experts(where, name, m, named)
        else:
            _check_layer(where, name, m, named)
    meta = {"format": FORMAT, "version": VERSION, "modules": modules, "aliases": aliases,
            "tensors": {n: _record(t) for n, t in tensors.items()}}
    meta["sha256"] = _meta_sha256(meta)
    return tensors, meta


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (converted or not) to the folder ``path``; returns the folder.

    Refuses a model whose compressed layers no longer hold what the format stores (e.g. scales
    cast by ``model.to(dtype)``), so that a file that saves also loads.
    """
    path = Path(path)
    tensors, meta = pack(model, f"cannot save to {path}")
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / TENSORS_FILE, metadata={"format": "pt"})
    (path / META_FILE).write_text(json.dumps(meta, indent=1))
    return path


def read_meta(path: str | os.PathLike) -> dict:
    """The checked contents of ``path/rs_compile.json``: format, version and checksum verified."""
    path = Path(path)
    files = [path / META_FILE, path / TENSORS_FILE]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not an rs_compile folder: {missing} missing; write one with rs_compile.save"
        )
    file = files[0]
    try:
        meta = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}): the file is damaged; {RESAVE}") from None
    return check_meta(meta, file)


def check_meta(meta: object, file: str | os.PathLike) -> dict:
    """``meta`` (what :func:`pack` wrote, read back from ``file``) once its format, version, maps
    and checksum are verified; ValueError naming ``file`` otherwise."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{file} is not rs_compile metadata (no \"format\": {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise ValueError(
            f"{file} has format version {meta.get('version')!r}; this rs_compile reads version "
            f"{VERSION} only (version 3: the codec's format v2 and compressed embeddings). To "
            f"re-save: {RESAVE}"
        )
    if not all(isinstance(meta.get(k), dict) for k in ("modules", "aliases", "tensors")):
        raise ValueError(f"{file} lacks its \"modules\", \"aliases\" or \"tensors\" map; {RESAVE}")
    if meta.get("sha256") != _meta_sha256(meta):
        raise ValueError(
            f"{file}: the metadata does not match the checksum recorded when it was saved (edited or "
            f"damaged after saving); restore the original file, or {RESAVE}"
        )
    return meta


def _read_tensors(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    """The file's tensors, each checked against the dtype, shape and sha256 the metadata records."""
    file = path / TENSORS_FILE
    try:
        tensors = load_file(file)
    except SafetensorError as err:
        raise ValueError(f"{file} is not a readable safetensors file ({err}): it is damaged; "
                         f"restore it, or {RESAVE}") from None
    check_tensors(tensors, meta, file)
    return tensors


def check_tensors(tensors: Mapping[str, torch.Tensor], meta: dict, file: str | os.PathLike) -> None:
    """ValueError naming ``file`` unless ``tensors`` are exactly the ones ``meta`` records, each
    with the recorded dtype, shape and sha256."""
    records: dict[str, dict] = meta["tensors"]
    if tensors.keys() != records.keys():
        extra, absent = sorted(tensors.keys() - records.keys()), sorted(records.keys() - tensors.keys())
        raise ValueError(f"{file} does not hold the tensors its metadata lists: tensors not listed "
                         f"{extra[:8]}, listed but absent {absent[:8]}; they come from "
                         f"different saves")
    for name, t in tensors.items():
        rec = records[name] if isinstance(records[name], dict) else {}
        if [_dtype_name(t.dtype), list(t.shape)] != [rec.get("dtype"), rec.get("shape")]:
            raise ValueError(f"{file}: tensor {name!r} is {_dtype_name(t.dtype)} {list(t.shape)} but "
                             f"was saved as {rec.get('dtype')} {rec.get('shape')}; the file is damaged")
        if _sha256(t) != rec.get("sha256"):
            raise ValueError(f"{file}: tensor {name!r} does not match the checksum recorded when it was "
                             f"saved (damaged or modified after saving); restore it, or {RESAVE}")


def _compressed_module(file: Path, name: str, module: nn.Module | None, m: dict,
                       tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """The CompressedLinear, CompressedEmbedding or CompressedExperts for ``name``, after checking
    the file's layer and the model's."""
    if isinstance(m, Mapping) and m.get("kind") == "experts":
        from rs_compile.experts import load_experts

        return load_experts(str(file), name, module, dict(m), tensors)
    _check_layer(str(file), name, m, tensors)
    embedding = m.get("kind") == "embedding"
    shape = (m["out_features"], m["in_features"])
    if embedding:
        fits = isinstance(module, nn.Embedding) and not isinstance(module, CompressedEmbedding)
        weight = module.weight if fits else None
        expected = "nn.Embedding"
    else:
        lw = None if module is None else linear_weight(module)
        weight = None if lw is None else lw[0]
        expected = "nn.Linear or Conv1D"
    if weight is None:
        found = "no such module" if module is None else f"a {type(module).__name__}"
        raise ValueError(
            f"{file} compresses layer {name!r} but the model has {found} there (expected "
            f"{expected}): load into a freshly built, unconverted model of the same architecture"
        )
    if tuple(weight.shape) != shape:
        raise ValueError(
            f"{file}: layer {name!r}: the model's weight is {list(weight.shape)} but the file "
            f"holds {list(shape)}: the model config differs from the one saved"
        )
    packed = {k: tensors[f"{name}.{k}"] for k in PACKED}
    try:
        if embedding:
            enc = EncodedWeight(*packed.values(), Format(m["bits"], m["group_size"]), m["in_features"])
            layer = compress_embedding(module, enc)
        else:
            layer = CompressedLinear.from_meta(m, packed, tensors[f"{name}.bias"] if m["bias"] else None)
            layer.weight_dtype = weight.dtype  # what ``layer.weight`` reads back as
    except (KeyError, TypeError) as err:
        raise ValueError(f"{file}: compressed layer {name!r} has incomplete metadata ({err!r})") from None
    if layer.meta() != m:
        raise ValueError(f"{file}: compressed layer {name!r} has metadata {m}, which this rs_compile "
                         f"does not write (it writes {layer.meta()})")
    return layer


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    old = module._parameters.get(leaf)
    if old is not None and not isinstance(value, nn.Parameter):
        value = nn.Parameter(value, requires_grad=old.requires_grad)
    setattr(module, leaf, value)


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a folder written by :func:`save` into ``model`` in place and return it in eval mode.

    ``model`` is a freshly built uncompressed instance of the saved architecture, possibly built
    under ``torch.device("meta")``: the listed layers become CompressedLinear and every other
    tensor is replaced by the file's (assigned, not copied, so no fp32 copy of a compressed
    weight ever exists). The model is put in eval mode, as ``from_pretrained`` does, so outputs
    match the saved model's at once (a fresh model is in training mode: dropout on).

    Every check runs before the model is touched: a damaged file (checksums of every tensor and of
    the metadata), invalid metadata or a mismatched model raises ValueError naming the file and
    the tensor or layer, and the model stays as it was.
    """
    path = Path(path)
    meta = read_meta(path)
    tensors = _read_tensors(path, meta)
    file = path / META_FILE
    aliases: dict[str, str] = dict(meta["aliases"])
    resolved = {**tensors, **{a: tensors[t] for a, t in aliases.items() if t in tensors}}
    modules = dict(model.named_modules())
    new = {n: _compressed_module(file, n, modules.get(n), m, resolved)
           for n, m in meta["modules"].items()}
    # the packed buffers (and bias) the new modules hold; a tied head's are aliases
    held = {f"{n}.{key}" for n, layer in new.items()
            for key in (layer.packed_specs() if hasattr(layer, "packed_specs") else
                        (*PACKED, *(("bias",) if getattr(layer, "bias", None) is not None else ())))}
    for name in held:
        tensors.pop(name, None)
        aliases.pop(name, None)
    replaced = {f"{c}.{leaf}" for c in new
                for leaf in ("weight", "bias", "gate_up_proj", "down_proj")}  # the last: experts
    expected = {n: t for n, t in _named_tensors(model) if n not in replaced}
    missing = sorted(set(expected) - set(tensors) - set(aliases))
    unexpected = sorted((set(tensors) | set(aliases)) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"model and {path} disagree: tensors missing from the file {missing[:8]}, tensors "
            f"the model lacks {unexpected[:8]}: build the model from the config it was saved with"
        )
    dangling = sorted(n for n, target in aliases.items() if target not in tensors.keys() | held)
    if dangling:
        raise ValueError(f"{file}: tied tensors {dangling[:8]} name tensors the file does not hold")
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
    if callable(getattr(type(model), "save_pretrained", None)) and new:
        from rs_compile.hf_quantizer import enable_save_pretrained

        layers = [m for m in meta["modules"].values() if "kind" not in m]  # linears: bits, act_bits
        enable_save_pretrained(model, layers[0] if layers else {})
    return model.eval()

