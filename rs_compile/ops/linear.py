"""``rs::poincare_linear``: y = x @ decode(codes).T + bias, as a torch.library custom op.

The CPU reference decodes the whole weight then calls F.linear; Inductor replaces it with a fused
kernel (rs_compile.lowering.linear) and CUDA with a Triton kernel (rs_compile.kernels).
With ``act_bits=8`` x is first rounded to int8 per group (rs_compile.codec.activations), which
lets the CPU decode path multiply in integers (W4A8).
The weight is frozen: autograd flows to ``x`` only (straight through the activation rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rs_compile.codec.activations import ACT_BITS, quantize_activations
from rs_compile.codec.format import decode_weight, group_bytes


def check_inputs(x, codes, scales, curv, bias, bits, group_size, in_features, act_bits=0) -> None:
    """Validate shapes and dtypes before any kernel runs (clear errors, never a crash inside one)."""
    if act_bits not in ACT_BITS:
        raise ValueError(f"rs::poincare_linear: act_bits={act_bits!r} is not supported; valid "
                         f"values are {ACT_BITS} (0 keeps float activations)")
    if not x.is_floating_point():
        raise TypeError(f"rs::poincare_linear: x must be floating point, got {x.dtype}")
    if x.shape[-1] != in_features:
        raise ValueError(
            f"rs::poincare_linear: x has {x.shape[-1]} features but the layer expects {in_features}"
        )
    if codes.dtype != torch.uint8 or curv.dtype != torch.uint8 or scales.dtype != torch.float16:
        raise TypeError(
            "rs::poincare_linear: expected codes uint8, scales float16, curv uint8; got "
            f"{codes.dtype}, {scales.dtype}, {curv.dtype}"
        )
    n, ng = scales.shape
    if tuple(codes.shape) != (n, ng * group_bytes(bits, group_size)) or tuple(curv.shape) != (n, ng):
        raise ValueError(
            f"rs::poincare_linear: inconsistent packed shapes codes={tuple(codes.shape)} "
            f"scales={tuple(scales.shape)} curv={tuple(curv.shape)} for bits={bits}, "
            f"group_size={group_size}"
        )
    if ng * group_size < in_features:
        raise ValueError(f"rs::poincare_linear: {ng} groups of {group_size} cannot hold {in_features}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"rs::poincare_linear: bias shape {tuple(bias.shape)} != ({n},)")


@torch.library.custom_op("rs::poincare_linear", mutates_args=())
def poincare_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    curv: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    curv_step: float,
    act_bits: int = 0,
) -> torch.Tensor:
    check_inputs(x, codes, scales, curv, bias, bits, group_size, in_features, act_bits)
    if act_bits:
        x = quantize_activations(x, group_size)
    w = decode_weight(codes, scales, curv, bits, group_size, in_features, curv_step)
    b = None if bias is None else bias.to(x.dtype)
    return F.linear(x, w.to(x.dtype), b).contiguous()


@poincare_linear.register_fake
def _(x, codes, scales, curv, bias, bits, group_size, in_features, curv_step, act_bits=0):
    check_inputs(x, codes, scales, curv, bias, bits, group_size, in_features, act_bits)
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def _setup_context(ctx, inputs, output):
    x, codes, scales, curv, _bias, bits, group_size, in_features, curv_step = inputs[:9]
    ctx.save_for_backward(codes, scales, curv)
    ctx.meta = (bits, group_size, in_features, curv_step)
    ctx.x_dtype = x.dtype


def _backward(ctx, grad):
    codes, scales, curv = ctx.saved_tensors
    w = decode_weight(codes, scales, curv, *ctx.meta).to(grad.dtype)
    grad_x = (grad @ w).to(ctx.x_dtype)
    return grad_x, None, None, None, None, None, None, None, None, None


poincare_linear.register_autograd(_backward, setup_context=_setup_context)
