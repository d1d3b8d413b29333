"""Hand-derived vector-Jacobian products of the hot Poincare-ball ops.

Written out (not autograd through ``reference.py``) so the backward is one fused elementwise/rowwise
pass a compiler can see, and so each formula is checked by gradcheck and against autograd through
the float64 reference in the tests. A clamp that is active contributes a zero derivative, exactly as
autograd through ``clamp`` would. Gradients come back at the broadcast shape; the op's autograd
wrapper sums them back to each input's shape.

Notation: ``s = sqrt(c)``, ``g`` the incoming gradient, ``<.,.>`` the row dot product.
"""

from __future__ import annotations

import math

import torch

from . import reference
from .numerics import MIN_NORM, TANH_MAX, artanh_max, dot, norm, sq_norm


def mobius_add(
    g: torch.Tensor, x: torch.Tensor, y: torch.Tensor, c: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """out = (A x + B y) / D with A = 1 + 2c<x,y> + c|y|^2, B = 1 - c|x|^2,
    D = 1 + 2c<x,y> + c^2|x|^2|y|^2. Differentiating numerator and denominator:

    gx = (A g + 2c<g,x> y - 2c<g,y> x) / D - <g,out> (2c y + 2c^2|y|^2 x) / D
    gy = (B g + 2c<g,x> (x + y)) / D      - <g,out> (2c x + 2c^2|x|^2 y) / D
    """
    xy, x2, y2 = dot(x, y), sq_norm(x), sq_norm(y)
    a = 1 + 2 * c * xy + c * y2
    b = 1 - c * x2
    den_raw = 1 + 2 * c * xy + c * c * x2 * y2
    den = den_raw.clamp_min(MIN_NORM)
    out = (a * x + b * y) / den
    gx_, gy_ = dot(g, x), dot(g, y)
    g_out = dot(g, out) * (den_raw > MIN_NORM)
    gx = (a * g + 2 * c * (gx_ * y - gy_ * x) - g_out * (2 * c * y + 2 * c * c * y2 * x)) / den
    gy = (b * g + 2 * c * gx_ * (x + y) - g_out * (2 * c * x + 2 * c * c * x2 * y)) / den
    return gx, gy


def _radial(
    g: torch.Tensor, v: torch.Tensor, n: torch.Tensor, f: torch.Tensor, outer_grad: torch.Tensor
) -> torch.Tensor:
    """VJP of out = f(|v|) v with f(n) = h(s n) / (s n): f'(n) = (h'(s n) - f) / n, so
    gv = f g + f'(n) <g,v> v / n. ``outer_grad`` is h' at the (clamped) argument, 0 where clamped.
    """
    return f * g + (outer_grad - f) / (n * n) * dot(g, v) * v


def expmap0(g: torch.Tensor, v: torch.Tensor, c: float) -> torch.Tensor:
    """h = tanh, h' = 1 - tanh^2 (0 beyond the TANH_MAX clamp)."""
    n = norm(v)
    sn = math.sqrt(c) * n
    t = torch.tanh(sn.clamp_max(TANH_MAX))
    return _radial(g, v, n, t / sn, (1 - t * t) * (sn < TANH_MAX))


def logmap0(g: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """h = artanh, h' = 1 / (1 - a^2) (0 beyond the artanh clamp)."""
    n = norm(y)
    sn = math.sqrt(c) * n
    amax = artanh_max(y.dtype)
    a = sn.clamp_max(amax)
    return _radial(g, y, n, torch.atanh(a) / sn, (sn < amax) / (1 - a * a))


def dist(
    g: torch.Tensor, x: torch.Tensor, y: torch.Tensor, c: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """d = (2/s) artanh(u), u = s m / q, m = |x - y|, q^2 = 1 - 2c<x,y> + c^2|x|^2|y|^2.

    dd/du = 2 / (s (1 - u^2)); du/dx = (s/q) ((x - y)/m - (m c / q^2)(c|y|^2 x - y)), and
    symmetrically for y, so with K = 2 / ((1 - u^2) q):
    gx = g K ( (x - y)/m - (m c/q^2)(c|y|^2 x - y) ),
    gy = g K (-(x - y)/m - (m c/q^2)(c|x|^2 y - x) ).
    """
    p = reference.dist_parts(x, y, c)
    amax = artanh_max(x.dtype)
    u = p.u_raw.clamp_max(amax)
    k = g.unsqueeze(-1) * (p.u_raw < amax) * 2 / ((1 - u * u) * p.q2.sqrt())
    unit = p.diff / p.m
    cm = c * p.m / p.q2
    gx = k * (unit - cm * (c * sq_norm(y) * x - y))
    gy = k * (-unit - cm * (c * sq_norm(x) * y - x))
    return gx, gy


def _matvec(
    g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, p: reference.MatvecParts, c: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """mv = T(tau) z / (s|z|), z = x W^T, tau = |z| A(|x|) / |x|, A = artanh(s|x|), T = tanh.

    With P = <g,z>, T' = 1 - T^2 and A' = s / (1 - (s|x|)^2) (each 0 where its clamp is active):
    gz = T/(s|z|) g + (P/s) (T' A / (|x| |z|^2) - T / |z|^3) z
    gx = (P/s) T' (A' |x| - A) / |x|^3 x + gz W,    gW = gz^T x (batch dims flattened).
    """
    s = math.sqrt(c)
    amax = artanh_max(x.dtype)
    a = p.a_raw.clamp_max(amax)
    big_a = torch.atanh(a)
    t = torch.tanh(p.tau_raw.clamp_max(TANH_MAX))
    dt = (1 - t * t) * (p.tau_raw < TANH_MAX)
    da = s / (1 - a * a) * (p.a_raw < amax)
    pz = dot(g, p.z) / s
    gz = t / (s * p.zn) * g + pz * (dt * big_a / (p.xn * p.zn**2) - t / p.zn**3) * p.z
    gx = pz * dt * (da * p.xn - big_a) / p.xn**3 * x + torch.matmul(gz, weight)
    gw = gz.reshape(-1, gz.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    return gx, gw


def poincare_linear(
    g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, c: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """out = mv (+) b: chain the Mobius-add VJP into the matvec VJP (mv is recomputed)."""
    p = reference.matvec_parts(x, weight, c)
    gb = None
    if bias is not None:
        g, gb = mobius_add(g, p.mv, bias, c)
        gb = gb.sum_to_size(bias.shape)
    gx, gw = _matvec(g, x, weight, p, c)
    return gx, gw, gb
