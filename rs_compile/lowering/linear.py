"""Inductor lowering of ``rs::linear`` on CPU: decode the weight once, then one BLAS GEMM.

Inductor fuses the decomposition below (unpack the bit planes, look up the level table, times
the group step and row scale) into one C++ loop writing a dense float buffer, which ``mm`` then
multiplies; the decode costs one pass over the weight per call, amortised over the rows.
``act_bits=8`` rounds the activations first with the same expressions as the reference op.
"""

from __future__ import annotations

import torch

from rs_compile.codec.activations import quantize_activations
from rs_compile.codec.format import decode_weight
from rs_compile.lowering.registry import register
from rs_compile.ops.linear import linear  # noqa: F401  (defines torch.ops.rs.linear)


def linear_decomposition(x, codes, groups, row_scale, bias, bits, group_size, in_features, act_bits=0):
    n = codes.shape[0]
    x2 = x.reshape(-1, in_features)
    if act_bits:
        x2 = quantize_activations(x2, group_size)
    w = decode_weight(codes, groups, row_scale, bits, group_size, in_features)
    out = torch.mm(x2, w.to(x.dtype).t())
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], n)


def install() -> None:
    """Register the decomposition with Inductor (idempotent)."""
    register(torch.ops.rs.linear.default, linear_decomposition)
