"""Plain-PyTorch forward formulas of the hot Poincare-ball ops (curvature -c, ``s = sqrt(c)``).

These are the CPU kernels of the ``rs_hyp`` custom ops and, being differentiable PyTorch, the
reference the hand-derived backward formulas in ``grads.py`` are tested against. They take ``c`` as
an already validated float. Rows live on the last dim; shapes broadcast like elementwise ops.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .numerics import MIN_NORM, TANH_MAX, artanh_max, dot, norm, sq_norm


def mobius_add(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """x (+) y = ((1 + 2c<x,y> + c|y|^2) x + (1 - c|x|^2) y) / (1 + 2c<x,y> + c^2|x|^2|y|^2)."""
    xy, x2, y2 = dot(x, y), sq_norm(x), sq_norm(y)
    num = (1 + 2 * c * xy + c * y2) * x + (1 - c * x2) * y
    den = (1 + 2 * c * xy + c * c * x2 * y2).clamp_min(MIN_NORM)
    return num / den


def expmap0(v: torch.Tensor, c: float) -> torch.Tensor:
    """exp_0(v) = tanh(s|v|) v / (s|v|)."""
    s = math.sqrt(c)
    sn = s * norm(v)
    return torch.tanh(sn.clamp_max(TANH_MAX)) / sn * v


def logmap0(y: torch.Tensor, c: float) -> torch.Tensor:
    """log_0(y) = artanh(s|y|) y / (s|y|)."""
    s = math.sqrt(c)
    sn = s * norm(y)
    return torch.atanh(sn.clamp_max(artanh_max(y.dtype))) / sn * y


class DistParts(NamedTuple):
    diff: torch.Tensor  # x - y
    m: torch.Tensor  # |x - y|, clamped
    q2: torch.Tensor  # 1 - 2c<x,y> + c^2 |x|^2 |y|^2
    u_raw: torch.Tensor  # s |(-x) (+) y| before the artanh clamp


def dist_parts(x: torch.Tensor, y: torch.Tensor, c: float) -> DistParts:
    """|(-x) (+) y| = |x - y| / sqrt(1 - 2c<x,y> + c^2|x|^2|y|^2): no Mobius sum is materialised."""
    diff = x - y
    m = norm(diff)
    q2 = (1 - 2 * c * dot(x, y) + c * c * sq_norm(x) * sq_norm(y)).clamp_min(MIN_NORM)
    return DistParts(diff, m, q2, math.sqrt(c) * m / q2.sqrt())


def dist(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """d(x, y) = (2/s) artanh(s |(-x) (+) y|); the last dim is reduced."""
    u = dist_parts(x, y, c).u_raw.clamp_max(artanh_max(x.dtype))
    return (2 / math.sqrt(c) * torch.atanh(u)).squeeze(-1)


class MatvecParts(NamedTuple):
    z: torch.Tensor  # x @ W^T
    xn: torch.Tensor  # |x|, clamped
    zn: torch.Tensor  # |z|, clamped
    a_raw: torch.Tensor  # s|x| before the artanh clamp
    tau_raw: torch.Tensor  # |z| / |x| * artanh(s|x|) before the tanh clamp
    mv: torch.Tensor  # the Mobius matvec W (x) x


def matvec_parts(x: torch.Tensor, weight: torch.Tensor, c: float) -> MatvecParts:
    """W (x) x = tanh(|Wx| / |x| * artanh(s|x|)) Wx / (s|Wx|) (Ganea et al. 2018)."""
    s = math.sqrt(c)
    z = torch.matmul(x, weight.t())
    xn, zn = norm(x), norm(z)
    a_raw = s * xn
    tau_raw = zn / xn * torch.atanh(a_raw.clamp_max(artanh_max(x.dtype)))
    mv = torch.tanh(tau_raw.clamp_max(TANH_MAX)) / (s * zn) * z
    return MatvecParts(z, xn, zn, a_raw, tau_raw, mv)


def poincare_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, c: float
) -> torch.Tensor:
    """(W (x) x) (+) b: the hyperbolic linear layer of Ganea et al.; ``bias`` is a ball point."""
    mv = matvec_parts(x, weight, c).mv
    return mv if bias is None else mobius_add(mv, bias, c)
