"""``convert``: swap a model's Linear / Conv1D layers for CompressedLinear and its embeddings for
CompressedEmbedding (a tied output layer reading the embedding's codes), all or nothing."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from rs_compile.calibration import Layer, calibrated_encodings, check_items
from rs_compile.codec.encode import EncodedWeight, encode
from rs_compile.codec.format import Format
from rs_compile.config import CompileConfig, EncodingConfig, split_options
from rs_compile.modules import CompressedEmbedding, CompressedLinear, compress_embedding
from rs_compile.report import LinearRewrite, Report


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain PyTorch models
        return None
    return Conv1D


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight in [out, in] layout, bias) of a layer convert understands, else None: nn.Linear
    and its subclasses (convert checks that a subclass's forward is still x @ W.T + b, see
    :func:`_subclass_mismatch_linear`), transformers' Conv1D."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    conv1d = _conv1d_type()
    if conv1d is not None and type(module) is conv1d:
        return module.weight.t(), module.bias  # Conv1D stores [in, out]
    return None


def _tied_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def convert(
    model: nn.Module,
    encoding: EncodingConfig | None = None,
    compile_config: CompileConfig | None = None,
    *,
    calibration: Iterable[tuple | Mapping[str, Any]] | None = None,
    progress: bool = False,
    **options: Any,
) -> nn.Module:
    """Compress every eligible Linear / Conv1D and (``embeddings=True``, the default) embedding of
    ``model`` in place and return it. An output layer tied to a compressed embedding reads the
    embedding's codes: one copy, no dense table left. Converted weights and biases become frozen
    buffers whatever their ``requires_grad`` (outside ``model.parameters()``; gradients still reach
    the inputs); the backend instead keeps trainable weights dense unless ``frozen_weights=True``.

    ``options``: fields of :class:`~rs_compile.EncodingConfig` (what is stored: ``bits``,
    ``group_size``, ``embeddings``, ...) and of :class:`~rs_compile.CompileConfig` (``act_bits``
    is the one the converted layers use) as keywords, applied over ``encoding`` and
    ``compile_config``; an unknown one is a ValueError listing both sets.

    ``calibration``: optional sample inputs, each a tuple of positional arguments or a dict of
    keyword arguments for ``model(...)``. With them every layer is encoded to minimise its output
    error on its own inputs (see rs_compile.calibration); without them, calibration-free.

    Every new module is built before any is swapped in, so an error part-way (a NaN weight,
    a bad option) leaves the model exactly as it was. The report of what was converted and
    what was skipped (with reasons) is attached as ``model.rs_report``. A converted transformers
    model gets rs_compile's quantizer: its ``save_pretrained`` writes a checkpoint that
    ``from_pretrained`` restores (rs_compile.hf_quantizer).
    """
    encoding, compile_config = split_options(options, encoding, compile_config)
    if isinstance(model, CompressedLinear):
        raise ValueError("convert expects a model containing layers, got a single CompressedLinear")
    items = None if calibration is None else check_items(calibration)
    if items is None and encoding.bit_budget is not None:
        raise ValueError(f"bit_budget={encoding.bit_budget} needs calibration data to measure how much "
                         "each layer matters: pass calibration=[...] or drop bit_budget")
    tied = _tied_names(model)
    report = Report()
    tables = _embedding_tables(model, encoding, report, tied) if encoding.embeddings else {}
    table_of = {id(m.weight): n for n, m in tables.items()}
    heads: dict[str, tuple[nn.Module, str]] = {}
    layers: dict[str, Layer] = {}
    for name, module in model.named_modules():
        lw = linear_weight(module)
        if lw is not None and id(module.weight) in table_of:
            heads[name] = (module, table_of[id(module.weight)])
            continue
        if lw is None:
            if (reason := _quantized_reason(module)) is not None:
                report.skip(name, reason)
            continue
        weight, bias = lw
        reason = _skip_reason(name, module, weight, encoding, tied)
        if reason:
            report.skip(name, reason)
            continue
        if not _finite(module.weight):
            raise ValueError(
                f"layer {name!r} has NaN/Inf weights; rs_compile cannot encode them. Fix the "
                "checkpoint, or exclude the layer by converting a sub-module instead. "
                "The model was left unchanged."
            )
        if (reason := _subclass_mismatch_linear(module)) is not None:
            report.skip(name, reason)
            continue
        layers[name] = Layer(module, weight, bias)
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for leaf in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(module, leaf, None) is not None:
                    report.skip(f"{name}.{leaf}".lstrip("."), IN_PROJ_REASON.format(leaf))

    if items is None:
        encoded = {
            name: encode(weight.detach(), encoding.format, curvatures=encoding.curvatures)
            for name, (_, weight, _) in tqdm(layers.items(), desc="rs_compile convert",
                                             disable=not progress)
        }
    else:
        encoded = calibrated_encodings(model, layers, items, encoding, progress)
    new: dict[str, nn.Module] = _compressed_tables(tables, encoding, report, progress)
    for name, (module, table) in heads.items():
        if table in new:  # an embedding that failed its check keeps its head dense too
            new[name] = _tied_head(module, new[table], compile_config, report, name, table)
    for name, (module, weight, bias) in layers.items():
        enc = encoded[name]
        new[name] = CompressedLinear(enc, bias, compile_config.act_bits,
                                     weight.dtype).to(weight.device)
        report.linear_rewrites.append(LinearRewrite(
            module=name, pattern=type(module).__name__, out_features=enc.out_features,
            in_features=enc.in_features, bits=enc.bits,
            dense_bytes=weight.numel() * weight.element_size(), compressed_bytes=enc.nbytes()))
    from rs_compile.experts import find_experts  # MoE experts: 3-D parameters, not nn.Linear

    new.update(find_experts(model, encoding, compile_config, report, progress))
    for name, module in new.items():
        model.set_submodule(name, module)
    if new and callable(getattr(type(model), "save_pretrained", None)):
        from rs_compile.hf_quantizer import enable_save_pretrained  # transformers is loaded already

        options = {**dataclasses.asdict(encoding), **dataclasses.asdict(compile_config)}
        enable_save_pretrained(model, options)
    model.rs_report = report
    return model


def _embedding_tables(model: nn.Module, encoding: EncodingConfig, report: Report,
                      tied: dict[int, list[str]]) -> dict[str, nn.Embedding]:
    """The embeddings to compress; the others are reported with the reason."""
    tables = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Embedding) or isinstance(module, CompressedEmbedding):
            continue
        weight = module.weight
        if weight.device.type == "meta":
            reason = "weight is on the meta device (load real weights first, or use rs_compile.load)"
        elif not weight.is_floating_point():
            reason = f"weight dtype {weight.dtype} is not floating point"
        elif min(weight.shape) < encoding.min_features:
            reason = f"table {tuple(weight.shape)} smaller than min_features={encoding.min_features}"
        elif module.max_norm is not None:
            reason = "max_norm renormalises the table in place at every lookup; a fixed code cannot"
        else:
            if not _finite(weight):
                raise ValueError(f"embedding {name!r} has NaN/Inf weights; rs_compile cannot encode "
                                 "them. Fix the checkpoint or pass embeddings=False. The model was "
                                 "left unchanged.")
            tables[name] = module
            continue
        report.skip(name, reason)
    return tables


PROBE_IDS = 8  # rows a subclass's forward is checked on


def _compressed_tables(tables: dict[str, nn.Embedding], encoding: EncodingConfig, report: Report,
                       progress: bool) -> dict[str, nn.Module]:
    """CompressedEmbedding per table; a subclass whose forward does not give the original's
    output on the decoded table (it computes with ``weight`` itself) is skipped with the reason."""
    fmt = encoding.embedding_format
    new: dict[str, nn.Module] = {}
    for name, module in tqdm(tables.items(), desc="rs_compile embeddings", disable=not progress):
        enc = encode(module.weight.detach(), fmt, curvatures=encoding.curvatures)
        compressed = compress_embedding(module, enc).to(module.weight.device)
        if type(module) is not nn.Embedding and (reason := _subclass_mismatch(module, compressed, enc)):
            report.skip(name, reason)
            continue
        new[name] = compressed
        report.linear_rewrites.append(LinearRewrite(
            module=name, pattern="embedding", out_features=enc.out_features,
            in_features=enc.in_features, bits=enc.bits,
            dense_bytes=module.weight.numel() * module.weight.element_size(),
            compressed_bytes=enc.nbytes()))
    return new


def _subclass_mismatch(module: nn.Embedding, compressed: nn.Module, enc: EncodedWeight) -> str | None:
    """Why ``compressed`` cannot stand in for the subclass ``module``, or None: on a few ids it must
    match the original forward run on the decoded table."""
    ids = torch.arange(min(PROBE_IDS, module.num_embeddings), device=module.weight.device)
    reference = type(module).__new__(type(module))
    reference.__dict__.update(module.__dict__)
    reference._parameters = {**module._parameters,
                             "weight": nn.Parameter(enc.dequantize().to(module.weight), requires_grad=False)}
    try:
        with torch.no_grad():
            got, expected = compressed(ids), reference(ids)
    except Exception as err:  # noqa: BLE001  (any failure means the subclass needs its dense weight)
        return (f"{type(module).__qualname__}.forward fails on the compressed table "
                f"({type(err).__name__}: {str(err).splitlines()[0][:120]}); it reads the weight itself")
    if got.shape != expected.shape or not torch.allclose(got.float(), expected.float(), rtol=1e-5, atol=1e-6):
        return (f"{type(module).__qualname__}.forward gives other values on the compressed table "
                "than on the same table decoded; it reads the weight itself")
    return None


def _tied_head(module: nn.Module, table: nn.Module, compile_config: CompileConfig, report: Report,
               name: str, table_name: str) -> CompressedLinear:
    """The output layer ``module`` tied to ``table``, reading the same code tensors."""
    enc = EncodedWeight(table.codes, table.groups, table.row_scale,
                        Format(table.bits, table.group_size), table.embedding_dim)
    report.linear_rewrites.append(LinearRewrite(
        module=name, pattern=f"tied:{table_name}", out_features=enc.out_features,
        in_features=enc.in_features, bits=enc.bits, dense_bytes=0, compressed_bytes=0))
    return CompressedLinear(enc, linear_weight(module)[1], compile_config.act_bits, module.weight.dtype)


IN_PROJ_REASON = ("nn.MultiheadAttention.{} is a bare Parameter (no Linear module) "
                  "that the attention passes whole to its fused kernel; only Linear layers are "
                  "compressed (its out_proj is)")

PROBE_ROWS = 4  # inputs a Linear subclass's overridden forward is checked on


def _subclass_mismatch_linear(module: nn.Module) -> str | None:
    """Why a Linear subclass that overrides ``forward`` cannot become a CompressedLinear, or None.

    A subclass that keeps nn.Linear's forward (MultiheadAttention's NonDynamicallyQuantizableLinear)
    is converted as is. One that overrides it (Falcon's ``FalconLinear``: ``x @ W.T + b``) is
    converted when, on a seeded random input, its output matches ``F.linear`` with its own weight
    and bias, as torch.compile's linear pattern matching would rewrite it; otherwise (it scales,
    adds an adapter, fake-quantizes...) it is skipped with the reason.
    """
    if not isinstance(module, nn.Linear) or type(module).forward is nn.Linear.forward:
        return None
    w, b = module.weight, module.bias
    qualname = type(module).__qualname__
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_ROWS, module.in_features, generator=gen).to(w.device, w.dtype)
    try:
        with torch.no_grad():
            got, expected = module(x), torch.nn.functional.linear(x, w, b)
    except Exception as err:  # noqa: BLE001  (any failure: the forward is not a plain linear)
        return (f"{qualname} subclasses nn.Linear and its forward fails on a probe input "
                f"({type(err).__name__}: {str(err).splitlines()[0][:120]}); only nn.Linear-"
                "equivalent layers are converted")
    tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 2e-2
    if (not isinstance(got, torch.Tensor) or got.shape != expected.shape
            or not torch.allclose(got.float(), expected.float(), rtol=tol,
                                  atol=tol * float(expected.abs().max()))):
        return (f"{qualname} subclasses nn.Linear and its forward gives other values than "
                "x @ W.T + b on a probe input; only nn.Linear-equivalent layers are converted "
                "(torch.compile rewrites only the plain linear calls it traces inside it)")
    return None


def _quantized_reason(module: nn.Module) -> str | None:
    """The skip reason of a torch.ao quantized layer (quantize_dynamic's int8 Linear), else None."""
    cls = type(module)
    if not cls.__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized",
                                      "torch.ao.nn.intrinsic.quantized")):
        return None
    if cls.__name__.endswith("PackedParams") or not hasattr(module, "_packed_params"):
        return None
    return (f"{cls.__module__}.{cls.__qualname__} is already quantized by torch.ao.quantization "
            "(int8 weights packed for its own kernels); rs_compile compresses floating-point "
            "weights only: convert the float model instead")


def _finite(param: torch.Tensor) -> bool:
    """No NaN / Inf: one ``aminmax`` over the parameter as stored (contiguous; NaN propagates), about
    40x cheaper on this CPU than ``isfinite().all()`` of a transposed Conv1D view."""
    lo, hi = param.detach().aminmax()
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _skip_reason(name, module, weight, encoding: EncodingConfig, tied) -> str | None:
    if weight.device.type == "meta":
        return "weight is on the meta device (load real weights first, or use rs_compile.load)"
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not floating point"
    if min(weight.shape) < encoding.min_features:
        return f"weight {tuple(weight.shape)} smaller than min_features={encoding.min_features}"
    p = module.weight
    others = [n for n in tied.get(id(p), []) if not n.startswith(f"{name}.")]
    if others and not encoding.compress_tied:
        return (f"weight is tied with {others}; compressing would keep a dense copy beside the "
                "codes - pass compress_tied=True to compress it anyway")
    return None
