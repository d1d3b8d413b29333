"""Deployment through Hugging Face: ``RealityStoneConfig`` and its ``HfQuantizer``.

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=RealityStoneConfig(bits=4))
    model.save_pretrained(out)                      # model.safetensors + config.json
    AutoModelForCausalLM.from_pretrained(out)       # after ``import rs_compile``: the same codes

Compress while loading: transformers hands every checkpoint tensor to the quantizer one at a time
(sequentially, as it does for all on-the-fly quantizers); each Linear / Conv1D / Embedding weight
is converted as it arrives, by ``rs_compile.convert`` on that one layer and the layers tied to it
(GPT-2's ``lm_head`` then reads the embedding's codes), so that only one dense weight exists at a
time. ``convert`` on the whole model after loading picks up what is left (a layer whose bias
arrived after its weight, a tie the checkpoint stores the other way round).

Saving writes the tensor layout of ``rs_compile.save`` (rs_compile.serialization.pack: each tensor
once, module map, aliases, per-tensor sha256, format version) into ``model.safetensors``, the
metadata as the safetensors header entry ``"rs_compile"``; ``config.json`` gets the
``quantization_config``. Loading rebuilds the compressed modules on the meta device before
transformers fills their buffers, then checks every tensor against its recorded checksum.

A saved folder also holds one guard tensor named ``<first compressed layer>.weight`` whose shape
cannot match the dense layer: a transformers without rs_compile imported does not know
``quant_method="realitystone"``, would otherwise load random weights for every compressed layer
(with a warning only), and instead stops with a size-mismatch error.
"""

from __future__ import annotations

import ctypes
import json
import re
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

# transformers.modeling_utils is imported inside the functions that need it: this module is
# imported while transformers imports its quantizer registry, which modeling_utils itself imports
# half-way (rs_compile.hf_registration)

from rs_compile import serialization
from rs_compile.config import split_options
from rs_compile.convert import convert, linear_weight
from rs_compile.report import Report

if TYPE_CHECKING:
    from transformers import PreTrainedModel

QUANT_METHOD = "realitystone"
META_KEY = "rs_compile"  # safetensors header entry: serialization.pack's metadata, as JSON
GUARD_KEY = "rs_compile_guard"  # header entry: the name of the guard tensor
GUARD_MESSAGE = b"rs_compile: run `import rs_compile` before from_pretrained"
# RealityStoneConfig fields that are rs_compile.convert keyword arguments, passed through as is
CONVERT_OPTIONS = ("bits", "group_size", "curvatures", "embeddings", "embedding_bits",
                   "min_features", "compress_tied", "act_bits")


class RealityStoneConfig(QuantizationConfigMixin):
    """``quantization_config`` for transformers' ``from_pretrained``: compress while loading.

    Every field but ``format_version`` is the ``rs_compile.convert`` option of the same name (see
    ``EncodingConfig`` / ``CompileConfig`` for their meaning); calibration (GPTQ) needs sample
    inputs and is not available while loading: convert with ``calibration=`` and
    ``save_pretrained`` instead. ``format_version`` is the rs_compile file format (``rs_compile.serialization.VERSION``) the
    checkpoint was written in; another version is refused with the way to re-save.
    """

    def __init__(self, bits: int = 4, group_size: int = 32, curvatures: int = 4,
                 embeddings: bool = True, embedding_bits: int = 5, min_features: int = 16,
                 compress_tied: bool = False, act_bits: int = 0,
                 format_version: int = serialization.VERSION, **kwargs: Any):
        unknown = sorted(set(kwargs) - {"quant_method"})
        if unknown:
            raise ValueError(f"unknown RealityStoneConfig option(s) {unknown}; valid options are "
                             f"{[*CONVERT_OPTIONS, 'format_version']}")
        self.quant_method = QUANT_METHOD
        self.bits, self.group_size, self.curvatures = bits, group_size, curvatures
        self.embeddings, self.embedding_bits, self.min_features = embeddings, embedding_bits, min_features
        self.compress_tied, self.act_bits = compress_tied, act_bits
        self.format_version = format_version
        self.post_init()

    def post_init(self) -> None:
        """ValueError for an invalid option or a checkpoint of another format version."""
        if self.format_version != serialization.VERSION:
            raise ValueError(
                f"this checkpoint was written by rs_compile file format version {self.format_version!r}; "
                f"this rs_compile reads version {serialization.VERSION} only. Re-save it: load the "
                "original (uncompressed) model with from_pretrained(..., quantization_config="
                "RealityStoneConfig(...)) using this rs_compile and call save_pretrained")
        split_options(self.convert_options())  # the options' own checks

    def convert_options(self) -> dict[str, Any]:
        """The keyword arguments of ``rs_compile.convert`` this config stands for."""
        return {k: getattr(self, k) for k in CONVERT_OPTIONS}


class _CompressOnLoad(ConversionOps):
    """The op transformers runs on each checkpoint weight the quantizer claims: load it into its
    layer, then convert that layer (and the layers tied to it) at once."""

    def __init__(self, quantizer: RealityStoneHfQuantizer):
        self.quantizer = quantizer

    def convert(self, input_dict, source_patterns=None, target_patterns=None, *, model=None,
                full_layer_name=None, missing_keys=None, **kwargs) -> dict:
        from transformers.modeling_utils import _load_parameter_into_model  # not at the top: see the imports

        (value,) = next(iter(input_dict.values()))
        _load_parameter_into_model(model, full_layer_name, value)
        model.get_parameter(full_layer_name)._is_hf_initialized = True  # a skipped layer keeps it
        missing_keys = missing_keys if missing_keys is not None else set()
        missing_keys.discard(full_layer_name)
        self.quantizer.compress_layer(model, full_layer_name, missing_keys)
        return {}


class _Holder(nn.Module):
    """A layer and the layers tied to it, under their own names with dots as ``-``, for
    ``convert`` to replace (a tied output layer then reads its embedding's codes)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        for name in names:
            self.add_module(name.replace(".", "-"), model.get_submodule(name))

def _return_free_memory() -> None:
    """Give memory freed by the encoder back to the OS (glibc ``malloc_trim``). The encoder's
    worker threads allocate in their own malloc arenas, which keep freed blocks: on GPT-2 small
    the process held 514 MiB after loading a 68 MiB model, 143 MiB after one trim. Elsewhere a
    no-op."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


def _compressible(model: nn.Module, param_name: str) -> bool:
    """``param_name`` is the ``weight`` of a layer convert compresses (Linear, Conv1D, Embedding)."""
    module_name, _, leaf = param_name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    return leaf == "weight" and (linear_weight(module) is not None or isinstance(module, nn.Embedding))


class RealityStoneHfQuantizer(HfQuantizer):
    """Compresses Linear / Conv1D / Embedding layers as their weights load; loads
    and checks checkpoints written by ``save_pretrained`` of such a model."""

    requires_calibration = False
    quantization_config: RealityStoneConfig

    def __init__(self, quantization_config: RealityStoneConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.report = Report()
        self._saved: dict | None = None  # pre-quantized: the checkpoint's metadata
        self._file = ""

    def validate_environment(self, *args, device_map=None, **kwargs) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("rs_compile's compressed layers cannot be offloaded to disk; load without "
                             "a 'disk' entry in device_map (the compressed model is ~7x smaller)")

    # --- compress while loading -----------------------------------------------------------------
    def param_needs_quantization(self, model: "PreTrainedModel", param_name: str, **kwargs) -> bool:
        """The weight of a Linear / Conv1D / Embedding, when compressing; a weight tied to others
        only as the one the checkpoint holds (the tie's source) and only when each other is the
        ``weight`` of such a layer."""
        if self.pre_quantized:
            return False
        tied = model.all_tied_weights_keys
        if param_name in tied:
            return False
        return all(_compressible(model, name) for name in
                   (param_name, *(t for t, src in tied.items() if src == param_name)))

    def get_quantize_ops(self) -> ConversionOps:
        return _CompressOnLoad(self)

    def compress_layer(self, model: nn.Module, weight_name: str, missing_keys: set[str]) -> None:
        """Convert the layer of ``weight_name`` now that it is loaded, with the layers tied to it
        (tied here, and no longer by transformers, which would tie to a weight that is gone); a
        bias still on the meta device defers the layer to the pass after loading."""
        name = weight_name.rpartition(".")[0]
        bias = getattr(model.get_submodule(name), "bias", None)
        if isinstance(bias, torch.Tensor) and bias.device.type == "meta":
            return
        targets = [t for t, src in model.all_tied_weights_keys.items() if src == weight_name]
        weight = model.get_parameter(weight_name)
        for target in targets:
            setattr(model.get_submodule(target.rpartition(".")[0]), "weight", weight)
            del model.all_tied_weights_keys[target]
            missing_keys.discard(target)
        names = [name, *(t.rpartition(".")[0] for t in targets)]
        holder = convert(_Holder(model, names), **self.quantization_config.convert_options())
        for rewrite in holder.rs_report.linear_rewrites:
            rewrite.module, rewrite.pattern = rewrite.module.replace("-", "."), rewrite.pattern.replace("-", ".")
        for skip in holder.rs_report.skipped:
            skip.module = skip.module.replace("-", ".")
        self.report.linear_rewrites += holder.rs_report.linear_rewrites
        self.report.skipped += holder.rs_report.skipped
        for child, layer in holder.named_children():
            layer._is_hf_initialized = True
            model.set_submodule(child.replace("-", "."), layer)
        del holder, weight
        _return_free_memory()

    # --- load a compressed checkpoint -----------------------------------------------------------
    def _process_model_before_weight_loading(self, model: "PreTrainedModel", checkpoint_files=None,
                                             **kwargs) -> None:
        if not self.pre_quantized:
            return
        file = (checkpoint_files or [None])[0]
        header = {}
        if file is not None and str(file).endswith(".safetensors"):
            with safe_open(file, framework="pt") as f:
                header = f.metadata() or {}
        if META_KEY not in header:
            raise ValueError(
                f"{file}: config.json names quant_method={QUANT_METHOD!r} but the weights carry no "
                "rs_compile metadata: they were not written by save_pretrained of an rs_compile "
                "model. Save the compressed model again with save_pretrained")
        try:
            saved = json.loads(header[META_KEY])
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: the rs_compile metadata is not valid JSON ({err})") from None
        self._saved, self._file = serialization.check_meta(saved, file), str(file)
        experts = [n for n, m in saved["modules"].items() if isinstance(m, dict) and m.get("kind") == "experts"]
        if experts:
            raise ValueError(f"{file}: compressed MoE experts {experts[:4]} do not load through "
                             "from_pretrained yet; use rs_compile.hub.save_model / load_model")
        placeholders = {n: torch.empty(r["shape"], dtype=getattr(torch, r["dtype"]), device="meta")
                        for n, r in saved["tensors"].items()}
        placeholders.update({a: placeholders[t] for a, t in saved["aliases"].items() if t in placeholders})
        modules = dict(model.named_modules())
        new = {n: serialization._compressed_module(file, n, modules.get(n), m, placeholders)
               for n, m in saved["modules"].items()}
        for name, layer in new.items():
            model.set_submodule(name, layer)
        # transformers would tie (and mark) the dense weights these modules replaced
        owners = tuple(f"{n}." for n in new)
        for target, source in list(model.all_tied_weights_keys.items()):
            if target.startswith(owners) or source.startswith(owners):
                del model.all_tied_weights_keys[target]
        # aliases are assigned after loading; the guard is no tensor of the model
        missing = set(model._keys_to_ignore_on_load_missing or ())
        model._keys_to_ignore_on_load_missing = missing | {rf"^{re.escape(a)}$" for a in saved["aliases"]}
        unexpected = set(model._keys_to_ignore_on_load_unexpected or ())
        if header.get(GUARD_KEY):
            unexpected.add(rf"^{re.escape(header[GUARD_KEY])}$")
        model._keys_to_ignore_on_load_unexpected = unexpected

    def _process_model_after_weight_loading(self, model: "PreTrainedModel", **kwargs) -> "PreTrainedModel":
        if not self.pre_quantized:
            model = convert(model, **self.quantization_config.convert_options())
            done = {r.module for r in self.report.linear_rewrites}
            final = model.rs_report
            final.linear_rewrites = self.report.linear_rewrites + final.linear_rewrites
            seen = {s.module for s in final.skipped}
            final.skipped += [s for s in self.report.skipped if s.module not in seen | done]
            return model
        saved = self._saved
        for alias, target in saved["aliases"].items():
            owner, _, leaf = target.rpartition(".")
            serialization._assign(model, alias, getattr(model.get_submodule(owner), leaf))
        named = dict(serialization._named_tensors(model))
        absent = sorted(set(saved["tensors"]) - set(named))
        if absent:
            raise ValueError(f"{self._file}: the model has no tensors {absent[:8]}; load it into the "
                             "architecture it was saved from")
        # a dense tensor cast by from_pretrained(dtype=...) is checked by shape only
        loaded = {n: named[n] for n in saved["tensors"]}
        recorded = {n: (r if serialization._dtype_name(loaded[n].dtype) == r["dtype"] else
                        {**r, "dtype": serialization._dtype_name(loaded[n].dtype),
                         "sha256": serialization._sha256(loaded[n])})
                    for n, r in saved["tensors"].items()}
        serialization.check_tensors(loaded, {**saved, "tensors": recorded}, self._file)
        for name, m in saved["modules"].items():
            serialization._check_layer(self._file, name, m, named)
        model.rs_report = Report()
        return model

    # --- save -----------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model: "PreTrainedModel") -> tuple[dict, dict]:
        tensors, meta = serialization.pack(model, "save_pretrained", names=set(model.state_dict()))
        header = {META_KEY: json.dumps(meta)}
        if meta["modules"]:
            guard = f"{min(meta['modules'])}.weight"
            tensors[guard] = torch.frombuffer(bytearray(GUARD_MESSAGE), dtype=torch.uint8)
            header[GUARD_KEY] = guard
        return tensors, header

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters train on the frozen codes (rs_compile.lora)."""
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def enable_save_pretrained(model: nn.Module, options: dict[str, Any]) -> None:
    """Let ``save_pretrained`` of a transformers ``model`` converted by ``rs_compile.convert`` /
    loaded by ``rs_compile.load`` write a checkpoint ``from_pretrained`` restores: give it the
    quantizer and ``quantization_config`` (``options``: the convert options it was converted with).
    A model that already has a quantizer keeps it."""
    from transformers.modeling_utils import PreTrainedModel  # see the note on the imports above

    if not isinstance(model, PreTrainedModel) or getattr(model, "hf_quantizer", None) is not None:
        return
    config = RealityStoneConfig(**{k: v for k, v in options.items() if k in CONVERT_OPTIONS})
    model.hf_quantizer = RealityStoneHfQuantizer(config, pre_quantized=False)
    model.config.quantization_config = config


if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:  # a reload of this module registers nothing twice
    register_quantization_config(QUANT_METHOD)(RealityStoneConfig)
    register_quantizer(QUANT_METHOD)(RealityStoneHfQuantizer)
