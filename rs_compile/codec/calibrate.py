"""Activation-aware encoding: minimise a layer's output error on calibration inputs.

For inputs ``X`` the output error of a reconstruction is ``||X (W - W_hat)^T||^2 =
tr((W - W_hat) H (W - W_hat)^T)`` with ``H = X^T X``. Two steps use ``H``:

* the per-group scale/curvature search weights each weight's squared error by ``diag(H)`` (the
  mean square of its input) - exact when inputs are uncorrelated;
* GPTQ (Frantar et al. 2022) accounts for the correlations: columns are rounded one at a time,
  largest ``diag(H)`` first ("act-order"), and each rounding error is spread over the columns not
  yet rounded through the Cholesky factor of ``H^-1``. The groups' scales and curvatures are
  fixed beforehand by the weighted search (act-order visits a group's columns at scattered times;
  choosing them when a group's first column comes measured no better on TinyStories-260K);
* last, each row's group scales are refit by least squares on the output error for the codes
  GPTQ chose and rounded back to the row's scale steps (:func:`refit_steps`).
"""

from __future__ import annotations

import torch

from rs_compile.codec.encode import EncodedWeight, encode, level_values
from rs_compile.codec.format import Format, pack_codes, pack_groups, unpack_codes, unpack_groups

BLOCK = 128  # columns per lazy GPTQ update: rank-128 updates of the remaining columns
LLOYD_STEPS = 4  # scale refits per curvature in the group search (calibration-free uses 1, for speed)


def inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``h^-1`` for a damped ``h`` (see :func:`damped`), float64."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq_encode(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: Format = Format(),
    *,
    curvatures: int | None = None,
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
    start = encode(weight, fmt, curvatures=curvatures,
                   importance=hessian.diagonal().float().clamp_min(0), lloyd_steps=LLOYD_STEPS)
    ng, g = fmt.num_groups(k), fmt.group_size
    step, table_index = unpack_groups(start.groups, fmt.bits)
    unit = start.row_scale.double()
    levels = level_values(fmt)
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    h = damped(hessian, damp)
    u = inverse_factor(h[order][:, order])
    codes = feedback_codes(weight, unit.unsqueeze(-1) * step, table_index, levels, order, u,
                           unpack_codes(start.codes, fmt.bits, g).reshape(n, ng * g), g)
    units = levels[table_index.long().unsqueeze(-1), codes.view(n, ng, g).long()]  # [n, ng, G]
    # a second round (GPTQ again with the refit scales, then refit) measured worse on both models
    step = refit_steps(weight, units, step, unit, fmt.max_step, h)
    return EncodedWeight(pack_codes(codes, fmt.bits, g), pack_groups(step, table_index, fmt.bits),
                         start.row_scale, fmt, k)


def feedback_codes(
    weight: torch.Tensor, scales: torch.Tensor, curv: torch.Tensor, table: torch.Tensor,
    order: torch.Tensor, u: torch.Tensor, codes: torch.Tensor, group_size: int,
) -> torch.Tensor:
    """GPTQ's column-by-column rounding in ``order`` with error feedback through ``u`` (the upper
    Cholesky factor of the permuted damped inverse), for fixed group scales and curvatures.
    Returns a new ``codes[n, Kp]``; padded columns keep the entries of ``codes``."""
    k = weight.shape[1]
    # per group: level midpoints in the oriented unit (rows ascending) and the scaled levels
    curv = curv.long().T.contiguous()  # [ng, n]
    scale = scales.T.contiguous()
    mids = ((table[:, 1:] + table[:, :-1]) * 0.5)[curv]  # [ng, n, L-1]
    levels = scale.unsqueeze(-1) * table[curv]  # [ng, n, L]
    inv_scale = 1.0 / torch.where(scale == 0, 1.0, scale)  # scale 0: every level is 0 anyway
    w = weight.detach().to("cpu", torch.float64)[:, order]
    codes = codes.clone()
    columns = order.tolist()
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        wb = w[:, b0:b1].clone()
        err = torch.empty_like(wb)
        for j in range(b1 - b0):
            col = columns[b0 + j]
            g = col // group_size
            q = torch.searchsorted(mids[g], (wb[:, j] * inv_scale[g]).unsqueeze(-1))
            codes[:, col] = q.squeeze(-1)
            err[:, j] = (wb[:, j] - levels[g].gather(-1, q).squeeze(-1)) / u[b0 + j, b0 + j]
            wb[:, j:].addr_(err[:, j], u[b0 + j, b0 + j : b1], alpha=-1)
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return codes


def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) * I`` in float64 (the matrix GPTQ's factor is taken of).

    Damping regularises ``H`` towards plain weight error: calibration sets of a few hundred
    tokens span few directions of a wide layer, and an undamped ``H`` would trade unseen
    directions for seen ones (see EncodingConfig.gptq_damp).
    """
    h = hessian.double().clone()
    mean_diag = float(h.diagonal().mean())
    if not mean_diag > 0:
        raise ValueError("the calibration inputs of this layer are all zero, so they cannot guide "
                         "its encoding; calibrate with data that reaches the layer")
    h.diagonal().add_(damp * mean_diag)
    return h


def refit_steps(
    weight: torch.Tensor, units: torch.Tensor, step: torch.Tensor, unit: torch.Tensor,
    max_step: int, hessian: torch.Tensor,
) -> torch.Tensor:
    """Per row, the group scale steps minimising ``(w - w_hat) H (w - w_hat)^T`` for fixed codes.

    ``w_hat = sum_g s_g l_g`` with ``l_g`` the levels of group g (``units[n, ng, G]``) and
    ``s_g = unit[n] * step[n, g]``; the continuous optimum solves the ``ng x ng`` system
    ``A s = b``, ``A_gh = l_g^T H_gh l_h``, ``b_g = l_g^T H w``, and is rounded to the row's steps.
    GPTQ chose the codes for scales fitted before the error feedback moved the weights; the refit
    lowered TinyStories-260K's calibrated KL by 2% (1.445 -> 1.416). Rows whose rounded refit
    does not lower their error keep their steps.
    """
    n, ng, g = units.shape
    k = weight.shape[1]
    kp = ng * g
    h = torch.nn.functional.pad(hessian, (0, kp - k, 0, kp - k))  # padded inputs: zero levels, zero H
    w = torch.nn.functional.pad(weight.detach().to("cpu", torch.float64), (0, kp - k))
    hw = (w @ h).view(n, ng, g)
    b = (units * hw).sum(-1)  # [n, ng]
    a = torch.empty(n, ng, ng, dtype=torch.float64)
    for j in range(ng):  # rows of H for group j times its levels: [n, kp]
        p = units[:, j] @ h[j * g : (j + 1) * g]
        a[:, j] = (p.view(n, ng, g) * units).sum(-1)
    # a group of zero levels has a zero row and column: a tiny ridge keeps A invertible (its s -> 0)
    ridge = 1e-12 * a.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-30)
    a.diagonal(dim1=-2, dim2=-1).add_(ridge.unsqueeze(-1))
    refit = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)
    refit = torch.round(refit / unit.unsqueeze(-1)).clamp(-max_step, max_step)
    refit = torch.where(torch.isfinite(refit), refit, step.double())

    def row_error(s: torch.Tensor) -> torch.Tensor:
        r = w - (unit[:, None, None] * s.double().unsqueeze(-1) * units).view(n, kp)
        return ((r @ h) * r).sum(-1)

    better = row_error(refit) < row_error(step)
    return torch.where(better.unsqueeze(-1), refit.to(torch.int32), step)
