"""Triton forward kernels of the hot ops: one program per block of rows, features in one tile.

They restate ``reference.py`` with only ``exp``/``log``/``sqrt`` (libdevice ``tanh``/``atanh``
do not run under ``TRITON_INTERPRET=1``); ``expm1``/``log1p`` use Kahan's and Goldberg's compensated
forms, so tanh and artanh keep full relative accuracy near 0 (short vectors) without series.
``c`` and the artanh clamp travel in a small tensor of the input dtype: a Python float argument
would become an fp32 scalar and round ``1 - 1e-15`` to 1 in float64 kernels.
Backward passes use the device-generic formulas in ``grads.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .numerics import MIN_NORM, TANH_MAX, artanh_max

_TILE = 4096  # elements per program: BLOCK_M * BLOCK_D


@triton.jit
def _expm1(x):
    u = tl.exp(x)
    exact = u == 1.0
    return tl.where(exact, x, (u - 1.0) * x / tl.where(exact, 1.0, tl.log(u)))


@triton.jit
def _log1p(z):
    u = 1.0 + z
    exact = u == 1.0
    return tl.where(exact, z, tl.log(u) * z / tl.where(exact, 1.0, u - 1.0))


@triton.jit
def _tanh_pos(x):
    """tanh for x >= 0."""
    e = _expm1(-2.0 * x)
    return -e / (2.0 + e)


@triton.jit
def _artanh_pos(a):
    """artanh for 0 <= a < 1."""
    return 0.5 * _log1p(2.0 * a / (1.0 - a))


@triton.jit
def _tile(rows, cols, M, D):
    """Offsets and mask of a [BLOCK_M, BLOCK_D] tile of a contiguous [M, D] matrix."""
    return rows[:, None] * D + cols[None, :], (rows[:, None] < M) & (cols[None, :] < D)


@triton.jit
def _load_pair(x_ptr, y_ptr, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows, offsets, mask and the x, y tiles of this program's block of rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs, mask = _tile(rows, tl.arange(0, BLOCK_D), M, D)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    return rows, offs, mask, x, y


@triton.jit
def _mobius_add_kernel(
    x_ptr,
    y_ptr,
    out_ptr,
    p_ptr,
    M,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MIN_N: tl.constexpr,
):
    _, offs, mask, x, y = _load_pair(x_ptr, y_ptr, M, D, BLOCK_M, BLOCK_D)
    c = tl.load(p_ptr)
    xy = tl.sum(x * y, axis=1)[:, None]
    x2 = tl.sum(x * x, axis=1)[:, None]
    y2 = tl.sum(y * y, axis=1)[:, None]
    num = (1.0 + 2.0 * c * xy + c * y2) * x + (1.0 - c * x2) * y
    den = tl.maximum(1.0 + 2.0 * c * xy + c * c * x2 * y2, MIN_N)
    tl.store(out_ptr + offs, num / den, mask=mask)


@triton.jit
def _dist_kernel(
    x_ptr,
    y_ptr,
    out_ptr,
    p_ptr,
    M,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MIN_N: tl.constexpr,
):
    rows, _, _, x, y = _load_pair(x_ptr, y_ptr, M, D, BLOCK_M, BLOCK_D)
    c = tl.load(p_ptr)
    amax = tl.load(p_ptr + 1)
    s = tl.sqrt(c)
    diff = x - y
    m = tl.maximum(tl.sqrt(tl.sum(diff * diff, axis=1)), MIN_N)
    q2 = (
        1.0
        - 2.0 * c * tl.sum(x * y, axis=1)
        + c * c * tl.sum(x * x, axis=1) * tl.sum(y * y, axis=1)
    )
    u = tl.minimum(s * m / tl.sqrt(tl.maximum(q2, MIN_N)), amax)
    tl.store(out_ptr + rows, 2.0 / s * _artanh_pos(u), mask=rows < M)


@triton.jit
def _radial_kernel(
    v_ptr,
    out_ptr,
    p_ptr,
    M,
    D,
    LOG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MIN_N: tl.constexpr,
    TMAX: tl.constexpr,
):
    """out = h(s|v|) v / (s|v|): h = artanh (logmap0) if LOG else tanh (expmap0)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs, mask = _tile(rows, tl.arange(0, BLOCK_D), M, D)
    c = tl.load(p_ptr)
    amax = tl.load(p_ptr + 1)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    sn = tl.sqrt(c) * tl.maximum(tl.sqrt(tl.sum(v * v, axis=1)), MIN_N)[:, None]
    if LOG:
        h = _artanh_pos(tl.minimum(sn, amax))
    else:
        h = _tanh_pos(tl.minimum(sn, TMAX))
    tl.store(out_ptr + offs, h / sn * v, mask=mask)


@triton.jit
def _poincare_linear_kernel(
    x_ptr,
    z_ptr,
    b_ptr,
    out_ptr,
    p_ptr,
    M,
    K,
    N,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_N: tl.constexpr,
    TMAX: tl.constexpr,
):
    """Epilogue of z = x W^T: Mobius matvec scaling of z, then Mobius addition of the bias."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    x_offs, x_mask = _tile(rows, tl.arange(0, BLOCK_K), M, K)
    cols = tl.arange(0, BLOCK_N)
    z_offs, z_mask = _tile(rows, cols, M, N)
    c = tl.load(p_ptr)
    amax = tl.load(p_ptr + 1)
    s = tl.sqrt(c)
    x = tl.load(x_ptr + x_offs, mask=x_mask, other=0.0)
    z = tl.load(z_ptr + z_offs, mask=z_mask, other=0.0)
    xn = tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), MIN_N)[:, None]
    zn = tl.maximum(tl.sqrt(tl.sum(z * z, axis=1)), MIN_N)[:, None]
    tau = tl.minimum(zn / xn * _artanh_pos(tl.minimum(s * xn, amax)), TMAX)
    mv = _tanh_pos(tau) / (s * zn) * z
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=cols < N, other=0.0)[None, :]
        mb = tl.sum(mv * b, axis=1)[:, None]
        m2 = tl.sum(mv * mv, axis=1)[:, None]
        b2 = tl.sum(b * b, axis=1)[:, None]
        num = (1.0 + 2.0 * c * mb + c * b2) * mv + (1.0 - c * m2) * b
        mv = num / tl.maximum(1.0 + 2.0 * c * mb + c * c * m2 * b2, MIN_N)
    tl.store(out_ptr + z_offs, mv, mask=z_mask)


def _params(like: torch.Tensor, c: float) -> torch.Tensor:
    return torch.tensor([c, artanh_max(like.dtype)], dtype=like.dtype, device=like.device)


def _blocks(width: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(width)
    return max(1, _TILE // block_d), block_d


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


def mobius_add(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    x, y = torch.broadcast_tensors(x, y)
    x2d, y2d = _rows(x), _rows(y)
    out = torch.empty_like(x2d)
    m, d = x2d.shape
    block_m, block_d = _blocks(d)
    if m:
        _mobius_add_kernel[(triton.cdiv(m, block_m),)](
            x2d, y2d, out, _params(x2d, c), m, d, block_m, block_d, MIN_NORM
        )
    return out.reshape(x.shape)


def dist(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    x, y = torch.broadcast_tensors(x, y)
    x2d, y2d = _rows(x), _rows(y)
    m, d = x2d.shape
    out = x2d.new_empty(m)
    block_m, block_d = _blocks(d)
    if m:
        _dist_kernel[(triton.cdiv(m, block_m),)](
            x2d, y2d, out, _params(x2d, c), m, d, block_m, block_d, MIN_NORM
        )
    return out.reshape(x.shape[:-1])


def _radial(v: torch.Tensor, c: float, log: bool) -> torch.Tensor:
    v2d = _rows(v)
    out = torch.empty_like(v2d)
    m, d = v2d.shape
    block_m, block_d = _blocks(d)
    if m:
        _radial_kernel[(triton.cdiv(m, block_m),)](
            v2d, out, _params(v2d, c), m, d, log, block_m, block_d, MIN_NORM, TANH_MAX
        )
    return out.reshape(v.shape)


def expmap0(v: torch.Tensor, c: float) -> torch.Tensor:
    return _radial(v, c, log=False)


def logmap0(y: torch.Tensor, c: float) -> torch.Tensor:
    return _radial(y, c, log=True)


def poincare_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, c: float
) -> torch.Tensor:
    """The GEMM stays with the vendor BLAS; the kernel fuses everything after it."""
    x2d = _rows(x)
    z = (x2d @ weight.t()).contiguous()
    m, k = x2d.shape
    n = z.shape[1]
    out = torch.empty_like(z)
    block_k, block_n = triton.next_power_of_2(k), triton.next_power_of_2(n)
    block_m = max(1, _TILE // max(block_k, block_n))
    if m:
        _poincare_linear_kernel[(triton.cdiv(m, block_m),)](
            x2d,
            z,
            z if bias is None else bias.contiguous(),
            out,
            _params(x2d, c),
            m,
            k,
            n,
            bias is not None,
            block_m,
            block_k,
            block_n,
            MIN_NORM,
            TANH_MAX,
        )
    return out.reshape(*x.shape[:-1], n)
