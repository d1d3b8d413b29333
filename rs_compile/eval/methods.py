"""Compression methods as the harness compares them: each turns the original model into a dense
*student* (a model computing with exactly what the method's stored form decodes to) and states
what it stores, counted the same way for every method.

* :func:`ours`: ``rs_compile.convert`` (any options, with or without calibration), decoded back;
* :func:`fake_quantized`: a harness fake-quantizer (NF4, RTN, HQQ, ...) on the linears, with the
  storage its format needs per weight matrix;
* :func:`gguf`: a GGUF file (e.g. llama.cpp's Q4_0 / IQ4_XS / Q8_0) read back dequantized by
  transformers' GGUF loader, sizes read from the file's tensor table.

Parts: *linears* are the weights the harness quantizes (every Linear / Conv1D not tied to an
embedding); *embedding* is the embedding tables (a tied lm_head reads the same table and adds no
bytes). Bits per weight of a part = 8 x (bytes of codes + scales + any per-group or per-row
metadata) / parameters of that part; a dense float32 part is 32. ``nbytes`` is every byte the
model holds: both parts plus the dense rest (norms, buffers) at their stored size.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from rs_compile.eval.harness import Quantizer, _oriented, _quantizable, quantize_model_weights


class Student(NamedTuple):
    model: nn.Module  # dense: computes with what the stored form decodes to
    linear_bits: float  # all-in bits / weight over the linears
    embedding_bits: float  # all-in bits / weight over the embedding table(s) (tied head included)
    nbytes: int  # every byte the compressed model holds


Method = Callable[[nn.Module], Student]
StorageBits = Callable[[int, int], int]  # bits to store one [out, in] weight


def _tensor_bytes(tensors: list[torch.Tensor]) -> int:
    seen = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _embeddings(model: nn.Module) -> dict[str, nn.Embedding]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Embedding)}


def part_parameters(model: nn.Module) -> tuple[int, int]:
    """(weights of the linears, weights of the embedding tables) of an uncompressed model."""
    linears = sum(_oriented(m).numel() for m in _quantizable(model).values())
    tables = sum(m.weight.numel() for m in _embeddings(model).values())
    return linears, tables


def _rest_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer outside the linears' and embeddings' weights."""
    parts = {id(m.weight) for m in [*_quantizable(model).values(), *_embeddings(model).values()]}
    return _tensor_bytes([t for t in [*model.parameters(), *model.buffers()] if id(t) not in parts])


def fake_quantized(quantize: Quantizer, storage_bits: StorageBits) -> Method:
    """A fake-quantizer on the linears (embeddings stay float32) storing ``storage_bits(out, in)``
    bits per weight matrix."""
    def build(model: nn.Module) -> Student:
        linears = [_oriented(m).shape for m in _quantizable(model).values()]
        n_linear, n_table = part_parameters(model)
        linear_bytes = sum(storage_bits(out, k) for out, k in linears) / 8
        table_bytes = 4 * n_table
        nbytes = math.ceil(linear_bytes) + table_bytes + _rest_bytes(model)
        return Student(quantize_model_weights(model, quantize), 8 * linear_bytes / n_linear,
                       32.0 if n_table else math.nan, nbytes)

    return build


def group_storage(bits: int, group_size: int, group_bits: int, row_bits: int = 0) -> StorageBits:
    """Codes padded to whole groups, ``group_bits`` per group (scale, zero point, table index)
    and ``row_bits`` per output row."""
    def storage(out: int, k: int) -> int:
        groups = -(-k // group_size)
        return out * (groups * (group_size * bits + group_bits) + row_bits)

    return storage


def ours(options: Mapping[str, Any] | None = None, calibration: list | None = None) -> Method:
    """``rs_compile.convert(copy, calibration=..., **options)``; sizes are the packed tensors it
    holds."""
    def build(model: nn.Module) -> Student:
        import rs_compile
        from rs_compile.demo import model_bytes
        from rs_compile.modules import CompressedEmbedding, CompressedLinear

        n_linear, n_table = part_parameters(model)
        converted = rs_compile.convert(copy.deepcopy(model), calibration=calibration,
                                       **(options or {}))
        student = copy.deepcopy(model)
        compressed = dict(converted.named_modules())
        tables = {n: m for n, m in compressed.items() if isinstance(m, CompressedEmbedding)}
        table_tensors = [t for m in tables.values() for t in (m.codes, m.groups, m.row_scale)]
        table_ids = {id(t) for t in table_tensors}
        linears = {n: m for n, m in compressed.items()  # tied heads read a table's codes: skipped
                   if isinstance(m, CompressedLinear) and id(m.codes) not in table_ids}
        linear_tensors = [t for m in linears.values() for t in (m.codes, m.groups, m.row_scale)]
        dense_tables = [m.weight for m in _embeddings(converted).values()
                        if not isinstance(m, CompressedEmbedding)]
        with torch.no_grad():
            for name, module in tables.items():
                student.get_submodule(name).weight.copy_(module.dequantize())
            for name, module in linears.items():
                _oriented(student.get_submodule(name)).copy_(module.dequantize())
        decoded = {*tables, *linears}
        del converted
        table_bytes = _tensor_bytes(table_tensors) + _tensor_bytes(dense_tables)
        linear_bytes = _tensor_bytes(linear_tensors)
        uncompressed = [m.weight for n, m in _quantizable(model).items() if n not in decoded]
        linear_bytes += _tensor_bytes(uncompressed)  # linears convert skipped stay dense
        nbytes = linear_bytes + table_bytes + _rest_bytes(model)
        return Student(student, 8 * linear_bytes / n_linear,
                       8 * table_bytes / n_table if n_table else math.nan, nbytes)

    return build


LINEAR_TENSOR = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")
TABLE_TENSORS = ("token_embd.weight", "output.weight")


def gguf_sizes(path: str | Path) -> tuple[float, float, int]:
    """(bits / weight of the linears, of the embedding + output tables, bytes of every tensor)
    from a GGUF file's tensor table (llama.cpp's names)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    parts = {"linear": [0, 0], "table": [0, 0]}
    total = 0
    for t in reader.tensors:
        total += int(t.n_bytes)
        part = ("linear" if LINEAR_TENSOR.fullmatch(t.name) else
                "table" if t.name in TABLE_TENSORS else None)
        if part:
            parts[part][0] += int(t.n_bytes)
            parts[part][1] += int(t.n_elements)
    if not parts["linear"][1]:
        raise ValueError(f"{path}: no llama.cpp linear tensors (blk.N.attn_q.weight, ...) found")
    bits = {p: 8 * b / n if n else math.nan for p, (b, n) in parts.items()}
    return bits["linear"], bits["table"], total


def gguf(path: str | Path) -> Method:
    """A GGUF file of the same architecture, read back dequantized (float32) by transformers."""
    def build(model: nn.Module) -> Student:
        from transformers import AutoModelForCausalLM

        file = Path(path).expanduser().resolve()
        if not file.is_file():
            raise FileNotFoundError(f"--gguf {path}: no such file")
        student = AutoModelForCausalLM.from_pretrained(
            str(file.parent), gguf_file=file.name, dtype=torch.float32,
            attn_implementation=getattr(model.config, "_attn_implementation", None) or "sdpa")
        if student.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"{file} has a {student.config.vocab_size}-token vocabulary, the model "
                             f"{model.config.vocab_size}: not the same model")
        linear_bits, table_bits, nbytes = gguf_sizes(file)
        return Student(student.eval(), linear_bits, table_bits, nbytes)

    return build
