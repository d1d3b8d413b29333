"""``rs::embedding``: rows of a table stored in the codec's format, gathered then decoded.

``out[..., :] = decode(codes, groups, row_scale)[ids[...], :]`` without decoding the whole table:
only the requested rows' codes, group bytes and row scales are gathered, then decoded
(rs_compile.codec.format), so a lookup costs what it reads. Out-of-range ids raise like
``F.embedding``. No gradient flows (ids are integers and the table is frozen).
"""

from __future__ import annotations

import torch

from rs_compile.codec.format import decode_weight
from rs_compile.ops.linear import check_packed


def check_ids(ids: torch.Tensor) -> None:
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"rs::embedding: ids must be int64 or int32, got {ids.dtype}")


@torch.library.custom_op("rs::embedding", mutates_args=())
def embedding(
    ids: torch.Tensor,
    codes: torch.Tensor,
    groups: torch.Tensor,
    row_scale: torch.Tensor,
    bits: int,
    group_size: int,
    embedding_dim: int,
) -> torch.Tensor:
    check_packed(codes, groups, row_scale, bits, group_size, embedding_dim)
    check_ids(ids)
    flat = ids.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= codes.shape[0]):
        raise IndexError(f"rs::embedding: ids must lie in [0, {codes.shape[0]}), got "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    return gather_rows(flat, codes, groups, row_scale, bits, group_size, embedding_dim).view(
        *ids.shape, embedding_dim)


def gather_rows(flat, codes, groups, row_scale, bits, group_size, embedding_dim) -> torch.Tensor:
    """Decoded rows ``flat`` (checked ids) of the table: gather the packed rows, then decode them
    (with the CPU kernel on CPU: one call, a few microseconds for a one-token lookup)."""
    codes, groups, row_scale = codes[flat], groups[flat], row_scale[flat]
    if codes.device.type == "cpu":
        from rs_compile.lowering.cpu_kernel import decode_cpu

        return decode_cpu(codes, groups, row_scale, bits, group_size, embedding_dim)
    return decode_weight(codes, groups, row_scale, bits, group_size, embedding_dim)


@embedding.register_fake
def _(ids, codes, groups, row_scale, bits, group_size, embedding_dim):
    check_packed(codes, groups, row_scale, bits, group_size, embedding_dim)
    check_ids(ids)
    return codes.new_empty((*ids.shape, embedding_dim), dtype=torch.float32)
