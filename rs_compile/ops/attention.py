"""``rs::attention``: scaled dot-product attention as one opaque custom op.

The passes rewrite every attention form they find (eager matmul/softmax chains, SDPA) into this op,
so each backend (the Inductor CPU lowering, the Triton CUDA kernel) implements one fully specified
contract instead of pattern-matching many:

* ``q`` ``[B, H, T, D]``; ``k``, ``v`` ``[B, Hkv, S, D]`` with ``H % Hkv == 0``. Query head ``h``
  reads kv head ``h // (H // Hkv)`` (grouped-query attention, the order of SDPA's
  ``enable_gqa=True`` / ``repeat_interleave``); repeated k/v are never materialised.
* ``mask``: None, a bool mask (True = attend) or an additive float mask, broadcastable to
  ``[B, H, T, S]``. It gets no gradient.
* ``causal``: query ``i`` attends key ``j`` iff ``j <= i + (S - T)``, i.e. bottom-right aligned.
  For ``T == S`` this is SDPA's ``is_causal``; with a KV cache (``T < S``) the queries are the last
  ``T`` positions, so decoding with ``T == 1`` attends all ``S`` keys. With ``T > S`` the first
  ``T - S`` queries see no key.
* ``scale`` multiplies ``q @ k^T`` before the mask is added.
* A fully masked row (every key masked by ``mask`` and/or ``causal``) outputs zeros, as SDPA does
  (math backend and CPU flash kernel) rather than NaN. A finite mask value (``finfo.min``) is not
  masking: such a row averages its values.
* Output ``[B, H, T, D]``, contiguous, dtype of ``q``; float16/bfloat16 are computed in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def attention_supported(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> str | None:
    """None when ``rs::attention`` can run these inputs, else a short human reason.

    The rewrite pass records the reason as a near-miss and leaves the original attention alone.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v must be 4-D [B, H, T, D]; got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D"
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
    if k.device != q.device or v.device != q.device:
        return f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}"
    (b, h, t, d), (kb, hkv, s, kd) = q.shape, k.shape
    if d == 0:
        return "head_dim 0"
    if t == 0 or s == 0:
        return f"empty sequence (T={t}, S={s})"
    if v.shape != k.shape:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape"
    if kb != b or kd != d:
        return f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch or head_dim"
    if hkv == 0 or h % hkv != 0:
        return f"{h} query heads are not a multiple of {hkv} kv heads"
    if mask is not None:
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            name = str(mask.dtype).removeprefix("torch.")
            return f"mask dtype {name} is neither bool nor floating"
        if mask.device != q.device:
            return f"mask is on {mask.device}, q on {q.device}"
        target = (b, h, t, s)
        if mask.dim() > 4 or any(
            m != 1 and m != n for m, n in zip(reversed(mask.shape), reversed(target))
        ):
            return f"mask {tuple(mask.shape)} does not broadcast to [B, H, T, S] = {target}"
    return None


def check_inputs(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    """Raise ValueError naming the first input the op cannot run (every kernel calls this)."""
    reason = attention_supported(q, k, v, mask)
    if reason is not None:
        raise ValueError(
            f"rs::attention cannot run these inputs: {reason}. Expected q [B, H, T, D], "
            "k and v [B, Hkv, S, D] of q's floating dtype with H % Hkv == 0 and D, T, S > 0, "
            "mask None, bool (True = attend) or additive float, broadcastable to [B, H, T, S]."
        )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Float16/bfloat16 are computed in float32 (softmax over thousands of keys in half drifts)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def additive_mask(
    mask: Tensor | None, causal: bool, t: int, s: int, dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """``mask`` and the bottom-right causal mask folded into one additive ``dtype`` bias.

    The causal part is ``[T, S]`` (never ``[B, H, T, S]``) and is built from ``arange`` so that
    symbolic ``T``/``S`` stay symbolic when the lowering traces it.
    """
    neg_inf = float("-inf")
    if causal:
        rows = torch.arange(t, device=device).unsqueeze(1)
        allowed = torch.arange(s, device=device) <= rows + (s - t)
        if mask is None:
            mask = allowed
        elif mask.dtype == torch.bool:
            mask = mask & allowed
        else:
            mask = torch.where(allowed, mask, neg_inf)
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.where(mask, torch.zeros((), dtype=dtype, device=device), neg_inf)
    return mask.to(dtype)


def _grouped(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q as ``[B, Hkv, G * T, D]`` (the G query heads of a kv head stacked along T), k and v as is,
    all in the compute dtype: plain batched matmuls then do GQA without repeating k/v."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    dtype = compute_dtype(q.dtype)
    return q.to(dtype).reshape(b, hkv, h // hkv * t, d), k.to(dtype), v.to(dtype)


def _probs(
    q: Tensor, qg: Tensor, kc: Tensor, mask: Tensor | None, causal: bool, scale: float
) -> Tensor:
    """Attention probabilities ``[B, Hkv, G * T, S]``; fully masked rows are zeros."""
    (b, h, t, _), s = q.shape, kc.shape[2]
    scores = (qg @ kc.transpose(-1, -2)).mul(scale).reshape(b, h, t, s)
    bias = additive_mask(mask, causal, t, s, scores.dtype, scores.device)
    if bias is not None:
        scores = scores + bias
    return torch._safe_softmax(scores, -1).reshape(b, kc.shape[1], -1, s)


def reference(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float
) -> Tensor:
    """Plain-math attention: the op's kernel on every device without a faster one."""
    qg, kc, vc = _grouped(q, k, v)
    out = _probs(q, qg, kc, mask, causal, scale) @ vc
    return out.reshape(q.shape).to(q.dtype).contiguous()


@torch.library.custom_op("rs::attention", mutates_args=())
def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float
) -> Tensor:
    """See the module docstring for the contract."""
    check_inputs(q, k, v, mask)
    return reference(q, k, v, mask, causal, scale)


@attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float) -> Tensor:
    from rs_compile.lowering import install_lowerings  # imports this module

    install_lowerings()  # as for rs::linear: a graph holding the op is being traced
    check_inputs(q, k, v, mask)
    return q.new_empty(q.shape)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    q, k, v, mask, causal, scale = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, grad: Tensor) -> tuple:
    """dq, dk, dv from recomputed probabilities (nothing [T, S]-sized is saved by the forward).

    With P = softmax(scale * q k^T + mask) and O = P v:
    dv = P^T dO, dP = dO v^T, dS = P * (dP - rowsum(dP * P)), dq = scale * dS k, dk = scale * dS^T q;
    with the G query heads stacked along T, the products for dk and dv sum over them.
    """
    q, k, v, mask = ctx.saved_tensors
    qg, kc, vc = _grouped(q, k, v)
    p = _probs(q, qg, kc, mask, ctx.causal, ctx.scale)
    do = grad.to(qg.dtype).reshape(qg.shape)
    dp = do @ vc.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = (ds @ kc).mul(ctx.scale).reshape(q.shape)
    dk = (ds.transpose(-1, -2) @ qg).mul(ctx.scale)
    dv = p.transpose(-1, -2) @ do
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)
