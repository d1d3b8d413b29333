"""Triton flash-attention forward for ``rs::attention`` on GPUs.

One program computes ``BLOCK_M`` query rows of one (batch, head) with an online softmax over
``BLOCK_N``-key blocks, so no ``[T, S]`` score matrix exists. It restates the op's contract
(``rs_compile.ops.attention``): kv head ``h // (H // Hkv)``, bottom-right causal rule
``j <= i + (S - T)``, bool (True = attend) or additive mask read through broadcast (stride-0)
strides, zeros for fully masked rows, float32 accumulation.

It becomes the op's CUDA kernel through ``rs_compile.kernels.register_triton_kernels`` only when a
Triton GPU driver is active. Without a GPU it runs only under ``TRITON_INTERPRET=1`` (set before
triton is imported), which the tests use to compare it with float64 SDPA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from rs_compile.ops.attention import check_inputs, reference

BLOCK_M = 32
BLOCK_N = 32


@triton.jit
def _attention_fwd(
    Q, K, V, M, O,
    sqb, sqh, sqt, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    smb, smh, smt, sms,
    H, T, S, D, group, causal_offset, scale,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    dim_ok = dims < D
    q = tl.load(
        Q + b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :] * sqd,
        mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = S
    if CAUSAL:  # the block's last row sees keys up to its index + causal_offset
        end = tl.minimum(S, (pid_m + 1) * BLOCK_M + causal_offset)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < S
        kt = tl.load(
            K + b * skb + hk * skh + cols[None, :] * sks + dims[:, None] * skd,
            mask=dim_ok[:, None] & col_ok[None, :], other=0.0,
        )
        v = tl.load(
            V + b * svb + hk * svh + cols[:, None] * svs + dims[None, :] * svd,
            mask=col_ok[:, None] & dim_ok[None, :], other=0.0,
        )
        s = tl.dot(q, kt, input_precision=PRECISION) * scale
        keep = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + causal_offset)
        if HAS_MASK:
            mv = tl.load(
                M + b * smb + h * smh + rows[:, None] * smt + cols[None, :] * sms,
                mask=row_ok[:, None] & col_ok[None, :], other=0,
            )
            if MASK_BOOL:
                keep = keep & (mv != 0)
            else:
                s = s + mv.to(tl.float32)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep exp() finite
        p = tl.exp(s - m_ref[:, None])
        alpha = tl.exp(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # fully masked rows: 0, not NaN
    offs_o = ((b * H + h) * T + rows[:, None]) * D + dims[None, :]
    tl.store(O + offs_o, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def triton_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float
) -> Tensor:
    """Launch the kernel; float64 (no fast tensor-core dot) runs the reference instead."""
    check_inputs(q, k, v, mask)
    if q.dtype == torch.float64:
        return reference(q, k, v, mask, causal, scale)
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    out = torch.empty((b, h, t, d), dtype=q.dtype, device=q.device)
    if mask is None:
        m, m_strides = q, (0, 0, 0, 0)  # never read: HAS_MASK is False
    else:
        m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        m = m.expand(b, h, t, s)  # a view: broadcast dims get stride 0
        m_strides = m.stride()
    grid = (triton.cdiv(t, BLOCK_M), b * h)
    _attention_fwd[grid](
        q, k, v, m, out,
        *q.stride(), *k.stride(), *v.stride(), *m_strides,
        h, t, s, d, h // hkv, s - t, scale,
        HAS_MASK=mask is not None,
        MASK_BOOL=mask is not None and mask.dtype == torch.bool,
        CAUSAL=causal,
        # float32 products in full precision, not TF32 (the setting is moot for 16-bit operands)
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )
    return out
