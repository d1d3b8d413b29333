"""Inductor lowering of ``rs::linear`` on CPU: the hand-written kernel for decode rows, decode +
one BLAS GEMM for prefill.

* float32 CPU activations with the kernel available (rs_compile.lowering.cpu_kernel): the
  decomposition emits ``rs::cpu_linear``, which a lowering turns into a direct call from the
  compiled graph (``extern_kernels.rs_cpu_linear(..., out=buf)`` into a buffer Inductor
  allocates; no dispatcher, no custom-op wrapper). The call picks per call what
  ``rs::linear``'s eager CPU path picks: the fused GEMV for ``M <= GEMV_MAX_ROWS`` (decode steps),
  kernel-decoded tiles + BLAS for more (prefill), so the row count is not guarded and the dynamic
  prefill graph and the one-row decode graph each compile once. Under Inductor's C++ wrapper,
  which cannot call a Python function, the op is kept as a fallback call through the dispatcher.
* Otherwise (other dtypes, a failed kernel build) Inductor fuses the decomposition below (unpack the bit planes, look up the level
  table, times the group step and row scale) into one C++ loop writing a dense float buffer, which
  ``mm`` then multiplies; the decode costs one pass over the weight per call, amortised over the
  rows. ``act_bits=8`` rounds the activations first with the same expressions as the reference op.
"""

from __future__ import annotations

import torch

from rs_compile.codec.activations import quantize_activations
from rs_compile.codec.format import decode_weight
from rs_compile.lowering import cpu_kernel
from rs_compile.lowering.registry import register, register_extern_out
from rs_compile.ops.cpu_linear import cpu_linear  # noqa: F401  (defines torch.ops.rs.cpu_linear)
from rs_compile.ops.linear import linear  # noqa: F401  (defines torch.ops.rs.linear)


def cpu_linear_out(x, codes, groups, row_scale, bias, bits, group_size, in_features, act_bits, *,
                   out):
    """The compiled graph's call into ``out``: the kernel's GEMV for few rows, decoded tiles +
    BLAS for more (chosen per call, so the row count needs no guard). Inputs are contiguous, the
    bias (if any) float32, and the graph was built only where the kernel applies."""
    return cpu_kernel.linear_cpu(x, codes, groups, row_scale, bias, bits, group_size, in_features,
                                 act_bits, out=out)


def _kernel_applies(x, bits, group_size) -> bool:
    return (x.device.type == "cpu" and cpu_kernel.supports(x, bits, group_size)
            and cpu_kernel.kernel() is not None)


def linear_decomposition(x, codes, groups, row_scale, bias, bits, group_size, in_features, act_bits=0):
    n = codes.shape[0]
    x2 = x.reshape(-1, in_features)
    if _kernel_applies(x, bits, group_size):
        bias = None if bias is None else bias.to(torch.float32)  # what the kernel reads
        return torch.ops.rs.cpu_linear(x, codes, groups, row_scale, bias, bits, group_size,
                                        in_features, act_bits)
    if act_bits:
        x2 = quantize_activations(x2, group_size)
    w = decode_weight(codes, groups, row_scale, bits, group_size, in_features)
    out = torch.mm(x2, w.to(x.dtype).t())
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], n)


def _install_gemv_lowering() -> None:
    register_extern_out(torch.ops.rs.cpu_linear.default, "rs_cpu_linear", cpu_linear_out, 5,
                        lambda x, codes, *_: [*x.get_size()[:-1], codes.get_size()[0]])


def install() -> None:
    """Register the decomposition and the kernel call with Inductor (idempotent)."""
    register(torch.ops.rs.linear.default, linear_decomposition)
    _install_gemv_lowering()
