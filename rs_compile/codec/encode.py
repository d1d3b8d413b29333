"""Offline encoder: dense weight -> codes, group bytes and row scales (rs_compile.codec.format).

Per group the encoder picks a level table (curvature) and a scale that minimise the group's
(optionally importance-weighted) squared error, in two stages:

1. continuous scales: for every table, the scale that just covers the group (absmax rounding,
   the extra level of the asymmetric grid on the absmax side) and its least-squares refits for
   that assignment (Lloyd steps), keeping the best;
2. the stored scale is ``row_scale * k`` with an integer step ``|k| <= max_step`` and one bf16
   ``row_scale`` per row (the row's largest group scale over ``max_step``): for every table the
   steps around its continuous scale are tried and the (step, table) of least error is kept.

Each group is sorted once; prefix sums of the sorted values then give, for any candidate scale,
the level counts and sums with one ``searchsorted`` of the level midpoints, so a candidate costs a
few operations on ``[groups, levels]`` instead of a pass over every weight (a full nearest-level
pass measured ~10x dearer on this CPU).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

from rs_compile.codec.format import Format, decode_weight, pack_codes, pack_groups

CHUNK_ELEMENTS = 1 << 18  # weights per chunk: ~10 MB of temporaries per worker thread
STEP_SPREAD = 2  # steps tried on each side of a table's continuous scale
T = TypeVar("T")


@dataclasses.dataclass
class EncodedWeight:
    """The stored form of one [out, in] weight (see rs_compile.codec.format for the layout)."""

    codes: torch.Tensor
    groups: torch.Tensor
    row_scale: torch.Tensor
    format: Format
    in_features: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def group_size(self) -> int:
        return self.format.group_size

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.codes, self.groups, self.row_scale

    def meta(self) -> dict:
        return dict(bits=self.bits, group_size=self.group_size, in_features=self.in_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / (self.out_features * self.in_features)

    def dequantize(self) -> torch.Tensor:
        return decode_weight(*self.tensors(), **self.meta())


def level_values(fmt: Format, curvatures: int | None = None) -> torch.Tensor:
    """The first ``curvatures`` level tables of ``fmt`` as float64 ``[tables, 2**bits]``."""
    return fmt.levels()[: curvatures or fmt.tables].double()


class SortedGroups:
    """Groups ``w[M, G]``, each oriented so its largest magnitude is positive, then sorted once.

    Orientation: the grid has its extra level on the positive side, and a group whose absmax is
    negative is encoded negated with a negative scale, so the extra level always lands on the
    absmax side (trying both sides measured 0.2% lower error for twice the work).
    Prefix sums of ``d * w`` and ``d`` (``d`` the importance, 1 by default) over the sorted values
    give every candidate scale's statistics with one ``searchsorted`` (see :meth:`stats`).
    """

    def __init__(self, w: torch.Tensor, importance: torch.Tensor | None = None):
        m, g = w.shape
        lo, hi = w.aminmax(dim=-1)
        self.sign = torch.where(-lo > hi, -1.0, 1.0)
        oriented = w * self.sign.unsqueeze(-1)
        # numpy's SIMD argsort of short rows measured 3.5x faster than torch.sort here
        self.order = torch.from_numpy(np.argsort(oriented.numpy(), axis=-1))
        self.sorted = oriented.gather(-1, self.order)
        wd = self.sorted.double()
        self.prefix_dw = wd.new_zeros(m, g + 1)
        if importance is None:
            torch.cumsum(wd, -1, out=self.prefix_dw[:, 1:])
            self.prefix_d = torch.arange(g + 1, dtype=torch.float64).expand(m, g + 1)
            self.energy = torch.einsum("mg,mg->m", wd, wd)
        else:
            d = importance.gather(-1, self.order).double()
            torch.cumsum(wd * d, -1, out=self.prefix_dw[:, 1:])
            self.prefix_d = wd.new_zeros(m, g + 1)
            torch.cumsum(d, -1, out=self.prefix_d[:, 1:])
            self.energy = torch.einsum("mg,mg->m", wd * d, wd)

    def stats(self, scale: torch.Tensor, levels: torch.Tensor):
        """Nearest-level rounding of every group at ``scale[M]`` (or ``[M, C]``: C candidates per
        group) on ``levels[M or 1, L]``.

        Returns ``num = sum d w l``, ``den = sum d l^2`` (``l`` the assigned levels; ``[M]`` or
        ``[M, C]``) and the sorted positions of the level boundaries; the error is
        ``sum d w^2 - 2 s num + s^2 den``.
        """
        many = scale.dim() == 2
        s = scale if many else scale.unsqueeze(-1)  # [M, C]
        mids = (levels[:, 1:] + levels[:, :-1]) * 0.5  # [M or 1, L-1]
        bounds = (s.unsqueeze(-1) * mids.unsqueeze(1)).float()  # [M, C, L-1]
        m, c, _ = bounds.shape
        pos = torch.searchsorted(self.sorted, bounds.view(m, -1)).view(m, c, -1)
        top, step, step2 = levels[:, -1:], levels.diff(dim=-1).unsqueeze(1), (levels * levels).diff(dim=-1).unsqueeze(1)
        gathered_dw = self.prefix_dw.gather(-1, pos.view(m, -1)).view(m, c, -1)
        gathered_d = self.prefix_d.gather(-1, pos.view(m, -1)).view(m, c, -1)
        num = top * self.prefix_dw[:, -1:] - (gathered_dw * step).sum(-1)
        den = top * top * self.prefix_d[:, -1:] - (gathered_d * step2).sum(-1)
        if many:
            return num, den, pos
        return num.squeeze(-1), den.squeeze(-1), pos.squeeze(1)

    def codes(self, pos: torch.Tensor) -> torch.Tensor:
        """Level index of every weight, in the original order, from positions of :meth:`stats`."""
        m, g = self.sorted.shape
        marks = torch.zeros(m, g + 1, dtype=torch.int32).scatter_add_(
            -1, pos, torch.ones_like(pos, dtype=torch.int32))
        rank = marks.cumsum(-1, dtype=torch.int32)[:, :g]
        return torch.empty_like(rank).scatter_(-1, self.order, rank)


def table_scales(
    groups: SortedGroups, levels: torch.Tensor, lloyd_steps: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: per table, the best continuous scale (>= 0) of every oriented group and its error
    (both ``[tables, M]``), among the absmax scale and ``lloyd_steps`` assignment/refit rounds
    (more: slower, slightly better)."""
    hi, lo = groups.sorted[:, -1].double(), groups.sorted[:, 0].double()
    best, errors = [], []
    for table in levels:
        s = torch.maximum(hi / table[-1], lo / table[0])
        best_s, best_err = s, torch.full_like(s, math.inf)
        for _ in range(max(1, lloyd_steps)):
            num, den, _ = groups.stats(s, table.unsqueeze(0))
            refit = torch.where(den > 0, num / den.clamp_min(1e-300), s)
            for cand in (s, refit):  # errors with the assignment at s: exact for s, a bound for refit
                err = groups.energy - cand * (2 * num - cand * den)
                better = err < best_err
                best_s, best_err = torch.where(better, cand, best_s), torch.where(better, err, best_err)
            s = refit
        best.append(best_s)
        errors.append(best_err)
    return torch.stack(best), torch.stack(errors)


def row_scales(scales: torch.Tensor, max_step: int) -> torch.Tensor:
    """bf16 scale of one step per row, from continuous group scales ``[rows, ngroups]``: the row's
    largest over ``max_step`` (1 for an all-zero row, whose steps are all 0)."""
    top = scales.amax(-1)
    return torch.where(top > 0, top / max_step, torch.ones_like(top)).to(torch.bfloat16)


def choose_steps(
    groups: SortedGroups, levels: torch.Tensor, scales: torch.Tensor, unit: torch.Tensor,
    max_step: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 2: per group the (step k in 0..max_step, table) of least error with scale ``k * unit``
    (``unit[M]``: the group's row scale), trying the steps around every table's continuous scale
    (``scales[tables, M]``; trying only the tables of least continuous error measured up to 1%
    more error at 4 bits). Returns ``(k, table, positions of the level boundaries)``."""
    best_err = groups.energy.clone()  # k = 0: every weight decodes to 0
    best_k = torch.zeros_like(best_err)
    best_t = torch.zeros_like(best_err, dtype=torch.long)
    offsets = torch.arange(-STEP_SPREAD, STEP_SPREAD + 1, dtype=torch.float64)
    for t, table in enumerate(levels):
        k = (torch.round(scales[t] / unit).unsqueeze(-1) + offsets).clamp(1, max_step)  # [M, C]
        s = k * unit.unsqueeze(-1)
        num, den, _ = groups.stats(s, table.unsqueeze(0))
        err, pick = (groups.energy.unsqueeze(-1) - s * (2 * num - s * den)).min(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_k = torch.where(better, k.gather(-1, pick.unsqueeze(-1)).squeeze(-1), best_k)
        best_t = torch.where(better, t, best_t)
    _, _, pos = groups.stats(best_k * unit, levels[best_t])
    return best_k, best_t, pos


def encode_rows(
    w: torch.Tensor, fmt: Format, levels: torch.Tensor, importance: torch.Tensor | None = None,
    lloyd_steps: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (int32 ``[rows, Kp]``), group bytes and bf16 row scales of whole rows ``w[rows, Kp]``.

    ``importance`` (``[rows, Kp]`` or None) weights each weight's squared error."""
    rows, kp = w.shape
    ng = kp // fmt.group_size
    flat = w.reshape(-1, fmt.group_size)
    groups = SortedGroups(flat, None if importance is None else importance.reshape(-1, fmt.group_size))
    scales, errors = table_scales(groups, levels, lloyd_steps)  # [tables, rows * ng]
    best = scales.gather(0, errors.argmin(0, keepdim=True)).squeeze(0)
    row_scale = row_scales(best.view(rows, ng), fmt.max_step)
    unit = row_scale.double().repeat_interleave(ng)
    k, table, pos = choose_steps(groups, levels, scales, unit, fmt.max_step)
    step = (groups.sign * k).to(torch.int32)
    return (groups.codes(pos).view(rows, kp), pack_groups(step, table, fmt.bits).view(rows, ng),
            row_scale)


def check_weight(weight: torch.Tensor) -> None:
    """ValueError for a tensor that is not a 2-D float weight (values: :func:`check_range`)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"encode expects a 2-D floating-point weight [out, in], got {tuple(weight.shape)} "
            f"{weight.dtype}"
        )


def check_range(weight: torch.Tensor) -> None:
    """ValueError for NaN / Inf values (any finite float32 magnitude fits the bf16 row scale). One
    ``aminmax`` pass (NaN propagates): pass a contiguous tensor, a transposed view reduces ~20x
    slower on this CPU."""
    lo, hi = weight.aminmax() if weight.numel() else (torch.zeros(()), torch.zeros(()))
    amax = max(-float(lo), float(hi))
    if not math.isfinite(amax):
        raise ValueError("weight contains NaN or Inf values; fix or drop them before compressing")


def map_chunks(fn: Callable[[int], T], starts: Iterable[int]) -> list[T]:
    """``[fn(s) for s in starts]`` on a pool of ``torch.get_num_threads()`` single-threaded workers.

    The encoder's operations are small (``[groups, levels]``); splitting each across threads
    costs more in synchronisation than it saves, and on a shared CPU a descheduled thread
    stalls every operation (measured 7x slower with 2 intra-op threads under load). Whole
    chunks per thread keep both cores busy instead. Results keep the order of ``starts``.
    """
    workers = torch.get_num_threads()
    if workers == 1:
        return [fn(s) for s in starts]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(fn, starts))
    finally:
        torch.set_num_threads(workers)


def encode(
    weight: torch.Tensor,
    fmt: Format = Format(),
    *,
    curvatures: int | None = None,
    importance: torch.Tensor | None = None,
    lloyd_steps: int = 1,
) -> EncodedWeight:
    """Encode a 2-D float weight ``[out, in]`` (nn.Linear layout) in ``fmt``.

    ``curvatures``: how many of the format's level tables groups may choose from (default and at
    most all the format has; 1 is the fixed-grid ablation). ``importance`` (``[in]``, >= 0, optional) weights each input's
    squared error, e.g. the calibration inputs' mean square per feature; without it every weight
    counts equally.
    """
    check_weight(weight)
    if not isinstance(fmt, Format):
        raise TypeError(f"encode takes a Format, got {fmt!r}; e.g. encode(w, Format(bits=4, group_size=32))")
    if curvatures is not None and curvatures < 1:
        raise ValueError(f"curvatures={curvatures!r} is invalid; at least one level table is needed")
    n, k = weight.shape
    ng = fmt.num_groups(k)
    kp = ng * fmt.group_size
    w = weight.detach().to("cpu", torch.float32)
    if kp != k:  # F.pad copies even when there is nothing to pad: a dense copy of a large table
        w = torch.nn.functional.pad(w, (0, kp - k))
    w = w.contiguous()
    check_range(w)
    d = None
    if importance is not None:
        if importance.shape != (k,) or not torch.isfinite(importance).all() or (importance < 0).any():
            raise ValueError(f"importance must be a finite, non-negative [in_features={k}] tensor, got "
                             f"shape {tuple(importance.shape)}")
        d = torch.nn.functional.pad(importance.detach().to("cpu", torch.float32), (0, kp - k))
    levels = level_values(fmt, curvatures)
    workers = torch.get_num_threads()  # chunks: a multiple of the workers, so none idles at the end
    chunks = workers * max(1, -(-n * kp // (CHUNK_ELEMENTS * workers)))
    rows = max(1, -(-n // chunks))

    def encode_chunk(r0: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chunk = w[r0 : r0 + rows]
        imp = None if d is None else d.expand(chunk.shape[0], kp)
        q, groups, row_scale = encode_rows(chunk, fmt, levels, imp, lloyd_steps)
        return pack_codes(q, fmt.bits, fmt.group_size), groups, row_scale

    codes, groups, row_scale = zip(*map_chunks(encode_chunk, range(0, n, rows)))
    return EncodedWeight(torch.cat(codes), torch.cat(groups), torch.cat(row_scale), fmt, k)


_cache = WeakIdKeyDictionary()


def encode_parameter(param: torch.Tensor, stored_in_out: bool, fmt: Format,
                     curvatures: int | None = None) -> EncodedWeight:
    """Encode a module parameter, reusing the result across recompiles of the same weights.

    Dynamo recompiles (a new sequence length, a graph break) hand the backend the same
    parameters again; the cache is keyed on the tensor object, a checksum of its contents and
    the codec settings, so an updated weight is always re-encoded, even one edited through
    ``param.data`` (which bumps no version counter).
    """
    key = (content_key(param), stored_in_out, fmt, curvatures)
    entry = _cache.setdefault(param, {})
    if key not in entry:
        w = param.detach()
        entry.clear()
        entry[key] = encode(w.t() if stored_in_out else w, fmt, curvatures=curvatures)
    return entry[key]


def content_key(t: torch.Tensor) -> tuple:
    """Shape, dtype and a CRC-32 of the bytes of ``t`` (about 1 GB/s here: a small fraction of
    an encode, paid again on every compile that reuses the cache)."""
    data = t.detach().to("cpu").contiguous()
    raw = data.view(-1).view(torch.uint8) if data.numel() else data.new_empty(0, dtype=torch.uint8)
    return tuple(data.shape), data.dtype, zlib.crc32(memoryview(raw.numpy()))
