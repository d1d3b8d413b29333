"""Hyperbolic layers: Poincare, Klein and Lorentz linear maps and the hyperbolic MLR head.

Parameters that are ball points (biases, hyperplane offsets) are stored as tangent vectors at the
origin and mapped with ``expmap0`` in ``forward``, so a plain Euclidean optimiser (Adam, SGD) keeps
them on the manifold; no Riemannian optimiser is needed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import ops
from .klein import Klein
from .lorentz import Lorentz
from .numerics import MIN_NORM, norm, sq_norm
from .poincare import PoincareBall


def _init_weight(out_features: int, in_features: int) -> nn.Parameter:
    """nn.Linear's default initialisation."""
    w = torch.empty(out_features, in_features)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    return nn.Parameter(w)


class PoincareLinear(nn.Module):
    """``y = (W (x) x) (+) b`` on the Poincare ball (Ganea et al. 2018): Mobius matvec then Mobius
    addition of the bias point ``b = exp_0(bias)``; one fused ``rs_hyp::poincare_linear`` op.
    """

    def __init__(self, in_features: int, out_features: int, c: float = 1.0, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.ball = PoincareBall(c)
        self.weight = _init_weight(out_features, in_features)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.ball.expmap0(self.bias)
        return self.ball.project(ops.poincare_linear(x, self.weight, b, self.ball.c))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"c={self.ball.c}, bias={self.bias is not None}"
        )


class KleinLinear(PoincareLinear):
    """Einstein matvec plus Einstein bias addition on Klein coordinates.

    The Klein <-> Poincare isometry carries Einstein's operations to Mobius's, so this *is*
    ``PoincareLinear`` conjugated by the conversions (and shares its fused op and backward); it
    exists for models that keep features in Klein coordinates, e.g. around Einstein-midpoint
    pooling.
    """

    def __init__(self, in_features: int, out_features: int, c: float = 1.0, bias: bool = True):
        super().__init__(in_features, out_features, c, bias)
        self.klein = Klein(c)

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        return self.klein.from_poincare(super().forward(self.klein.to_poincare(k)))


class LorentzLinear(nn.Module):
    """Fully hyperbolic linear layer (Chen et al. 2022): ``y_s = W x + b`` on all n+1 coordinates
    of a hyperboloid point, then ``y_0 = sqrt(1/c + |y_s|^2)`` so ``y`` lies exactly on the
    hyperboloid. Maps [..., in_features + 1] to [..., out_features + 1].
    """

    def __init__(self, in_features: int, out_features: int, c: float = 1.0, bias: bool = True):
        super().__init__()
        self.manifold = Lorentz(c)
        self.linear = nn.Linear(in_features + 1, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.manifold.project(torch.cat([x[..., :1], self.linear(x)], dim=-1))


class HyperbolicMLR(nn.Module):
    """Hyperbolic multinomial logistic regression (Ganea et al. 2018, eq. 25).

    Class k has an offset ``p_k = exp_0(offset_k)`` and a normal ``a_k`` in the tangent space at
    ``p_k``, stored as ``normal_k`` at the origin and transported by
    ``a_k = (1 - c|p_k|^2) normal_k``.
    Then ``lambda_{p_k} |a_k| = 2 |normal_k|`` and the logit is
    ``(2 |normal_k| / sqrt(c)) asinh(2 sqrt(c) <z, normal_k / |normal_k|> / (1 - c|z|^2))`` with
    ``z = (-p_k) (+) x``: ``2 |normal_k|`` times the signed distance from x to the class hyperplane.
    """

    def __init__(self, in_features: int, num_classes: int, c: float = 1.0):
        super().__init__()
        self.ball = PoincareBall(c)
        self.offset = nn.Parameter(torch.zeros(num_classes, in_features))
        self.normal = _init_weight(num_classes, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] ball points -> logits [..., num_classes]."""
        c, s = self.ball.c, self.ball.sqrt_c
        p = self.ball.expmap0(self.offset)
        z = ops.mobius_add(-p, x.unsqueeze(-2), c)
        a_norm = norm(self.normal)
        proj = (z * (self.normal / a_norm)).sum(dim=-1, keepdim=True)
        conf = (1 - c * sq_norm(z)).clamp_min(MIN_NORM)
        return (2 * a_norm / s * torch.asinh(2 * s * proj / conf)).squeeze(-1)
