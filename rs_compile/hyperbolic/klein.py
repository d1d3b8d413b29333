"""The Beltrami-Klein model: the ball ``{k : c|k|^2 < 1}`` in which geodesics are straight chords.

Its gyrovector operations are Einstein's (Ungar): the Klein <-> Poincare map
``k = 2p / (1 + c|p|^2)`` is an isometry that carries Mobius addition to Einstein addition, so
everything here is written in Klein coordinates with Einstein formulas and returns Klein
coordinates (the original code's "Klein addition" returned Poincare coordinates, and its Klein
distance was 0 for distinct points). The Einstein midpoint is the model's reason to exist: the
weighted barycentre of hyperbolic points (used for attention-style aggregation) is a closed form
here and needs no iteration.
"""

from __future__ import annotations

import math

import torch

from .numerics import MIN_NORM, artanh_max, check_curvature, dot, norm, sq_norm


class Klein:
    """Beltrami-Klein ball of curvature -c (``c > 0``; a float or a one-element tensor)."""

    def __init__(self, c: float | torch.Tensor = 1.0) -> None:
        self.c = check_curvature(c)
        self.sqrt_c = math.sqrt(self.c)

    def __repr__(self) -> str:
        return f"Klein(c={self.c})"

    def gamma(self, k: torch.Tensor) -> torch.Tensor:
        """Lorentz factor ``1 / sqrt(1 - c|k|^2)`` (keepdim)."""
        return (1 - self.c * sq_norm(k)).clamp_min(MIN_NORM).rsqrt()

    def from_poincare(self, p: torch.Tensor) -> torch.Tensor:
        return 2 * p / (1 + self.c * sq_norm(p))

    def to_poincare(self, k: torch.Tensor) -> torch.Tensor:
        return k / (1 + (1 - self.c * sq_norm(k)).clamp_min(0).sqrt())

    def add(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Einstein addition
        ``(u + v / gamma_u + c gamma_u / (1 + gamma_u) <u, v> u) / (1 + c <u, v>)``.
        """
        uv = dot(u, v)
        g = self.gamma(u)
        return (u + v / g + self.c * g / (1 + g) * uv * u) / (1 + self.c * uv).clamp_min(MIN_NORM)

    def dist(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``artanh(sqrt(c) |(-u) (+)_E v|) / sqrt(c)``; reduces the last dim."""
        a = (self.sqrt_c * norm(self.add(-u, v))).clamp_max(artanh_max(u.dtype))
        return (torch.atanh(a) / self.sqrt_c).squeeze(-1)

    def einstein_midpoint(
        self, k: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Weighted Einstein midpoint ``sum_i w_i gamma_i k_i / sum_i w_i gamma_i`` of the points on
        dim -2 of ``k`` (shape [..., n, d]); ``weights`` ([..., n], non-negative) default to equal.
        For two points with equal weights it is the geodesic midpoint.
        """
        g = self.gamma(k)
        if weights is not None:
            if bool((weights < 0).any()):
                raise ValueError(
                    "einstein_midpoint weights must be non-negative: negative weights can put the "
                    "barycentre outside the ball; use softmax scores or other non-negative weights"
                )
            g = g * weights.unsqueeze(-1)
        return (g * k).sum(dim=-2) / g.sum(dim=-2).clamp_min(MIN_NORM)
