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
from rs_compile.codec.format import decode_weight, packed_specs


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
    n = codes.shape[0]
    specs = packed_specs(bits, group_size, n, in_features)
    packed = dict(zip(specs, (codes, scales, curv)))
    if any(t.dtype != specs[k][1] for k, t in packed.items()):
        raise TypeError("rs::poincare_linear: expected " + ", ".join(
            f"{k} {dtype}" for k, (_, dtype) in specs.items()) + "; got " + ", ".join(
            f"{k} {t.dtype}" for k, t in packed.items()))
    if any(tuple(t.shape) != specs[k][0] for k, t in packed.items()):
        raise ValueError(
            f"rs::poincare_linear: bits={bits}, group_size={group_size}, in_features={in_features} "
            "store " + ", ".join(f"{k} {list(shape)}" for k, (shape, _) in specs.items()) + "; got "
            + ", ".join(f"{k} {list(t.shape)}" for k, t in packed.items())
        )
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
    from rs_compile.lowering import install_lowerings  # imports this module

    install_lowerings()  # a graph holding the op is being traced: Inductor may compile it next
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
