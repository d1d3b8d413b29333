"""Reference fake-quantizers the project's codec is compared with.

Each maps a weight ``[out, in]`` to its dequantized reconstruction (same shape, float32), quantizing
groups of ``group_size`` consecutive inputs of one output row; the tail group is zero-padded, which
leaves an absmax scale unchanged, and padded entries are dropped from the result. They give the
harness honest baselines at comparable storage (4 bits per weight plus one scale per group; HQQ
also keeps a zero-point per group), not speed.
"""

from __future__ import annotations

import torch

# bitsandbytes NF4 code (Dettmers et al., QLoRA 2023): quantiles of N(0, 1) normalised to [-1, 1],
# with an exact zero; copied from bitsandbytes' ``get_4bit_type("nf4")``.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def _to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out, ngroups, group_size]`` float32, zero-padding the last group."""
    if w.dim() != 2:
        raise ValueError(
            f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}; "
            "reshape conv kernels to [out, in] first"
        )
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    out_features, in_features = w.shape
    pad = -in_features % group_size
    padded = torch.nn.functional.pad(w.detach().float(), (0, pad))
    return padded.view(out_features, -1, group_size)


def _from_groups(groups: torch.Tensor, in_features: int) -> torch.Tensor:
    return groups.reshape(groups.shape[0], -1)[:, :in_features].contiguous()


def _absmax(groups: torch.Tensor) -> torch.Tensor:
    """Per-group absmax, with all-zero groups given scale 1 (their codes are all zero anyway)."""
    absmax = groups.abs().amax(-1, keepdim=True)
    return torch.where(absmax > 0, absmax, torch.ones_like(absmax))


def _search(w: torch.Tensor, levels: tuple[float, ...] | torch.Tensor, group_size: int,
            importance: torch.Tensor | None = None, lloyd_steps: int = 1):
    """rs_compile's per-group scale search on one level set: ``(signed steps [out, ngroups],
    bf16 row scale as float64 [out], level indices [out, Kp], levels float64 [L])``."""
    from rs_compile.codec.encode import SortedGroups, choose_steps, row_scales, table_scales

    groups = _to_groups(w, group_size)
    rows, ngroups, _ = groups.shape
    table = torch.as_tensor(levels, dtype=torch.float64).view(1, -1)
    imp = None
    if importance is not None:
        imp = torch.nn.functional.pad(importance.float(), (0, ngroups * group_size - w.shape[1]))
        imp = imp.expand(rows, -1).reshape(-1, group_size)
    sorted_groups = SortedGroups(groups.reshape(-1, group_size), imp)
    scales, _ = table_scales(sorted_groups, table, lloyd_steps)
    unit = row_scales(scales[0].view(rows, ngroups), SEARCH_MAX_STEP).double()
    k, _, pos = choose_steps(sorted_groups, table, scales, unit.repeat_interleave(ngroups),
                             SEARCH_MAX_STEP)
    step = (sorted_groups.sign * k).view(rows, ngroups)
    return step, unit, sorted_groups.codes(pos).view(rows, -1), table[0]


def _decode(step: torch.Tensor, unit: torch.Tensor, codes: torch.Tensor, table: torch.Tensor,
            in_features: int) -> torch.Tensor:
    rows, ngroups = step.shape
    units = table[codes.view(rows, ngroups, -1).long()]
    recon = unit.view(-1, 1, 1) * step.double().unsqueeze(-1) * units
    return _from_groups(recon.float(), in_features)


def searched_scales(w: torch.Tensor, levels: tuple[float, ...] | torch.Tensor,
                    group_size: int = 32) -> torch.Tensor:
    """Round each group to the nearest of ``levels`` times a scale chosen by the *same* per-group
    search and scale storage as rs_compile's encoder (rs_compile.codec.encode), so a baseline's
    level set is compared with ours on equal terms: the absmax scale (the group oriented so its
    largest magnitude is positive, i.e. a signed scale) and its least-squares refit, whichever errs
    less, then stored as an integer step ``|k| <= 127`` (one signed byte per group: a baseline has
    no table index to store) times one bf16 scale per row, the step chosen among the five around
    the continuous scale. Storage: the codes, 8 bits per group and 16 bits per row."""
    return _decode(*_search(w, levels, group_size), w.shape[1])


def gptq(w: torch.Tensor, hessian: torch.Tensor, levels: tuple[float, ...] | torch.Tensor,
         group_size: int = 32, damp: float = 0.1) -> torch.Tensor:
    """GPTQ on a plain level set (e.g. RTN's integers), through rs_compile's own calibrated
    pipeline (rs_compile.codec.calibrate) with only the levels changed: the input-energy weighted
    scale search of :func:`searched_scales`, act-order rounding with error feedback through the
    Cholesky factor of the damped inverse of ``hessian = X^T X``, then the per-row least-squares
    refit of the group steps. Storage as :func:`searched_scales`."""
    from rs_compile.codec.calibrate import (LLOYD_STEPS, damped, feedback_codes, inverse_factor,
                                            refit_steps)

    diagonal = hessian.diagonal()
    step, unit, codes, table = _search(w, levels, group_size, diagonal.float().clamp_min(0),
                                       LLOYD_STEPS)
    order = torch.argsort(diagonal, descending=True, stable=True)
    h = damped(hessian, damp)
    u = inverse_factor(h[order][:, order])
    weight = w.detach().float()
    codes = feedback_codes(weight, unit.unsqueeze(-1) * step.double(), torch.zeros_like(step, dtype=torch.long),
                           table.view(1, -1), order, u, codes, group_size)
    rows, ngroups = step.shape
    units = table[codes.view(rows, ngroups, group_size).long()]
    step = refit_steps(weight, units, step.to(torch.int32), unit, SEARCH_MAX_STEP, h)
    return _decode(step, unit, codes, table, w.shape[1])


SEARCH_MAX_STEP = 127  # largest scale step of :func:`searched_scales` (a signed byte per group)


def nf4(w: torch.Tensor, group_size: int = 64, scale_search: bool = False) -> torch.Tensor:
    """bitsandbytes NF4: scale by the group's absmax, round to the nearest of the 16 NF4 levels.
    ``scale_search=True``: the scale of :func:`searched_scales` instead of the absmax."""
    if scale_search:
        return searched_scales(w, NF4_LEVELS, group_size)
    groups = _to_groups(w, group_size)
    scale = _absmax(groups)
    levels = torch.tensor(NF4_LEVELS)
    index = torch.bucketize(groups / scale, (levels[1:] + levels[:-1]) / 2)
    return _from_groups(levels[index] * scale, w.shape[1])


def _symmetric_rtn(w: torch.Tensor, group_size: int, qmax: int, scale_search: bool = False) -> torch.Tensor:
    """Round-to-nearest on the ``2 qmax + 1`` integers ``-qmax..qmax`` with scale absmax / qmax
    (``scale_search``: the scale of :func:`searched_scales`)."""
    if scale_search:
        return searched_scales(w, tuple(range(-qmax, qmax + 1)), group_size)
    groups = _to_groups(w, group_size)
    scale = _absmax(groups) / qmax
    return _from_groups(torch.round(groups / scale).clamp(-qmax, qmax) * scale, w.shape[1])


def rtn_int4(w: torch.Tensor, group_size: int = 64, scale_search: bool = False) -> torch.Tensor:
    """Symmetric int4 round-to-nearest: 15 levels -7..7, scale absmax / 7 (-8 unused: 0 exact)."""
    return _symmetric_rtn(w, group_size, 7, scale_search)


def int8(w: torch.Tensor, group_size: int = 64, scale_search: bool = False) -> torch.Tensor:
    """Symmetric int8 round-to-nearest: 255 levels -127..127, scale absmax / 127."""
    return _symmetric_rtn(w, group_size, 127, scale_search)


def hqq(
    w: torch.Tensor,
    group_size: int = 64,
    bits: int = 4,
    iters: int = 10,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
) -> torch.Tensor:
    """HQQ-style calibration-free asymmetric quantization (Badri & Shaji 2023, half-quadratic).

    Codes ``q = round(w / s + z)`` in ``0..2^bits-1`` with min-max scale ``s``; the (unrounded)
    zero-point ``z`` is refined by alternating (1) a generalised soft-threshold of the residual,
    the proximal step of an ``|.|_p`` loss with ``p < 1`` that lets outliers keep large errors, and
    (2) the closed-form ``z`` for that residual. ``beta`` grows by ``kappa`` each iteration; each
    group keeps the zero-point with the lowest mean absolute error seen (on MiniLM the gain after
    10 iterations is under 0.1%). ``iters=0`` is plain min-max asymmetric rounding. Padded entries
    take no part in the scale, the zero-point or the error.
    """
    if not 0 < lp_norm < 1:
        raise ValueError(f"lp_norm must lie in (0, 1) for the HQQ shrinkage step, got {lp_norm}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8 (codes 0..2^bits-1), got {bits}")
    groups = _to_groups(w, group_size)
    valid = _to_groups(torch.ones_like(w, dtype=torch.float32), group_size)  # 0 marks padding
    count = valid.sum(-1, keepdim=True)
    qmax = 2**bits - 1
    lo = torch.where(valid > 0, groups, torch.inf).amin(-1, keepdim=True)
    hi = torch.where(valid > 0, groups, -torch.inf).amax(-1, keepdim=True)
    scale = torch.where(hi > lo, (hi - lo) / qmax, torch.ones_like(lo))
    scaled = groups / scale

    def codes(z: torch.Tensor) -> torch.Tensor:
        return torch.round(scaled + z).clamp_(0, qmax)

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        return (x * valid).sum(-1, keepdim=True) / count

    zero = -lo / scale
    q = codes(zero)
    best_zero, best_error = zero, masked_mean((scaled - q + zero).abs_())
    for _ in range(iters):
        residual = (scaled - q + zero) * scale  # w - dequantized
        magnitude = residual.abs()
        shrunk = residual.sign_().mul_(torch.relu_(magnitude - magnitude.pow(lp_norm - 1) / beta))
        zero = masked_mean(q - scaled + shrunk / scale)
        beta *= kappa
        q = codes(zero)
        error = masked_mean((scaled - q + zero).abs_())
        better = error < best_error
        best_zero = torch.where(better, zero, best_zero)
        best_error = torch.where(better, error, best_error)
    return _from_groups((codes(best_zero) - best_zero) * scale, w.shape[1])
