"""The hot Poincare-ball ops as ``torch.library`` custom ops under the ``rs_hyp`` namespace.

Each op has: the plain-PyTorch kernel from ``reference.py`` (all devices), a fake kernel returning
the same contiguous strides (Inductor asserts them), a hand-derived backward from ``grads.py``, and,
only when a Triton GPU driver is live, a Triton kernel for the CUDA key. ``c`` is a constant float
argument; the manifold classes validate it before calling, and the kernels re-check it because the
ops are public as ``torch.ops.rs_hyp.*``.
"""

from __future__ import annotations

import torch

from . import grads, reference
from .numerics import check_curvature, check_float_dtype

Tensor = torch.Tensor


def _check_rows(c: float, **tensors: Tensor | None) -> None:
    check_curvature(c)
    given = {k: t for k, t in tensors.items() if t is not None}
    for name, t in given.items():
        check_float_dtype(t, name)
        if t.dim() == 0:
            raise ValueError(
                f"{name} is a 0-d tensor; points and vectors need a last (feature) dim"
            )
    dtypes = {t.dtype for t in given.values()}
    if len(dtypes) > 1:
        raise ValueError(f"inputs mix dtypes {sorted(map(str, dtypes))}; cast them to one dtype")


def _pair_out(x: Tensor, y: Tensor, c: float) -> list[int]:
    """Validate a (point, point) call; return the broadcast output shape."""
    _check_rows(c, x=x, y=y)
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"x has {x.shape[-1]} features and y has {y.shape[-1]}; both must be points of the "
            "same ball (equal last dims)"
        )
    return list(torch.broadcast_shapes(x.shape, y.shape))


def _unary_out(v: Tensor, c: float) -> list[int]:
    _check_rows(c, v=v)
    return list(v.shape)


def _linear_out(x: Tensor, weight: Tensor, bias: Tensor | None, c: float) -> list[int]:
    _check_rows(c, x=x, weight=weight, bias=bias)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight must be [out_features, {x.shape[-1]}] to act on x of shape {tuple(x.shape)}; "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
    return [*x.shape[:-1], weight.shape[0]]


@torch.library.custom_op("rs_hyp::mobius_add", mutates_args=())
def mobius_add(x: Tensor, y: Tensor, c: float) -> Tensor:
    """Mobius addition x (+) y on the ball of curvature -c (broadcasting)."""
    _pair_out(x, y, c)
    return reference.mobius_add(x, y, c).contiguous()


@mobius_add.register_fake
def _(x: Tensor, y: Tensor, c: float) -> Tensor:
    return x.new_empty(_pair_out(x, y, c))


@torch.library.custom_op("rs_hyp::dist", mutates_args=())
def dist(x: Tensor, y: Tensor, c: float) -> Tensor:
    """Geodesic distance between ball points; reduces the last dim (broadcasting)."""
    _pair_out(x, y, c)
    return reference.dist(x, y, c).contiguous()


@dist.register_fake
def _(x: Tensor, y: Tensor, c: float) -> Tensor:
    return x.new_empty(_pair_out(x, y, c)[:-1])


@torch.library.custom_op("rs_hyp::expmap0", mutates_args=())
def expmap0(v: Tensor, c: float) -> Tensor:
    """Exponential map at the origin (tangent vector -> ball point)."""
    _unary_out(v, c)
    return reference.expmap0(v, c).contiguous()


@expmap0.register_fake
def _(v: Tensor, c: float) -> Tensor:
    return v.new_empty(_unary_out(v, c))


@torch.library.custom_op("rs_hyp::logmap0", mutates_args=())
def logmap0(y: Tensor, c: float) -> Tensor:
    """Logarithmic map at the origin (ball point -> tangent vector)."""
    _unary_out(y, c)
    return reference.logmap0(y, c).contiguous()


@logmap0.register_fake
def _(y: Tensor, c: float) -> Tensor:
    return y.new_empty(_unary_out(y, c))


@torch.library.custom_op("rs_hyp::poincare_linear", mutates_args=())
def poincare_linear(x: Tensor, weight: Tensor, bias: Tensor | None, c: float) -> Tensor:
    """(W (x) x) (+) bias: Mobius matvec then Mobius addition of a ball-point bias."""
    _linear_out(x, weight, bias, c)
    return reference.poincare_linear(x, weight, bias, c).contiguous()


@poincare_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, c: float) -> Tensor:
    return x.new_empty(_linear_out(x, weight, bias, c))


def _save_all(ctx, inputs, output) -> None:
    *tensors, c = inputs
    ctx.save_for_backward(*tensors)
    ctx.c = c


def _pair_backward(vjp):
    def backward(ctx, grad: Tensor):
        x, y = ctx.saved_tensors
        gx, gy = vjp(grad, x, y, ctx.c)
        return gx.sum_to_size(x.shape), gy.sum_to_size(y.shape), None

    return backward


def _unary_backward(vjp):
    def backward(ctx, grad: Tensor):
        (v,) = ctx.saved_tensors
        return vjp(grad, v, ctx.c), None

    return backward


def _poincare_linear_backward(ctx, grad: Tensor):
    x, weight, bias = ctx.saved_tensors
    return (*grads.poincare_linear(grad, x, weight, bias, ctx.c), None)


mobius_add.register_autograd(_pair_backward(grads.mobius_add), setup_context=_save_all)
dist.register_autograd(_pair_backward(grads.dist), setup_context=_save_all)
expmap0.register_autograd(_unary_backward(grads.expmap0), setup_context=_save_all)
logmap0.register_autograd(_unary_backward(grads.logmap0), setup_context=_save_all)
poincare_linear.register_autograd(_poincare_linear_backward, setup_context=_save_all)


def _checked(check, kernel):
    """A device kernel preceded by the op's argument checks (the default body is skipped)."""

    def impl(*args):
        check(*args)
        return kernel(*args)

    return impl


def _register_triton_for_cuda() -> None:
    """Use the Triton kernels on CUDA tensors, but only where Triton has a live GPU driver."""
    from rs_compile.kernels.registration import triton_driver_active

    if not triton_driver_active():
        return
    from . import triton_kernels as tk

    for op, check, kernel in (
        (mobius_add, _pair_out, tk.mobius_add),
        (dist, _pair_out, tk.dist),
        (expmap0, _unary_out, tk.expmap0),
        (logmap0, _unary_out, tk.logmap0),
        (poincare_linear, _linear_out, tk.poincare_linear),
    ):
        op.register_kernel("cuda")(_checked(check, kernel))


_register_triton_for_cuda()
