"""Triton kernel for ``rs::linear``: unpack + decode fused into the matmul.

Each program owns a ``[BLOCK_M, BLOCK_N]`` output tile and walks K in ``BLOCK_K`` steps. Every
step decodes its ``[BLOCK_N, BLOCK_K]`` weight tile in registers straight from the code bytes
(no dense weight ever reaches memory) and multiplies it with the x tile, accumulating in fp32.

Unpacking addresses each weight by its own (group, position) pair, so BLOCK_K need not align with
``group_size`` (any multiple of 8 the format allows, not only powers of two), and columns past
``in_features`` are masked before any load: the zero padding of the last group is never read.
In the planar layout of ``rs_compile.codec.format``, code ``j`` of a plane of width ``w`` sits in
byte ``j % B`` of that plane at bit ``(j // B) * w`` (``B = group_size * w // 8``): one shift and
one mask per plane.
The decode reads the format's level tables (``Format.levels()``, passed as a tensor) and its group
bytes; every decoded weight is exact in fp32 (rs_compile.codec.format), so it equals
``format.decode_groups`` bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rs_compile.codec.activations import quantize_activations
from rs_compile.codec.format import PLANES, Format
from rs_compile.ops.linear import check_inputs

DOT_MIN_ROWS = 16  # tl.dot needs M >= 16; fewer rows use a broadcast multiply + sum instead


@triton.jit
def _plane(row_ptrs, j, mask, START: tl.constexpr, W: tl.constexpr, G: tl.constexpr):
    """The bits held by the width-W plane (at byte START of each group) of codes j."""
    nbytes: tl.constexpr = G * W // 8
    byte = tl.load(row_ptrs + START + j % nbytes, mask=mask, other=0).to(tl.int32)
    return (byte >> ((j // nbytes) * W)) & ((1 << W) - 1)


@triton.jit
def _linear_kernel(
    x_ptr, codes_ptr, groups_ptr, row_scale_ptr, levels_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_xk, stride_cn, stride_gn, stride_ym,
    BITS: tl.constexpr, CURV_BITS: tl.constexpr,
    G: tl.constexpr, GROUP_BYTES: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    row_scale = tl.load(row_scale_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = n_ok[:, None] & k_ok[None, :]
        g = (k // G)[None, :]
        j = (k % G)[None, :]
        group_ptrs = codes_ptr + rn[:, None] * stride_cn + g * GROUP_BYTES
        q = _plane(group_ptrs, j, w_ok, 0, W0, G)
        if W1 > 0:
            q |= _plane(group_ptrs, j, w_ok, G * W0 // 8, W1, G) << W0
        byte = tl.load(groups_ptr + rn[:, None] * stride_gn + g, mask=w_ok, other=0)
        byte = byte.to(tl.int8, bitcast=True).to(tl.int32)
        step = byte >> CURV_BITS
        table = byte & ((1 << CURV_BITS) - 1)
        level = tl.load(levels_ptr + (table << BITS) + q, mask=w_ok, other=0).to(tl.float32)
        w = row_scale[:, None] * step.to(tl.float32) * level
        w = w.to(x.dtype)  # the reference rounds the decoded weight to x's dtype too
        if USE_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")  # as torch: no TF32
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _blocks(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): one row tile for decode-style GEMV, 16..64-row tiles for GEMM."""
    if m < DOT_MIN_ROWS:
        return triton.next_power_of_2(m), 32, 32
    return min(64, triton.next_power_of_2(m)), 64, 32


def triton_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    groups: torch.Tensor,
    row_scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    act_bits: int = 0,
) -> torch.Tensor:
    """Same contract as ``torch.ops.rs.linear``; leading dims of x are flattened."""
    check_inputs(x, codes, groups, row_scale, bias, bits, group_size, in_features, act_bits)
    if act_bits:
        x = quantize_activations(x, group_size)
    planes = PLANES[bits]
    if len(planes) > 2:
        raise NotImplementedError(f"the Triton kernel unpacks at most 2 bit planes, bits={bits}")
    x2 = x.reshape(-1, in_features)
    codes, groups = codes.contiguous(), groups.contiguous()  # unit columns
    m, n = x2.shape[0], codes.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*x.shape[:-1], n)
    fmt = Format(bits, group_size)
    levels = fmt.levels().to(x.device)
    bias = None if bias is None else bias.to(x.dtype)  # the reference adds bias in x's dtype
    block_m, block_n, block_k = _blocks(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _linear_kernel[grid](
        x2, codes, groups, row_scale, levels, bias, y,
        m, n, in_features, x2.stride(0), x2.stride(1), codes.stride(0), groups.stride(0),
        y.stride(0),
        BITS=bits, CURV_BITS=fmt.curvature_bits,
        G=group_size, GROUP_BYTES=fmt.group_bytes,
        W0=planes[0], W1=planes[1] if len(planes) > 1 else 0,
        HAS_BIAS=bias is not None, USE_DOT=m >= DOT_MIN_ROWS,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y.view(*x.shape[:-1], n)
