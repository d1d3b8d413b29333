"""The rs_hyp custom ops: registration (opcheck), hand-derived backward (gradcheck and agreement
with autograd through the float64 PyTorch reference), zero-input gradients, torch.compile tracing.
"""

from __future__ import annotations

import pytest
import torch

from rs_compile.hyperbolic import PoincareBall, ops, reference

F64 = torch.float64


def _cases(c: float, seed: int = 0) -> dict[str, tuple]:
    """name -> (op, reference fn, args with c last). Covers broadcasting, batch dims and clamps."""
    g = torch.Generator().manual_seed(seed)
    ball = PoincareBall(c)
    pts = lambda *s: ball.random(*s, max_fraction=0.95, generator=g, dtype=F64)  # noqa: E731
    tangent = torch.randn(6, 4, generator=g, dtype=F64)
    tangent[0] *= 20 / tangent[0].norm()  # s|v| beyond the tanh clamp for c >= 0.6
    weight = torch.randn(5, 4, generator=g, dtype=F64) / 2
    return {
        "mobius_add": (ops.mobius_add, reference.mobius_add, (pts(6, 4), pts(6, 4), c)),
        "mobius_add_broadcast": (ops.mobius_add, reference.mobius_add, (pts(2, 3, 4), pts(4), c)),
        "dist": (ops.dist, reference.dist, (pts(6, 4), pts(6, 4), c)),
        "dist_broadcast": (ops.dist, reference.dist, (pts(2, 1, 4), pts(3, 4), c)),
        "expmap0": (ops.expmap0, reference.expmap0, (tangent, c)),
        "logmap0": (ops.logmap0, reference.logmap0, (pts(2, 3, 4), c)),
        "poincare_linear": (
            ops.poincare_linear,
            reference.poincare_linear,
            (pts(2, 3, 4), weight, pts(5), c),
        ),
        "poincare_linear_nobias": (
            ops.poincare_linear,
            reference.poincare_linear,
            (pts(6, 4), weight, None, c),
        ),
    }


CASE_NAMES = list(_cases(1.0))


def _requiring_grad(args: tuple) -> tuple:
    return tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)


def _tensor_args(args: tuple) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor)]


def _call_with(fn, args: tuple, tensors: tuple) -> torch.Tensor:
    """Call fn with the tensor arguments of ``args`` replaced, in order, by ``tensors``."""
    it = iter(tensors)
    return fn(*[next(it) if isinstance(a, torch.Tensor) else a for a in args])


@pytest.mark.parametrize("name", [n for n in CASE_NAMES if n not in ("mobius_add", "dist")])
def test_opcheck(name):
    """Schema, fake-tensor shapes and strides, autograd registration, AOT dispatch (dynamic)."""
    op, _, args = _cases(0.7)[name]
    torch.library.opcheck(op, _requiring_grad(args))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_gradcheck(name):
    op, _, args = _cases(1.3)[name]
    tensors = _tensor_args(_requiring_grad(args))
    assert torch.autograd.gradcheck(lambda *t: _call_with(op, args, t), tensors)


@pytest.mark.parametrize("c", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_backward_matches_autograd_through_reference(name, c):
    op, ref, args = _cases(c, seed=1)[name]
    a_op, a_ref = _requiring_grad(args), _requiring_grad(args)
    out_op, out_ref = op(*a_op), ref(*a_ref)
    torch.testing.assert_close(out_op, out_ref, rtol=0, atol=0)  # the op runs the reference
    upstream = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    g_op = torch.autograd.grad(out_op, _tensor_args(a_op), upstream)
    g_ref = torch.autograd.grad(out_ref, _tensor_args(a_ref), upstream)
    for got, want in zip(g_op, g_ref, strict=True):
        # Two float64 evaluations of the same derivative: only rounding differs.
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_zero_inputs_give_finite_gradients_equal_to_reference():
    """v = 0, x = y and x = 0 put every MIN_NORM clamp in play."""
    c, zeros = 0.8, torch.zeros(3, 4, dtype=F64)
    w = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = PoincareBall(c).random(3, 4, dtype=F64)
    for op, ref, args in [
        (ops.expmap0, reference.expmap0, (zeros, c)),
        (ops.logmap0, reference.logmap0, (zeros, c)),
        (ops.dist, reference.dist, (y, y, c)),
        (ops.mobius_add, reference.mobius_add, (zeros, zeros, c)),
        (ops.poincare_linear, reference.poincare_linear, (zeros, w, None, c)),
    ]:
        a_op, a_ref = _requiring_grad(args), _requiring_grad(args)
        g_op = torch.autograd.grad(op(*a_op).sum(), _tensor_args(a_op))
        g_ref = torch.autograd.grad(ref(*a_ref).sum(), _tensor_args(a_ref))
        for got, want in zip(g_op, g_ref, strict=True):
            assert torch.isfinite(got).all(), op
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def _all_ops(x, y, w, b):
    c = 0.9
    h = ops.poincare_linear(ops.mobius_add(x, y, c), w, b, c)
    return ops.dist(ops.expmap0(ops.logmap0(h, c), c), b, c).sum()


def test_compile_fullgraph_dynamic_forward_and_backward():
    """Fake kernels and autograd registrations let the ops trace with symbolic shapes."""
    ball = PoincareBall(0.9)
    compiled = torch.compile(_all_ops, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in (3, 5):
        args = (ball.random(batch, 4), ball.random(4), torch.randn(6, 4) / 2, ball.random(6))
        a_eager, a_comp = _requiring_grad(args), _requiring_grad(args)
        out_e, out_c = _all_ops(*a_eager), compiled(*a_comp)
        torch.testing.assert_close(out_c, out_e)
        grads_c, grads_e = torch.autograd.grad(out_c, a_comp), torch.autograd.grad(out_e, a_eager)
        for got, want in zip(grads_c, grads_e, strict=True):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bad_c", [0.0, -1.0, float("nan"), float("inf")])
def test_ops_reject_invalid_curvature(bad_c):
    x = torch.zeros(2, 3)
    for call in (
        lambda: ops.mobius_add(x, x, bad_c),
        lambda: ops.dist(x, x, bad_c),
        lambda: ops.expmap0(x, bad_c),
        lambda: ops.logmap0(x, bad_c),
        lambda: ops.poincare_linear(x, torch.zeros(4, 3), None, bad_c),
    ):
        with pytest.raises(ValueError, match="c="):
            call()


def test_ops_reject_bad_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="same ball"):
        ops.mobius_add(x, torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="mix dtypes"):
        ops.dist(x, x.double(), 1.0)
    with pytest.raises(ValueError, match="float32 and float64"):
        ops.expmap0(x.half(), 1.0)
    with pytest.raises(ValueError, match="weight must be"):
        ops.poincare_linear(x, torch.zeros(4, 5), None, 1.0)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.poincare_linear(x, torch.zeros(4, 3), torch.zeros(3), 1.0)
