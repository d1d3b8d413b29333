"""The stored weight format: the single definition of what the bytes mean.

Every consumer takes its constants from here, so a format change is one edit of this module: the
CPU reference op and the Inductor lowering call these functions; the C++ kernel is built with the
constants below as ``#define``s (rs_compile/lowering/cpu_kernel.py prepends them to its source, so
an edit here rebuilds it); the Triton kernel receives them as ``constexpr`` launch arguments; both
kernels receive :meth:`Format.levels` as an argument rather than restating the tables.

One weight ``W[N, K]`` (nn.Linear orientation, out x in), ``K`` zero-padded to
``Kp = ngroups * group_size``, is stored as three tensors (:meth:`Format.packed_specs`):

* ``codes``     uint8 ``[N, ngroups * group_size * bits // 8]``: each group's codes split into bit
  planes of power-of-two widths (:data:`PLANES`, e.g. 5 -> [4, 1]). A plane of width ``w`` holds
  ``8 // w`` codes per byte *planar* within the group: byte ``b`` of the plane carries codes
  ``b, b + B, b + 2B, ...`` (``B = group_size * w // 8``) at bit offsets ``0, w, 2w, ...``, so
  unpacking is shifts of contiguous byte runs (4 bits: low nibbles are the first half of a group,
  high nibbles the second).
* ``groups``    uint8 ``[N, ngroups]``: one byte per group holding a signed integer *scale step*
  ``k`` and, for widths with several level tables, the table (curvature) index ``c``:
  ``byte = (k << CURVATURE_BITS) | c`` in two's complement, i.e. ``k = int8(byte) >> 2`` and
  ``c = byte & 3`` (``UNIFORM_BITS``-wide codes have one table, so ``k = int8(byte)``).
* ``row_scale`` bfloat16 ``[N]``: the scale of one step.

Decode of code ``q`` in group ``g`` of row ``n``::

    w = row_scale[n] * k[n, g] * LEVELS[bits][c[n, g], q]

with ``LEVELS`` the int8 tables of :func:`level_table`. ``k * LEVELS`` is an integer below 2**14
and ``row_scale`` has 8 significant bits, so every decoded weight is exact in float32: decode is
bit-identical whatever order a kernel multiplies in.

The level tables. For ``bits <= 5`` table ``c`` (curvature ``c = 0, 1, 2, 3``) holds, for
``u = (q - h) / h`` (``h = 2**(bits-1) - 1``: ``u`` runs uniformly over ``-1 .. 1 + 1/h`` with an
exact zero), the cubic ``f_c(u) = u (1 + c u^2 / 3)`` scaled so its top level is 127 and rounded
to the nearest integer. ``u (1 + c u^2 / 3)`` is the third-order expansion at the origin of the
Poincare ball's logarithmic map ``atanh(sqrt(c) u) / sqrt(c)``; it is *not* that map (which
diverges at the ball's edge), and the tables are its int8 rounding. Levels uniform in the ball
come out denser near zero as ``c`` grows, and each group picks the table that fits it best. The
grid is asymmetric (one more level above zero than below); the sign of ``k`` puts the extra level
on the side of the group's largest magnitude. 8-bit codes use one uniform table, ``q - 128``.

Why this shape (measured on Gemma-3-270M, docs/fidelity.md): groups of 32 with a per-group table
choice halve the next-token KL of one fixed table; 6-bit scale steps on a per-row bf16 scale cost
~2% KL against float32 group scales, at 8 + 16/K bits per group instead of 32 + 2; int8 levels
let CPU kernels multiply with int8 dot-product instructions.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

SUPPORTED_BITS = (2, 3, 4, 5, 8)
PLANES: dict[int, tuple[int, ...]] = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 8: (8,)}
UNIFORM_BITS = 8  # the width stored with one uniform table, q - 2**(bits-1), and no table index
CURVATURES = (0, 1, 2, 3)  # the curvature of level table c, for the other widths
CURVATURE_BITS = 2  # bits of a group byte holding the table index (the other widths)
TOP_LEVEL = 127


@functools.cache
def _levels(bits: int) -> tuple[tuple[int, ...], ...]:
    if bits == UNIFORM_BITS:
        return (tuple(range(-(1 << (bits - 1)), 1 << (bits - 1))),)
    half = 2 ** (bits - 1) - 1
    u = (torch.arange(2**bits, dtype=torch.float64) - half) / half
    c = torch.tensor(CURVATURES, dtype=torch.float64).unsqueeze(-1)
    f = u * (1 + c * u * u / 3)
    return tuple(map(tuple, torch.floor(TOP_LEVEL * f / f[:, -1:] + 0.5).long().tolist()))


def level_table(bits: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """The levels ``[tables, 2**bits]`` (ascending per table) of the module doc, int8 by default.

    A new tensor per call (a constant of the traced graph when called under tracing or fake
    tensors, where a cached real tensor would not be allowed)."""
    return torch.tensor(_levels(bits), dtype=dtype, device=device)


@dataclasses.dataclass(frozen=True)
class Format:
    """Code width and group size: everything the bytes of a weight depend on."""

    bits: int = 4
    group_size: int = 32

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; valid values are {SUPPORTED_BITS}")
        if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 8:
            raise ValueError(
                f"group_size={self.group_size!r} is invalid; it must be a positive multiple of 8 "
                "(every bit plane of a group must fill whole bytes)"
            )

    @property
    def curvature_bits(self) -> int:
        return 0 if self.bits == UNIFORM_BITS else CURVATURE_BITS

    @property
    def tables(self) -> int:
        """How many level tables (curvatures) a group can choose from."""
        return 1 if self.bits == UNIFORM_BITS else len(CURVATURES)

    @property
    def max_step(self) -> int:
        """Largest |k| the encoder uses (the byte also holds -max_step - 1, left unused)."""
        return 2 ** (7 - self.curvature_bits) - 1

    @property
    def group_bytes(self) -> int:
        return self.group_size * self.bits // 8

    def levels(self) -> torch.Tensor:
        return level_table(self.bits)

    def num_groups(self, in_features: int) -> int:
        return -(-in_features // self.group_size)

    def packed_specs(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of the tensors one ``[out, in]`` weight is stored as."""
        ng = self.num_groups(in_features)
        return {"codes": ((out_features, ng * self.group_bytes), torch.uint8),
                "groups": ((out_features, ng), torch.uint8),
                "row_scale": ((out_features,), torch.bfloat16)}

    def nbytes(self, out_features: int, in_features: int) -> int:
        """Bytes of the packed tensors of one ``[out, in]`` weight (what is actually stored)."""
        return sum(torch.Size(shape).numel() * dtype.itemsize
                   for shape, dtype in self.packed_specs(out_features, in_features).values())


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
    g = codes.view(n, -1, group_size * bits // 8).to(torch.int32)
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


def pack_groups(step: torch.Tensor, table: torch.Tensor, bits: int) -> torch.Tensor:
    """Group bytes from integer scale steps and table indices (module doc)."""
    shift = Format(bits).curvature_bits
    return ((step.to(torch.int32) << shift) | table.to(torch.int32)).to(torch.uint8)


def unpack_groups(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, c)`` int32 tensors shaped like ``groups``: signed scale steps and table indices."""
    shift = Format(bits).curvature_bits
    byte = groups.view(torch.int8).to(torch.int32)
    return byte >> shift, byte & ((1 << shift) - 1)


def decode_groups(
    codes: torch.Tensor, groups: torch.Tensor, row_scale: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Decode the packed tensors to float32 ``[N, ngroups, group_size]``."""
    q = unpack_codes(codes, bits, group_size)
    k, c = unpack_groups(groups, bits)
    table = level_table(bits, codes.device, torch.float32)
    levels = table.view(-1)[(c << bits).unsqueeze(-1) + q]
    return row_scale.to(torch.float32)[:, None, None] * k.to(torch.float32).unsqueeze(-1) * levels


def decode_weight(
    codes: torch.Tensor, groups: torch.Tensor, row_scale: torch.Tensor, bits: int, group_size: int,
    in_features: int,
) -> torch.Tensor:
    """Dense float32 weight ``[N, in_features]`` that the packed tensors represent.

    A partial last group is cut apart from the whole groups: slicing the padded rows back to
    ``in_features`` is miscompiled by Inductor (torch 2.13 CPU, 8-bit codes: the last group's
    columns are never written), and the Inductor lowering traces this function."""
    w = decode_groups(codes, groups, row_scale, bits, group_size)
    full = in_features // group_size
    if full * group_size == in_features:
        return w.reshape(w.shape[0], -1)
    return torch.cat([w[:, :full].flatten(1), w[:, full, : in_features - full * group_size]], dim=1)


def check_format(bits: int, group_size: int) -> None:
    """Raise ValueError for a (bits, group_size) pair the layout cannot hold."""
    Format(bits, group_size)

