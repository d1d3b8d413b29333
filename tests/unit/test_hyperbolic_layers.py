"""Hyperbolic layers against independent float64 formulas and limits."""

from __future__ import annotations

import math

import pytest
import torch

from rs_compile.hyperbolic import (
    HyperbolicMLR,
    Klein,
    KleinLinear,
    Lorentz,
    LorentzLinear,
    PoincareBall,
    PoincareLinear,
)

F64 = torch.float64


def _randomise(module: torch.nn.Module, seed: int, scale: float = 0.5) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module.double()


def test_poincare_linear_matches_ganea_formula():
    c = 0.8
    layer = _randomise(PoincareLinear(5, 3, c=c), seed=0)
    x = PoincareBall(c).random(7, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    s, xn = math.sqrt(c), x.norm(dim=-1, keepdim=True)
    wx = x @ layer.weight.t()
    wxn = wx.norm(dim=-1, keepdim=True)
    mv = torch.tanh(wxn / xn * torch.atanh(s * xn)) * wx / (s * wxn)
    bn = layer.bias.norm()
    b = torch.tanh(s * bn) * layer.bias / (s * bn)
    # Mobius addition written out independently of the library.
    mb, m2, b2 = (mv * b).sum(-1, keepdim=True), (mv * mv).sum(-1, keepdim=True), (b * b).sum()
    want = ((1 + 2 * c * mb + c * b2) * mv + (1 - c * m2) * b) / (1 + 2 * c * mb + c * c * m2 * b2)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-12)


def test_poincare_linear_tends_to_euclidean_linear_as_c_vanishes():
    layer = _randomise(PoincareLinear(4, 6, c=1e-8), seed=2)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    torch.testing.assert_close(layer(x), x @ layer.weight.t() + layer.bias, rtol=1e-6, atol=1e-7)


def test_poincare_linear_gradcheck_and_no_bias():
    layer = _randomise(PoincareLinear(3, 2, c=1.5, bias=False), seed=4)
    x = PoincareBall(1.5).random(4, 3, dtype=F64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w: torch.func.functional_call(layer, {"weight": w}, (x,)),
        (x, layer.weight.detach().clone().requires_grad_()),
    )


def test_klein_linear_is_einstein_matvec_plus_einstein_bias():
    c = 1.3
    layer, kl = _randomise(KleinLinear(4, 3, c=c), seed=5), Klein(c)
    k = kl.from_poincare(
        PoincareBall(c).random(6, 4, generator=torch.Generator().manual_seed(6), dtype=F64)
    )
    s, kn = math.sqrt(c), k.norm(dim=-1, keepdim=True)
    wk = k @ layer.weight.t()
    wkn = wk.norm(dim=-1, keepdim=True)
    einstein_mv = torch.tanh(wkn / kn * torch.atanh(s * kn)) * wk / (s * wkn)
    bias_klein = kl.from_poincare(PoincareBall(c).expmap0(layer.bias))
    out = layer(k)
    torch.testing.assert_close(out, kl.add(einstein_mv, bias_klein), rtol=0, atol=1e-12)
    assert (s * out.norm(dim=-1) < 1).all()


def test_lorentz_linear_output_on_hyperboloid():
    c = 0.6
    layer, lor = _randomise(LorentzLinear(4, 3, c=c), seed=7), Lorentz(c)
    x = lor.expmap0(torch.randn(5, 4, generator=torch.Generator().manual_seed(8), dtype=F64))
    y = layer(x)
    assert y.shape == (5, 4)
    torch.testing.assert_close(
        lor.inner(y, y), torch.full((5, 1), -1 / c, dtype=F64), rtol=0, atol=1e-8
    )
    torch.testing.assert_close(y[:, 1:], x @ layer.linear.weight.t() + layer.linear.bias)


def _distance_to_hyperplanes_2d(ball: PoincareBall, x, p, a) -> torch.Tensor:
    """Brute force: minimise d(x, exp_p(t w)) over t, w the tangent direction orthogonal to a.
    Distance to a geodesic is convex along it, so a ternary search converges. x: [n, 1, 2] against
    hyperplanes p, a: [k, 2] gives [n, k]."""
    w = torch.stack([-a[:, 1], a[:, 0]], dim=-1) / ball.lambda_x(p)
    lo = torch.full((x.shape[0], p.shape[0], 1), -30.0, dtype=F64)
    hi = -lo
    f = lambda t: ball.dist(x, ball.expmap(p, t * w))  # noqa: E731
    for _ in range(100):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        left = (f(m1) < f(m2)).unsqueeze(-1)
        lo, hi = torch.where(left, lo, m1), torch.where(left, m2, hi)
    return f((lo + hi) / 2)


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_mlr_logit_is_scaled_signed_distance_to_class_hyperplane(c):
    mlr = _randomise(HyperbolicMLR(2, 3, c=c), seed=9, scale=0.4)
    ball = PoincareBall(c)
    x = ball.random(
        4, 1, 2, max_fraction=0.8, generator=torch.Generator().manual_seed(10), dtype=F64
    )
    p, a = ball.expmap0(mlr.offset), mlr.normal
    side = torch.sign((ball.mobius_add(-p, x) * a).sum(-1))
    want = 2 * a.norm(dim=-1) * side * _distance_to_hyperplanes_2d(ball, x, p, a)
    torch.testing.assert_close(mlr(x.squeeze(1)), want, rtol=1e-6, atol=1e-9)


def test_mlr_tends_to_euclidean_mlr_as_c_vanishes():
    """logit -> 4 <x - p, a> when c -> 0 (lambda_p -> 2, asinh(u) -> u, Mobius -> vector sum)."""
    mlr = _randomise(HyperbolicMLR(5, 4, c=1e-10), seed=11)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(12), dtype=F64)
    want = 4 * ((x[:, None, :] - mlr.offset) * mlr.normal).sum(-1)
    torch.testing.assert_close(mlr(x), want, rtol=1e-6, atol=1e-6)


def test_mlr_gradcheck():
    mlr = _randomise(HyperbolicMLR(3, 2, c=0.9), seed=13)
    x = PoincareBall(0.9).random(3, 3, dtype=F64).requires_grad_()
    params = {k: v.detach().clone().requires_grad_() for k, v in mlr.named_parameters()}
    assert torch.autograd.gradcheck(
        lambda x, o, n: torch.func.functional_call(mlr, {"offset": o, "normal": n}, (x,)),
        (x, params["offset"], params["normal"]),
    )


@pytest.mark.parametrize("layer", [PoincareLinear, KleinLinear, LorentzLinear, HyperbolicMLR])
def test_layers_reject_invalid_curvature(layer):
    with pytest.raises(ValueError, match="c="):
        layer(3, 2, c=-1.0)
