"""Inductor decomposition of ``rs::poincare_linear`` into fusable tensor arithmetic.

Inductor inlines the unpack + closed-form decode into whatever consumes the weight:

* few rows (decoding, M <= ``gemv_max_rows``): a broadcast multiply + sum over (groups, group)
  becomes one C++ reduction loop that reads each code byte once and never stores a dense weight;
* many rows (prefill): decode once into a dense buffer, then a BLAS/mkldnn GEMM, whose cost is
  dominated by the GEMM and amortises the decode over M rows.

The threshold is a guard on the symbolic row count, so one dynamic graph serves both regimes
after at most one recompile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._inductor.decomposition import register_decomposition

from rs_compile.codec.format import decode_groups
from rs_compile.ops.linear import poincare_linear  # noqa: F401  (defines torch.ops.rs.poincare_linear)

GEMV_MAX_ROWS = 8


def poincare_linear_decomposition(
    x, codes, scales, curv, bias, bits, group_size, in_features, curv_step
):
    n, ng = scales.shape
    kp = ng * group_size
    w = decode_groups(codes, scales, curv, bits, group_size, curv_step)  # [n, ng, G] fp32
    x2 = x.reshape(-1, in_features)
    if kp != in_features:
        x2 = F.pad(x2, (0, kp - in_features))
    m = x2.shape[0]
    if m <= GEMV_MAX_ROWS:
        xs = x2.to(torch.float32).view(m, 1, ng, group_size)
        out = (xs * w.unsqueeze(0)).sum((-1, -2)).to(x.dtype)
    else:
        out = torch.mm(x2, w.reshape(n, kp).t().to(x.dtype))
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], n)


_installed = False


def install() -> None:
    """Register the decomposition in Inductor's table (idempotent)."""
    global _installed
    if not _installed:
        register_decomposition(torch.ops.rs.poincare_linear.default)(
            poincare_linear_decomposition
        )
        _installed = True
