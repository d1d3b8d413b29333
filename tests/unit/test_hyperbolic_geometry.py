"""Poincare, Lorentz and Klein geometry against closed forms in float64, the original code's bugs,
float32 behaviour at the boundary, and curvature validation."""

from __future__ import annotations

import math

import pytest
import torch

from rs_compile.hyperbolic import Klein, Lorentz, PoincareBall

F64 = torch.float64
CS = [0.3, 1.0, 2.5]


def _pairs(c: float, n: int = 64, d: int = 5, max_fraction: float = 0.95, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ball = PoincareBall(c)
    return (
        ball.random(n, d, max_fraction=max_fraction, generator=g, dtype=F64),
        ball.random(n, d, max_fraction=max_fraction, generator=g, dtype=F64),
    )


def _arcosh_dist(x, y, c):
    """d = arcosh(1 + 2c|x-y|^2 / ((1-c|x|^2)(1-c|y|^2))) / sqrt(c)."""
    num = 2 * c * ((x - y) ** 2).sum(-1)
    den = (1 - c * (x * x).sum(-1)) * (1 - c * (y * y).sum(-1))
    return torch.acosh(1 + num / den) / math.sqrt(c)


# ---------------------------------------------------------------- Poincare ball


@pytest.mark.parametrize("c", CS)
def test_poincare_dist_matches_arcosh_closed_form(c):
    x, y = _pairs(c)
    torch.testing.assert_close(
        PoincareBall(c).dist(x, y), _arcosh_dist(x, y, c), rtol=1e-10, atol=0
    )


@pytest.mark.parametrize("c", CS)
def test_dist_is_artanh_of_mobius_difference(c):
    """The op's |(-x) (+) y| = |x-y| / q shortcut agrees with the Mobius definition."""
    ball, (x, y) = PoincareBall(c), _pairs(c)
    want = 2 / math.sqrt(c) * torch.atanh(math.sqrt(c) * ball.mobius_add(-x, y).norm(dim=-1))
    torch.testing.assert_close(ball.dist(x, y), want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("c", CS)
def test_mobius_left_cancellation(c):
    ball, (x, y) = PoincareBall(c), _pairs(c, max_fraction=0.9)
    torch.testing.assert_close(ball.mobius_add(-x, ball.mobius_add(x, y)), y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("c", CS)
def test_exp_log_are_inverse_at_origin_and_at_x(c):
    ball, (x, y) = PoincareBall(c), _pairs(c, max_fraction=0.9)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=F64) / ball.lambda_x(
        x
    )
    torch.testing.assert_close(ball.logmap0(ball.expmap0(v)), v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ball.expmap0(ball.logmap0(y)), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(ball.logmap(x, ball.expmap(x, v)), v, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ball.expmap(x, ball.logmap(x, y)), y, rtol=0, atol=1e-11)


@pytest.mark.parametrize("c", CS)
def test_exp_travels_the_riemannian_length(c):
    """d(x, exp_x(v)) = lambda_x |v| (metric lambda_x^2 times Euclid's); lambda_0 = 2."""
    ball, (x, _) = PoincareBall(c), _pairs(c, max_fraction=0.9)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=F64) / ball.lambda_x(
        x
    )
    torch.testing.assert_close(
        ball.dist(x, ball.expmap(x, v)), (ball.lambda_x(x) * v).norm(dim=-1), rtol=1e-9, atol=0
    )
    torch.testing.assert_close(
        ball.dist(torch.zeros_like(v), ball.expmap0(v)), 2 * v.norm(dim=-1), rtol=1e-9, atol=0
    )


def test_lambda_x_is_the_local_metric_scale():
    ball, (x, _) = PoincareBall(0.7), _pairs(0.7, max_fraction=0.9)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    eps = 1e-6
    torch.testing.assert_close(
        ball.dist(x, x + eps * v) / eps, (ball.lambda_x(x) * v).norm(dim=-1), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("c", CS)
def test_mobius_scalar_closed_form_and_identities(c):
    ball, (x, _) = PoincareBall(c), _pairs(c, max_fraction=0.8)
    s, xn = math.sqrt(c), x.norm(dim=-1, keepdim=True)
    r = torch.tensor(-1.7, dtype=F64)
    want = torch.tanh(r * torch.atanh(s * xn)) * x / (s * xn)
    torch.testing.assert_close(ball.mobius_scalar(r, x), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        ball.mobius_scalar(2.0, x), ball.mobius_add(x, x), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        ball.mobius_scalar(0.5, ball.mobius_scalar(-3.0, x)),
        ball.mobius_scalar(-1.5, x),
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.parametrize("c", CS)
def test_mobius_matvec_closed_form(c):
    """M (x) x = tanh(|Mx|/|x| artanh(s|x|)) Mx / (s|Mx|), and r*I acts as r (x) x."""
    ball, (x, _) = PoincareBall(c), _pairs(c, max_fraction=0.8)
    m = torch.randn(3, x.shape[-1], generator=torch.Generator().manual_seed(4), dtype=F64) / 2
    s, xn = math.sqrt(c), x.norm(dim=-1, keepdim=True)
    mx = x @ m.t()
    mxn = mx.norm(dim=-1, keepdim=True)
    want = torch.tanh(mxn / xn * torch.atanh(s * xn)) * mx / (s * mxn)
    torch.testing.assert_close(ball.mobius_matvec(m, x), want, rtol=0, atol=1e-12)
    eye = 0.6 * torch.eye(x.shape[-1], dtype=F64)
    torch.testing.assert_close(
        ball.mobius_matvec(eye, x), ball.mobius_scalar(0.6, x), rtol=0, atol=1e-12
    )


def test_project_moves_only_points_outside_the_radius():
    ball = PoincareBall(2.0)
    x = torch.tensor([[0.1, 0.2], [3.0, 4.0]], dtype=F64)
    out = ball.project(x)
    assert torch.equal(out[0], x[0])
    torch.testing.assert_close(out[1].norm(), torch.tensor((1 - 1e-5) / math.sqrt(2.0), dtype=F64))
    torch.testing.assert_close(out[1] / out[1].norm(), x[1] / x[1].norm())


# ---------------------------------------------------------------- geodesics and midpoints


@pytest.mark.parametrize("c", CS)
def test_geodesic_midpoint_in_all_three_models(c):
    """The midpoint is exp_u(0.5 log_u(v)); the Poincare closed form, the Lorentz sinh formula and
    the Klein Einstein midpoint must all give it. The original's Mobius-scalar blend does not."""
    ball, lor, kl = PoincareBall(c), Lorentz(c), Klein(c)
    u, v = _pairs(c, n=32, max_fraction=0.95, seed=5)
    want = ball.expmap(u, 0.5 * ball.logmap(u, v))
    torch.testing.assert_close(ball.dist(u, want), ball.dist(want, v), rtol=1e-8, atol=0)
    torch.testing.assert_close(ball.dist(u, want), ball.dist(u, v) / 2, rtol=1e-8, atol=0)

    torch.testing.assert_close(ball.geodesic(u, v, 0.5), want, rtol=0, atol=1e-10)
    via_lorentz = lor.to_poincare(lor.geodesic(lor.from_poincare(u), lor.from_poincare(v), 0.5))
    torch.testing.assert_close(via_lorentz, want, rtol=0, atol=1e-10)
    via_klein = kl.to_poincare(
        kl.einstein_midpoint(torch.stack([kl.from_poincare(u), kl.from_poincare(v)], dim=-2))
    )
    torch.testing.assert_close(via_klein, want, rtol=0, atol=1e-10)

    blend = ball.mobius_add(ball.mobius_scalar(0.5, u), ball.mobius_scalar(0.5, v))
    far = ball.dist(u, v) > 3 / math.sqrt(c)
    assert far.any()
    assert (ball.dist(blend, want)[far] > 0.1 / math.sqrt(c)).all()


def test_geodesic_passes_through_points_at_the_right_fractions():
    ball, (u, v) = PoincareBall(1.0), _pairs(1.0, n=8)
    for t in (0.0, 0.25, 1.0):
        torch.testing.assert_close(
            ball.dist(u, ball.geodesic(u, v, t)), t * ball.dist(u, v), rtol=1e-8, atol=1e-10
        )


# ---------------------------------------------------------------- Lorentz


@pytest.mark.parametrize("c", CS)
def test_lorentz_points_lie_on_the_hyperboloid(c):
    lor, (p, _) = Lorentz(c), _pairs(c)
    v = torch.randn(16, 5, generator=torch.Generator().manual_seed(6), dtype=F64)
    for x in (lor.from_poincare(p), lor.expmap0(v), lor.project(torch.randn(16, 6, dtype=F64))):
        assert (x[..., 0] > 0).all()
        torch.testing.assert_close(
            lor.inner(x, x), torch.full_like(x[..., :1], -1 / c), rtol=0, atol=1e-8
        )


@pytest.mark.parametrize("c", CS)
def test_lorentz_distance_equals_poincare_distance(c):
    """Both the conversion (any c, not only c=1) and the Minkowski sign are exercised: with the sign
    flipped every distance came out the same constant."""
    lor, (p, q) = Lorentz(c), _pairs(c)
    d = lor.dist(lor.from_poincare(p), lor.from_poincare(q))
    torch.testing.assert_close(d, _arcosh_dist(p, q, c), rtol=1e-9, atol=0)
    assert d.std() > 0.1
    x, y = lor.from_poincare(p), lor.from_poincare(q)
    torch.testing.assert_close(
        d, torch.acosh(-c * lor.inner(x, y).squeeze(-1)) / math.sqrt(c), rtol=1e-8, atol=0
    )


@pytest.mark.parametrize("c", CS)
def test_lorentz_maps_match_poincare_maps(c):
    """The ball's coordinate tangent vector v at 0 has Riemannian length lambda_0 |v| = 2|v|, so it
    is the hyperboloid tangent vector 2v at the origin."""
    lor, ball, (p, _) = Lorentz(c), PoincareBall(c), _pairs(c)
    torch.testing.assert_close(lor.to_poincare(lor.from_poincare(p)), p, rtol=0, atol=1e-12)
    v = torch.randn(p.shape, generator=torch.Generator().manual_seed(7), dtype=F64) / (
        2 * math.sqrt(c)
    )
    torch.testing.assert_close(
        lor.to_poincare(lor.expmap0(2 * v)), ball.expmap0(v), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        lor.logmap0(lor.from_poincare(p)), 2 * ball.logmap0(p), rtol=1e-10, atol=1e-12
    )
    origin = lor.from_poincare(torch.zeros_like(p))
    torch.testing.assert_close(lor.dist(origin, lor.expmap0(v)), v.norm(dim=-1), rtol=1e-10, atol=0)


# ---------------------------------------------------------------- Klein


def _klein_arcosh_dist(k1, k2, c):
    """cosh(s d) = (1 - c<k1,k2>) / sqrt((1 - c|k1|^2)(1 - c|k2|^2))."""
    num = 1 - c * (k1 * k2).sum(-1)
    den = ((1 - c * (k1 * k1).sum(-1)) * (1 - c * (k2 * k2).sum(-1))).sqrt()
    return torch.acosh(num / den) / math.sqrt(c)


@pytest.mark.parametrize("c", CS)
def test_klein_round_trip_and_distance(c):
    kl, (p, q) = Klein(c), _pairs(c)
    k1, k2 = kl.from_poincare(p), kl.from_poincare(q)
    torch.testing.assert_close(kl.to_poincare(k1), p, rtol=0, atol=1e-12)
    d = kl.dist(k1, k2)
    assert (d > 1e-3).all()  # the original returned 0 for distinct points
    torch.testing.assert_close(d, _arcosh_dist(p, q, c), rtol=1e-9, atol=0)
    torch.testing.assert_close(d, _klein_arcosh_dist(k1, k2, c), rtol=1e-9, atol=0)


@pytest.mark.parametrize("c", CS)
def test_klein_addition_returns_klein_coordinates(c):
    kl, ball, (p, q) = Klein(c), PoincareBall(c), _pairs(c, max_fraction=0.9)
    k = kl.add(kl.from_poincare(p), kl.from_poincare(q))
    poincare_sum = ball.mobius_add(p, q)
    torch.testing.assert_close(k, kl.from_poincare(poincare_sum), rtol=0, atol=1e-10)
    assert (k - poincare_sum).norm(dim=-1).max() > 1e-2  # not the Poincare coordinates
    assert (math.sqrt(c) * k.norm(dim=-1) < 1).all()


@pytest.mark.parametrize("c", CS)
def test_weighted_einstein_midpoint_lies_on_the_geodesic(c):
    kl, (p, q) = Klein(c), _pairs(c, n=16, max_fraction=0.9)
    k = torch.stack([kl.from_poincare(p), kl.from_poincare(q)], dim=-2)
    w = torch.tensor([0.2, 0.8], dtype=F64)
    m = kl.einstein_midpoint(k, w)
    torch.testing.assert_close(
        kl.dist(k[:, 0], m) + kl.dist(m, k[:, 1]), kl.dist(k[:, 0], k[:, 1]), rtol=1e-9, atol=0
    )
    assert (kl.dist(m, k[:, 1]) < kl.dist(k[:, 0], m)).all()  # heavier weight pulls the midpoint


def test_einstein_midpoint_of_many_points_is_permutation_invariant_and_inside():
    kl, (p, _) = Klein(1.3), _pairs(1.3, n=6, max_fraction=0.99)
    k = kl.from_poincare(p)
    w = torch.rand(6, dtype=F64, generator=torch.Generator().manual_seed(8))
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(9))
    m = kl.einstein_midpoint(k, w)
    torch.testing.assert_close(kl.einstein_midpoint(k[perm], w[perm]), m, rtol=0, atol=1e-12)
    assert math.sqrt(1.3) * m.norm() < 1
    with pytest.raises(ValueError, match="non-negative"):
        kl.einstein_midpoint(k, -w)


# ---------------------------------------------------------------- float32 at the extremes


def test_fp32_extreme_inputs_stay_finite_and_inside_the_ball():
    c = 1.7
    ball, radius = PoincareBall(c), 1 / math.sqrt(c)
    g = torch.Generator().manual_seed(10)
    v = torch.randn(8, 6, generator=g)
    v = (50 * v / v.norm(dim=-1, keepdim=True)).requires_grad_()
    edge = torch.randn(8, 6, generator=g)
    edge = ((1 - 1e-7) * radius * edge / edge.norm(dim=-1, keepdim=True)).requires_grad_()
    inner = ball.random(8, 6, generator=g).requires_grad_()
    m = torch.randn(4, 6, generator=g)
    points = {
        "expmap0": ball.expmap0(v),
        "expmap": ball.expmap(inner, v),
        "expmap_edge": ball.expmap(edge, v),
        "mobius_add": ball.mobius_add(edge, inner),
        "mobius_scalar": ball.mobius_scalar(3.0, edge),
        "mobius_matvec": ball.mobius_matvec(m, edge),
        "geodesic": ball.geodesic(edge, inner, 0.3),
    }
    for name, out in points.items():
        assert torch.isfinite(out).all(), name
        assert (out.norm(dim=-1) < radius).all(), name
    others = {
        "dist": ball.dist(edge, inner),
        "dist_edge": ball.dist(edge, -edge),
        "logmap0": ball.logmap0(edge),
        "logmap": ball.logmap(inner, edge),
        "klein_round_trip": Klein(c).to_poincare(Klein(c).from_poincare(edge)),
    }
    for name, out in others.items():  # maps that take points: finite, no projection
        assert torch.isfinite(out).all(), name
    loss = sum(t.sum() for t in (*points.values(), *others.values()))
    grads = torch.autograd.grad(loss, (v, edge, inner))
    for name, grad in zip(("v", "edge", "inner"), grads, strict=True):
        assert torch.isfinite(grad).all(), name


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("model", [PoincareBall, Lorentz, Klein])
@pytest.mark.parametrize(
    "bad",
    [
        0.0,
        -1.0,
        float("nan"),
        float("inf"),
        torch.tensor(float("nan")),
        torch.tensor(-0.5),
        True,
        "1.0",
        torch.ones(2),
    ],
)
def test_invalid_curvature_raises(model, bad):
    with pytest.raises(ValueError, match="c"):
        model(bad)


def test_curvature_accepts_tensors_but_not_learnable_ones():
    assert PoincareBall(torch.tensor(0.5)).c == 0.5
    with pytest.raises(ValueError, match="requires grad"):
        PoincareBall(torch.tensor(0.5, requires_grad=True))
