"""The packed Poincare-code layout and its closed-form decode.

This module is the single definition of what the stored bytes mean. The CPU reference op, the
Inductor decomposition and save/load all call these functions; the Triton kernel re-states the
same arithmetic and is tested against them.

Layout of one weight ``W[N, K]`` (nn.Linear orientation, out x in), ``K`` zero-padded to
``Kp = ngroups * group_size``:

* ``codes``  uint8 ``[N, ngroups * group_size * bits // 8]``: each group's codes are split into
  bit planes of power-of-two widths (4 -> [4], 8 -> [8], 2 -> [2], 3 -> [2, 1]). A plane of width
  ``w`` holds ``8 // w`` codes per byte *planar* within the group: byte ``b`` of the plane carries
  codes ``b, b + B, b + 2B, ...`` (``B = group_size * w // 8``) at bit offsets ``0, w, 2w, ...``.
  Unpacking is then shifts of contiguous byte runs, which vectorises (no per-element gather).
* ``scales`` float16 ``[N, ngroups]``: per-group scale (may be negative, see the encoder).
* ``curv``   uint8 ``[N, ngroups]``: per-group curvature index ``i``; the curvature is
  ``c = i * curv_step``.

Decode of a code ``q`` in ``[0, L)`` with ``L = 2**bits``::

    u = (q - zero) / half                  uniform coordinate in the ball (zero = half = L/2 - 1)
    w = scale * u * (1 + (c / 3) * u**2)

The grid is asymmetric with an exact zero: ``u`` runs over ``-1, ..., 0, ..., 1, 1 + 1/half``
(for 4 bits: 7 levels below zero, 8 above). The sign of the scale chooses which side of a group
gets the extra level, and exact zeros (padding, pruned weights) decode to zero. On all linears of
MiniLM and TinyStories-260K this grid lowers the encoder's error ~8% below the symmetric
``zero = half = (L-1)/2`` grid, whose worst layer lost to NF4 (docs/fidelity.md).

``u * (1 + c u^2 / 3)`` is the third-order expansion at the origin of the Poincare ball's
logarithmic map ``atanh(sqrt(c) u) / sqrt(c)``: levels uniform in the ball come out dense near zero,
where trained weights live, and the decode stays two multiply-adds (a transcendental or a table
gather per element measured several times slower on this CPU).
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
PLANES: dict[int, tuple[int, ...]] = {2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}


def group_bytes(bits: int, group_size: int) -> int:
    return group_size * bits // 8


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def packed_specs(
    bits: int, group_size: int, out_features: int, in_features: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the tensors one ``[out_features, in_features]`` weight is stored
    as (the layout above). CompressedLinear's buffers, save/load and the op's input checks all take
    the packed tensors' names, shapes and dtypes from here."""
    ng = num_groups(in_features, group_size)
    return {"codes": ((out_features, ng * group_bytes(bits, group_size)), torch.uint8),
            "scales": ((out_features, ng), torch.float16),
            "curv": ((out_features, ng), torch.uint8)}


def check_format(bits: int, group_size: int) -> None:
    """Raise ValueError for a (bits, group_size) pair the layout cannot hold."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; valid values are {SUPPORTED_BITS}")
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 8:
        raise ValueError(
            f"group_size={group_size!r} is invalid; it must be a positive multiple of 8 "
            "(every bit plane of a group must fill whole bytes)"
        )


def unit_params(bits: int) -> tuple[float, float]:
    """(zero, half) such that u = (q - zero) / half runs uniformly over [-1, 1 + 1/half]."""
    half = float(2 ** (bits - 1) - 1)
    return half, half


def pack_codes(q: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Pack integer codes ``q[N, Kp]`` (values < 2**bits) into the planar uint8 layout."""
    n, kp = q.shape
    g = q.to(torch.int32).view(n, kp // group_size, group_size)
    planes, low = [], 0
    for w in PLANES[bits]:
        per_byte, nbytes = 8 // w, group_size * w // 8
        part = (g >> low) & ((1 << w) - 1)  # [n, ng, G], j = p * nbytes + b
        part = part.view(n, -1, per_byte, nbytes)
        shifts = torch.arange(per_byte, dtype=torch.int32, device=q.device) * w
        planes.append((part << shifts.view(1, 1, -1, 1)).sum(2))
        low += w
    return torch.cat(planes, dim=-1).to(torch.uint8).view(n, -1)


def unpack_codes(codes: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[N, ng*G*bits/8]`` -> int32 codes ``[N, ng, G]``."""
    n = codes.shape[0]
    g = codes.view(n, -1, group_bytes(bits, group_size)).to(torch.int32)
    q, start, low = None, 0, 0
    for w in PLANES[bits]:
        per_byte, nbytes = 8 // w, group_size * w // 8
        plane = g[:, :, start : start + nbytes]
        shifts = torch.arange(per_byte, dtype=torch.int32, device=codes.device) * w
        part = (plane.unsqueeze(2) >> shifts.view(1, 1, -1, 1)) & ((1 << w) - 1)
        part = part.reshape(n, -1, group_size) << low
        q = part if q is None else q | part
        start += nbytes
        low += w
    return q


def decode_units(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes -> uniform ball coordinates u in [-1, 1] (float32)."""
    zero, half = unit_params(bits)
    return (q.to(torch.float32) - zero) * (1.0 / half)


def log_map_levels(u: torch.Tensor, curvature: torch.Tensor) -> torch.Tensor:
    """The truncated log map u * (1 + c u^2 / 3), broadcast over u."""
    return u * (1.0 + curvature * (1.0 / 3.0) * u * u)


def decode_groups(
    codes: torch.Tensor,
    scales: torch.Tensor,
    curv: torch.Tensor,
    bits: int,
    group_size: int,
    curv_step: float,
) -> torch.Tensor:
    """Decode the packed layout to float32 ``[N, ngroups, group_size]``."""
    u = decode_units(unpack_codes(codes, bits, group_size), bits)
    c = (curv.to(torch.float32) * curv_step).unsqueeze(-1)
    return scales.to(torch.float32).unsqueeze(-1) * log_map_levels(u, c)


def decode_weight(
    codes: torch.Tensor,
    scales: torch.Tensor,
    curv: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    curv_step: float,
) -> torch.Tensor:
    """Dense float32 weight ``[N, in_features]`` that the codes represent."""
    w = decode_groups(codes, scales, curv, bits, group_size, curv_step)
    return w.reshape(w.shape[0], -1)[:, :in_features]
