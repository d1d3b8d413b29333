"""The packed layout, re-derived bit by bit from its specification in codec/format.py."""

import pytest
import torch

from rs_compile.codec.encode import encode
from rs_compile.codec.format import PLANES, SUPPORTED_BITS, Format, check_format, pack_codes, unpack_codes
from rs_compile.modules import CompressedLinear


def reference_pack(q: list[list[int]], bits: int, group_size: int) -> list[list[int]]:
    """Plain-Python packing: per group, per plane of width w, byte b holds codes b + p*B."""
    rows = []
    for row in q:
        out = []
        for g0 in range(0, len(row), group_size):
            group, low = row[g0 : g0 + group_size], 0
            for w in PLANES[bits]:
                nbytes = group_size * w // 8
                for b in range(nbytes):
                    byte = 0
                    for p in range(8 // w):
                        part = (group[b + p * nbytes] >> low) & ((1 << w) - 1)
                        byte |= part << (p * w)
                    out.append(byte)
                low += w
        rows.append(out)
    return rows


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("group_size", [8, 32])
def test_pack_matches_bitwise_spec_and_round_trips(bits, group_size):
    g = torch.Generator().manual_seed(bits * 100 + group_size)
    q = torch.randint(0, 2**bits, (3, 2 * group_size), generator=g)
    packed = pack_codes(q, bits, group_size)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 2 * group_size * bits // 8)
    assert packed.tolist() == reference_pack(q.tolist(), bits, group_size)
    assert torch.equal(unpack_codes(packed, bits, group_size).reshape(3, -1), q.to(torch.int32))


def test_four_bit_layout_is_planar_nibbles():
    # code j (low nibble) shares byte j with code j + 32 (high nibble) in a group of 64
    q = torch.zeros(1, 64, dtype=torch.int64)
    q[0, 5], q[0, 37] = 3, 9
    packed = pack_codes(q, 4, 64)
    assert packed[0, 5].item() == 3 | (9 << 4)
    assert packed.sum().item() == packed[0, 5].item()


@pytest.mark.parametrize("bits,group_size", [(6, 32), (4, 0), (4, -8), (4, 12), (4, 64.0)])
def test_invalid_formats_are_rejected_with_the_valid_range(bits, group_size):
    with pytest.raises(ValueError, match="bits|group_size"):
        check_format(bits, group_size)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size,in_features", [(8, 8), (32, 100), (64, 64)])
def test_packed_specs_are_what_a_compressed_layer_holds(bits, group_size, in_features):
    layer = CompressedLinear(encode(torch.randn(5, in_features), Format(bits, group_size)))
    held = {name: (tuple(t.shape), t.dtype) for name, t in layer.named_buffers()}
    assert Format(bits, group_size).packed_specs(5, in_features) == held


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_packed_specs_and_bytes_count_every_stored_byte(bits):
    fmt = Format(bits, 32)
    specs = fmt.packed_specs(10, 70)  # 3 groups, the last one padded
    assert specs == {"codes": ((10, 3 * 32 * bits // 8), torch.uint8),
                     "groups": ((10, 3), torch.uint8), "row_scale": ((10,), torch.bfloat16)}
    assert fmt.nbytes(10, 70) == 10 * (3 * 4 * bits + 3 + 2)
