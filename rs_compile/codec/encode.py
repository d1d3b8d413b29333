"""Offline encoder: dense weight -> Poincare codes (calibration-free).

Per group, for every curvature choice, a Lloyd-style scale fit: start from the absmax scale,
assign each weight its nearest level, refit the least-squares scale for that assignment, repeat.
Each step can only lower the group's squared error, so the result is never worse than absmax
rounding; the curvature whose fitted levels give the smallest error wins.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.weak import WeakIdKeyDictionary

from rs_compile.codec.format import (
    check_format,
    decode_units,
    decode_weight,
    log_map_levels,
    num_groups,
    pack_codes,
)

LLOYD_STEPS = 4
ROW_CHUNK = 256  # rows encoded at once: bounds the encoder's extra memory to a few MB per chunk


@dataclasses.dataclass
class EncodedWeight:
    """The stored form of one [out, in] weight (see rs_compile.codec.format for the layout)."""

    codes: torch.Tensor
    scales: torch.Tensor
    curv: torch.Tensor
    bits: int
    group_size: int
    in_features: int
    curv_step: float

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.codes, self.scales, self.curv

    def meta(self) -> dict:
        return dict(bits=self.bits, group_size=self.group_size, in_features=self.in_features,
                    curv_step=self.curv_step)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / (self.out_features * self.in_features)

    def dequantize(self) -> torch.Tensor:
        return decode_weight(*self.tensors(), **self.meta())


def _level_table(bits: int, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels f_c(u_q) for every code q, in float64, and the midpoints between them."""
    q = torch.arange(2**bits)
    levels = log_map_levels(decode_units(q, bits).double(), torch.tensor(c, dtype=torch.float64))
    return levels, (levels[1:] + levels[:-1]) / 2


def _fit_groups(w: torch.Tensor, valid: torch.Tensor, bits: int, c: float):
    """Best (scale, codes, error) per group of ``w[R, ng, G]`` for one curvature ``c``."""
    levels, mids = _level_table(bits, c)
    amax = (w.abs() * valid).amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / levels[-1], torch.ones_like(amax))
    for step in range(LLOYD_STEPS + 1):
        if step == LLOYD_STEPS:  # final assignment against the scale as it will be stored
            scale = scale.to(torch.float16).to(torch.float64)
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.bucketize(w / scale, mids)
        lv = levels[q] * valid
        if step < LLOYD_STEPS:
            den = (lv * lv).sum(-1, keepdim=True)
            scale = torch.where(den > 0, (w * lv).sum(-1, keepdim=True) / den, scale)
    scale = torch.where(amax > 0, scale, torch.zeros_like(scale))
    err = ((w - scale * lv) ** 2 * valid).sum(-1)
    return scale.squeeze(-1), q, err


def encode(
    weight: torch.Tensor,
    bits: int = 4,
    group_size: int = 64,
    curvatures: int = 4,
    curv_step: float = 1.0,
) -> EncodedWeight:
    """Encode a 2-D float weight ``[out, in]`` (nn.Linear layout)."""
    check_format(bits, group_size)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"encode expects a 2-D floating-point weight [out, in], got {tuple(weight.shape)} "
            f"{weight.dtype}"
        )
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf values; fix or drop them before compressing")
    n, k = weight.shape
    ng = num_groups(k, group_size)
    kp = ng * group_size
    w = torch.nn.functional.pad(weight.detach().to("cpu", torch.float64), (0, kp - k))
    valid = (torch.arange(kp) < k).double().view(ng, group_size)
    if float(w.abs().max()) / ((2**bits - 1) / 2) > torch.finfo(torch.float16).max:
        raise ValueError("weight magnitude exceeds what float16 group scales can hold")

    codes, scales, curv = [], [], []
    for r0 in range(0, n, ROW_CHUNK):
        wc = w[r0 : r0 + ROW_CHUNK].view(-1, ng, group_size)
        best = None
        for i in range(curvatures):
            s, q, err = _fit_groups(wc, valid, bits, i * curv_step)
            if best is None:
                best = [s, q, err, torch.zeros_like(err, dtype=torch.uint8)]
                continue
            better = err < best[2]
            best[0] = torch.where(better, s, best[0])
            best[1] = torch.where(better.unsqueeze(-1), q, best[1])
            best[2] = torch.where(better, err, best[2])
            best[3] = torch.where(better, torch.full_like(best[3], i), best[3])
        codes.append(pack_codes(best[1].reshape(wc.shape[0], kp), bits, group_size))
        scales.append(best[0].to(torch.float16))
        curv.append(best[3])
    return EncodedWeight(
        codes=torch.cat(codes),
        scales=torch.cat(scales),
        curv=torch.cat(curv),
        bits=bits,
        group_size=group_size,
        in_features=k,
        curv_step=float(curv_step),
    )


_cache = WeakIdKeyDictionary()


def encode_parameter(param: torch.Tensor, stored_in_out: bool, config) -> EncodedWeight:
    """Encode a module parameter, reusing the result across recompiles of the same weights.

    Dynamo recompiles (a new sequence length, a graph break) hand the backend the same
    parameters again; the cache is keyed on the tensor object, its in-place version counter and
    the codec settings, so an updated weight is always re-encoded.
    """
    key = (param._version, stored_in_out, config.bits, config.group_size, config.curvatures,
           config.curv_step)
    entry = _cache.setdefault(param, {})
    if key not in entry:
        w = param.detach()
        entry.clear()
        entry[key] = encode(w.t() if stored_in_out else w, config.bits, config.group_size,
                            config.curvatures, config.curv_step)
    return entry[key]
