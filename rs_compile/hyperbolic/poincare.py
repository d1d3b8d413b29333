"""The Poincare ball model ``{x : c|x|^2 < 1}`` of hyperbolic space with curvature -c.

The hot maps (Mobius addition, distance, exp/log at 0, Mobius matvec) call the ``rs_hyp`` custom
ops, so compiled graphs and eager code run the same tested kernels and backward formulas. Every
other map is composed from them with the standard identities (Ganea et al. 2018):
``exp_x(v) = x (+) exp_0(lambda_x v / 2)``, ``log_x(y) = (2 / lambda_x) log_0((-x) (+) y)``,
``r (x) x = exp_0(r log_0(x))``, ``M (x) x = exp_0(M log_0(x))``.

Maps that return points project them to the radius ``(1 - eps) / sqrt(c)`` (see ``numerics``);
maps that take points do not repair them, but their artanh clamps keep them finite at the boundary.
"""

from __future__ import annotations

import math

import torch

from . import ops
from .numerics import MIN_NORM, ball_eps, check_curvature, norm, sq_norm


class PoincareBall:
    """Poincare ball of curvature -c (``c > 0``; a float or a one-element tensor)."""

    def __init__(self, c: float | torch.Tensor = 1.0) -> None:
        self.c = check_curvature(c)
        self.sqrt_c = math.sqrt(self.c)

    def __repr__(self) -> str:
        return f"PoincareBall(c={self.c})"

    def max_norm(self, dtype: torch.dtype) -> float:
        """Largest norm ``project`` lets through for ``dtype``."""
        return (1 - ball_eps(dtype)) / self.sqrt_c

    def random(
        self,
        *shape: int,
        max_fraction: float = 0.9,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Points of shape ``shape`` (last dim = ball dim): uniform directions, Euclidean radii
        uniform in ``[0, max_fraction / sqrt(c))``. For tests, examples and initialisation.
        """
        if not 0 < max_fraction < 1:
            raise ValueError(
                f"max_fraction={max_fraction} must lie in (0, 1) to stay inside the ball"
            )
        v = torch.randn(shape, generator=generator, dtype=dtype)
        r = torch.rand((*shape[:-1], 1), generator=generator, dtype=dtype) * max_fraction
        return v / norm(v) * r / self.sqrt_c

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Scale rows with norm above ``max_norm`` back onto that radius."""
        n = norm(x)
        limit = self.max_norm(x.dtype)
        return torch.where(n > limit, x / n * limit, x)

    def lambda_x(self, x: torch.Tensor) -> torch.Tensor:
        """Conformal factor ``2 / (1 - c|x|^2)`` (keepdim): the metric is lambda_x^2 * Euclid's."""
        return 2 / (1 - self.c * sq_norm(x)).clamp_min(MIN_NORM)

    def mobius_add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.project(ops.mobius_add(x, y, self.c))

    def mobius_scalar(self, r: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``r (x) x``; a tensor ``r`` broadcasts against ``x`` (give it a trailing size-1 dim)."""
        return self.expmap0(r * ops.logmap0(x, self.c))

    def mobius_matvec(self, m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``M (x) x`` for ``m`` [out, in] acting on rows of ``x`` (nn.Linear orientation)."""
        return self.project(ops.poincare_linear(x, m, None, self.c))

    def expmap0(self, v: torch.Tensor) -> torch.Tensor:
        return self.project(ops.expmap0(v, self.c))

    def logmap0(self, y: torch.Tensor) -> torch.Tensor:
        return ops.logmap0(y, self.c)

    def expmap(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Exponential map at ``x`` of the tangent vector ``v``."""
        return self.mobius_add(x, self.expmap0(self.lambda_x(x) * v / 2))

    def logmap(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Logarithmic map at ``x``: the tangent vector at ``x`` pointing to ``y``."""
        return 2 / self.lambda_x(x) * ops.logmap0(ops.mobius_add(-x, y, self.c), self.c)

    def dist(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Geodesic distance ``(2/sqrt(c)) artanh(sqrt(c) |(-x) (+) y|)``; reduces the last dim."""
        return ops.dist(x, y, self.c)

    def geodesic(self, x: torch.Tensor, y: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Point at fraction ``t`` of the geodesic from ``x`` to ``y``:
        ``x (+) (t (x) ((-x) (+) y))``.
        """
        return self.mobius_add(x, self.mobius_scalar(t, ops.mobius_add(-x, y, self.c)))
