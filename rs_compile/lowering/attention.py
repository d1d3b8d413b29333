"""Inductor lowering of ``rs::attention`` on CPU.

Left alone, Inductor would call the op's plain-math CPU kernel, which materialises the
``[B, H, T, S]`` score matrix. The decomposition registered here maps the op to ATen's fused CPU
flash-attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu``: blocked online
softmax, never more than a block of scores live). That kernel already does everything the op's
contract needs:

* GQA natively (k/v with fewer heads, head ``h`` reads kv head ``h // (H // Hkv)``): no repeat or
  expand of k/v;
* an additive float mask broadcastable to ``[B, H, T, S]`` (bool masks are converted here; the mask
  must be 2-D or 4-D, of q's dtype, or float32 for float16/bfloat16 q);
* fully masked rows give zeros; float16/bfloat16 accumulate in float32.

Its ``is_causal`` is top-left aligned, which equals the op's bottom-right rule only when
``T == S``; with ``T == 1`` the rule masks nothing; otherwise it is folded into the additive mask
(``[T, S]``, or the user mask's broadcast shape such as ``[B, 1, T, S]``). The kernel crashes
(SIGFPE) on ``T == 0`` or ``S == 0``, which the op rejects up front.

As the kernel covers every input the op accepts, there is no blocked formulation of our own, and
no math-form path for short sequences: measured single-threaded at GPT-2 sizes (H=12, D=64;
T=1 with S=1k..16k, T=S=64, 128), Inductor's fused math form was within noise of the flash kernel,
so one path is kept. Non-CPU tensors keep the op (on CUDA the Triton kernel runs).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

import rs_compile.ops.attention as attention_op
from rs_compile.lowering.registry import register


def _decompose(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float
) -> Tensor:
    if q.device.type != "cpu":
        return NotImplemented
    attention_op.check_inputs(q, k, v, mask)
    t, s = q.shape[2], k.shape[2]
    # Symbolic shapes take the special cases only when provable: no guard; the mask path is general.
    causal = causal and not statically_known_true(t == 1)
    flash_causal = causal and statically_known_true(t == s)
    bias = attention_op.additive_mask(
        mask, causal and not flash_causal, t, s, attention_op.compute_dtype(q.dtype), q.device
    )
    if bias is not None:
        bias = bias[(None,) * (4 - bias.dim())]  # the kernel takes 2-D or 4-D masks only
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(
        q, k, v, 0.0, flash_causal, attn_mask=bias, scale=scale
    )
    # The kernel lays the output out like q (e.g. [B, T, H, D] memory for HF's transposed q);
    # the op's contract is contiguous. No copy when q is contiguous.
    return out.contiguous()


def install() -> None:
    """Register the decomposition with Inductor (idempotent)."""
    register(torch.ops.rs.attention.default, _decompose)
