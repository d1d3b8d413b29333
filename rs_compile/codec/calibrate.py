"""Activation-aware encoding: minimise a layer's output error on calibration inputs.

For inputs ``X`` the output error of a reconstruction is ``||X (W - W_hat)^T||^2 =
tr((W - W_hat) H (W - W_hat)^T)`` with ``H = X^T X``. Two steps use ``H``:

* the per-group scale/curvature search weights each weight's squared error by ``diag(H)`` (the
  mean square of its input) - exact when inputs are uncorrelated;
* GPTQ (Frantar et al. 2022) accounts for the correlations: columns are rounded one at a time,
  largest ``diag(H)`` first ("act-order"), and each rounding error is spread over the columns not
  yet rounded through the Cholesky factor of ``H^-1``. The groups' scales and curvatures are
  fixed beforehand by the weighted search (act-order visits a group's columns at scattered times;
  choosing them when a group's first column comes measured no better on TinyStories-260K).
"""

from __future__ import annotations

import torch

from rs_compile.codec.encode import EncodedWeight, encode, level_table, nearest_codes
from rs_compile.codec.format import num_groups, pack_codes, unpack_codes

BLOCK = 128  # columns per lazy GPTQ update: rank-128 updates of the remaining columns


def damped_inverse_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (float64).

    Damping regularises ``H`` towards plain weight error: calibration sets of a few hundred
    tokens span few directions of a wide layer, and an undamped ``H`` would trade unseen
    directions for seen ones (see CompressionConfig.gptq_damp).
    """
    h = hessian.double().clone()
    mean_diag = float(h.diagonal().mean())
    if not mean_diag > 0:
        raise ValueError("the calibration inputs of this layer are all zero, so they cannot guide "
                         "its encoding; calibrate with data that reaches the layer")
    h.diagonal().add_(damp * mean_diag)
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def gptq_encode(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int = 64,
    curvatures: int = 4,
    curv_step: float = 1.0,
    damp: float = 0.1,
) -> EncodedWeight:
    """Encode ``weight[out, in]`` to minimise the output error for inputs with ``hessian = X^T X``."""
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [in_features, in_features] = [{k}, {k}], got "
                         f"{tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise ValueError("the calibration inputs of this layer contain NaN or Inf; check the "
                         "calibration items (and that the model runs them in float32)")
    start = encode(weight, bits, group_size, curvatures, curv_step,
                   importance=hessian.diagonal().float().clamp_min(0))
    ng = num_groups(k, group_size)
    table = level_table(bits, curvatures, float(curv_step))
    group_scale = start.scales.double()
    group_curv = start.curv.long()

    order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    u = damped_inverse_factor(hessian[order][:, order], damp)
    w = weight.detach().to("cpu", torch.float64)[:, order]
    codes = unpack_codes(start.codes, bits, group_size).reshape(n, ng * group_size)
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        for j in range(b1 - b0):
            col = int(order[b0 + j])
            g = col // group_size
            q = nearest_codes(wb[:, j], group_scale[:, g], group_curv[:, g], table)
            codes[:, col] = q
            err[:, j] = (wb[:, j] - group_scale[:, g] * table[group_curv[:, g], q]) / u[b0 + j, b0 + j]
            wb[:, j:] -= err[:, j : j + 1] * u[b0 + j, b0 + j : b1]
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return EncodedWeight(pack_codes(codes, bits, group_size), start.scales, start.curv, bits,
                         group_size, k, float(curv_step))
