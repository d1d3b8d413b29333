"""The Lorentz (hyperboloid) model ``{x : -x0^2 + |x_s|^2 = -1/c, x0 > 0}`` in R^(n+1).

Coordinate 0 is the time coordinate ``x0``; ``x_s = x[..., 1:]`` is the space part. The Minkowski
product is ``<x, y>_L = -x0 y0 + <x_s, y_s>`` (the original code had this sign flipped, which made
every distance equal). Conversions hold for every ``c``:
``x0 = (1 + c|p|^2) / (sqrt(c) (1 - c|p|^2))``, ``x_s = 2p / (1 - c|p|^2)``, and back
``p = x_s / (1 + sqrt(c) x0)``.

Distance and log use ``asinh`` forms instead of ``arcosh(-c <x, y>_L)``: arcosh has an infinite
slope at 1, so close points would lose half their digits and get infinite gradients.
"""

from __future__ import annotations

import math

import torch

from .numerics import MIN_NORM, check_curvature, norm, sq_norm


class Lorentz:
    """Hyperboloid of curvature -c (``c > 0``; a float or a one-element tensor)."""

    def __init__(self, c: float | torch.Tensor = 1.0) -> None:
        self.c = check_curvature(c)
        self.sqrt_c = math.sqrt(self.c)

    def __repr__(self) -> str:
        return f"Lorentz(c={self.c})"

    @staticmethod
    def inner(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Minkowski product ``-x0 y0 + <x_s, y_s>`` (keepdim)."""
        prod = x * y
        return prod[..., 1:].sum(dim=-1, keepdim=True) - prod[..., :1]

    def from_poincare(self, p: torch.Tensor) -> torch.Tensor:
        """Ball point of curvature -c -> hyperboloid point (one more coordinate)."""
        cp2 = self.c * sq_norm(p)
        den = (1 - cp2).clamp_min(MIN_NORM)
        return torch.cat([(1 + cp2) / (self.sqrt_c * den), 2 * p / den], dim=-1)

    def to_poincare(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., 1:] / (1 + self.sqrt_c * x[..., :1])

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Recompute the time coordinate from the space part: ``x0 = sqrt(1/c + |x_s|^2)``."""
        xs = x[..., 1:]
        return torch.cat([(1 / self.c + sq_norm(xs)).sqrt(), xs], dim=-1)

    def expmap0(self, v: torch.Tensor) -> torch.Tensor:
        """Exp at the origin ``(1/sqrt(c), 0)`` of a tangent vector given by its n space coordinates
        (tangent vectors there have zero time part): ``(cosh(s|v|)/s, sinh(s|v|) v / (s|v|))``.
        Lengths are Riemannian, so the ball's ``expmap0(v)`` (which travels ``lambda_0 |v| = 2|v|``)
        is ``to_poincare(expmap0(2 v))`` here.
        """
        sn = self.sqrt_c * norm(v)
        return torch.cat([torch.cosh(sn) / self.sqrt_c, torch.sinh(sn) / sn * v], dim=-1)

    def logmap0(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of ``expmap0``: n space coordinates, ``asinh(s|x_s|) x_s / (s|x_s|)``."""
        xs = x[..., 1:]
        sn = self.sqrt_c * norm(xs)
        return torch.asinh(sn) / sn * xs

    def dist(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(2/s) asinh(s |x - y|_L / 2)``, ``|x - y|_L^2 = <x - y, x - y>_L = -2/c - 2<x, y>_L``:
        ``arcosh(-c <x, y>_L) / s`` without arcosh's cancellation; reduces the last dim.
        """
        d = x - y
        sq = self.inner(d, d).clamp_min(MIN_NORM**2)
        return (2 / self.sqrt_c * torch.asinh(self.sqrt_c * sq.sqrt() / 2)).squeeze(-1)

    def geodesic(self, p: torch.Tensor, q: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """``(sinh((1-t) theta) p + sinh(t theta) q) / sinh(theta)``, theta = sqrt(c) d(p, q)."""
        theta = (self.sqrt_c * self.dist(p, q)).unsqueeze(-1).clamp_min(MIN_NORM)
        return (torch.sinh((1 - t) * theta) * p + torch.sinh(t * theta) * q) / torch.sinh(theta)
