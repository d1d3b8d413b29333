"""Dynamic int8 activations (``act_bits=8``): the rounding the W4A8 GEMV multiplies with.

Each row of ``x`` is split into the weight's groups along ``in_features`` and every group is
rounded to ``round(x / s) * s`` with ``s = max|x| / 127`` (symmetric, one float32 scale per row and
group, computed per call). The integer dot products of the CPU kernel
(``rs_compile/lowering/cpu_kernel.cpp``) are then exact, and its result differs from this rounding
followed by a float matmul only in the order of float additions. A group holding a NaN or inf
gives NaN, as the matmul would.
"""

from __future__ import annotations

import torch

ACT_BITS = (0, 8)  # 0: float activations (weight-only); 8: dynamic int8 per group
ACT_TOP = 127  # largest |level| an activation rounds to (the C++ kernel is built with it too)


def _round_groups(xg: torch.Tensor) -> torch.Tensor:
    amax = xg.abs().amax(-1, keepdim=True)
    s = torch.where(amax > 0, amax / ACT_TOP, torch.ones_like(amax))
    return torch.round(xg / s) * s


def quantize_activations(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x[..., K]`` rounded to int8 levels per row and group of ``group_size`` (same dtype).

    The whole groups and the short last group are rounded separately: zero-padding to whole
    groups and slicing back is miscompiled by Inductor (torch 2.13 CPU gives garbage for K=200,
    G=64), and the lowering traces this function.
    """
    k = x.shape[-1]
    full = k - k % group_size
    xf = x.to(torch.float32)
    parts = []
    if full:
        parts.append(_round_groups(xf[..., :full].unflatten(-1, (-1, group_size))).flatten(-2))
    if full < k:
        parts.append(_round_groups(xf[..., full:]))
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).to(x.dtype)
