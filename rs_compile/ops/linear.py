"""``rs::linear``: y = x @ decode(codes, groups, row_scale).T + bias, as a torch.library custom op.

A Euclidean matmul whose weight is stored in the codec's format (rs_compile.codec.format). On CPU
it runs the hand-written kernel (rs_compile.lowering.cpu_kernel: a fused GEMV for few rows, decoded
tiles + BLAS for many; :func:`reference_linear`, decode the whole weight then F.linear, where the
kernel is unavailable or does not apply). Inductor lowers it to the same kernel for few rows or to
decode-then-GEMM (rs_compile.lowering.linear), CUDA to a Triton kernel (rs_compile.kernels). With ``act_bits=8`` x is first rounded to int8 per group
(rs_compile.codec.activations), which lets CPU kernels multiply in integers (W4A8).
The weight is frozen: autograd flows to ``x`` (straight through the activation rounding) and to
``bias``, never to the codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rs_compile.codec.activations import ACT_BITS, quantize_activations
from rs_compile.codec.format import Format, decode_weight


def check_packed(codes, groups, row_scale, bits, group_size, in_features) -> None:
    """ValueError/TypeError unless the packed tensors are exactly what the format stores for a
    weight with ``in_features`` inputs (checked before any kernel reads them)."""
    fmt = Format(bits, group_size)
    expected = fmt.packed_specs(codes.shape[0] if codes.dim() else 0, in_features)
    for name, t in zip(("codes", "groups", "row_scale"), (codes, groups, row_scale)):
        shape, dtype = expected[name]
        if t.dtype != dtype:
            raise TypeError(f"rs::linear: {name} must be {dtype}, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"rs::linear: {name} has shape {tuple(t.shape)}, but {bits}-bit codes in groups of "
                f"{group_size} for in_features={in_features} are stored as {shape}"
            )


def check_inputs(x, codes, groups, row_scale, bias, bits, group_size, in_features, act_bits=0) -> None:
    """Validate shapes and dtypes before any kernel runs (clear errors, never a crash inside one)."""
    if act_bits not in ACT_BITS:
        raise ValueError(f"rs::linear: act_bits={act_bits!r} is not supported; valid values are "
                         f"{ACT_BITS} (0 keeps float activations)")
    if not x.is_floating_point():
        raise TypeError(f"rs::linear: x must be floating point, got {x.dtype}")
    if x.shape[-1] != in_features:
        raise ValueError(f"rs::linear: x has {x.shape[-1]} features but the layer expects {in_features}")
    check_packed(codes, groups, row_scale, bits, group_size, in_features)
    if bias is not None and tuple(bias.shape) != (codes.shape[0],):
        raise ValueError(f"rs::linear: bias shape {tuple(bias.shape)} != ({codes.shape[0]},)")


@torch.library.custom_op("rs::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    groups: torch.Tensor,
    row_scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    act_bits: int = 0,
) -> torch.Tensor:
    check_inputs(x, codes, groups, row_scale, bias, bits, group_size, in_features, act_bits)
    if x.device.type == "cpu":  # the hand-written kernel, or the reference if it is unavailable
        from rs_compile.lowering.cpu_kernel import linear_cpu

        return linear_cpu(x, codes, groups, row_scale, bias, bits, group_size, in_features, act_bits)
    return reference_linear(x, codes, groups, row_scale, bias, bits, group_size, in_features, act_bits)


def reference_linear(x, codes, groups, row_scale, bias, bits, group_size, in_features, act_bits=0):
    """The pure reference of rs::linear: decode the whole weight, then F.linear (in x's dtype)."""
    if act_bits:
        x = quantize_activations(x, group_size)
    w = decode_weight(codes, groups, row_scale, bits, group_size, in_features)
    b = None if bias is None else bias.to(x.dtype)
    return F.linear(x, w.to(x.dtype), b).contiguous()


@linear.register_fake
def _(x, codes, groups, row_scale, bias, bits, group_size, in_features, act_bits=0):
    from rs_compile.lowering import install_lowerings  # imports this module

    install_lowerings()  # a graph holding the op is being traced: Inductor may compile it next
    check_inputs(x, codes, groups, row_scale, bias, bits, group_size, in_features, act_bits)
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def _setup_context(ctx, inputs, output):
    x, codes, groups, row_scale, bias, bits, group_size, in_features = inputs[:8]
    ctx.save_for_backward(codes, groups, row_scale)
    ctx.meta = (bits, group_size, in_features)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    codes, groups, row_scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = decode_weight(codes, groups, row_scale, *ctx.meta).to(grad.dtype)
        grad_x = (grad @ w).to(ctx.x_dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:  # a trainable bias (e.g. BitFit)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, grad_bias, None, None, None, None


linear.register_autograd(_backward, setup_context=_setup_context)
