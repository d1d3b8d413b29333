"""format.decode_weight and the level tables against their specification, re-derived in float64."""

import math

import pytest
import torch

from rs_compile.codec.format import (
    CURVATURES, SUPPORTED_BITS, decode_weight, level_table, pack_codes, pack_groups, unpack_groups,
)


def spec_level(q: int, c: float, bits: int) -> int:
    """round(127 f_c(u) / f_c(u_top)), f_c(u) = u (1 + c u^2 / 3), u = (q - h) / h; 8 bits: q - 128."""
    if bits == 8:
        return q - 128
    h = 2 ** (bits - 1) - 1

    def f(u: float) -> float:
        return u * (1 + c * u * u / 3)

    return math.floor(127 * f((q - h) / h) / f((h + 1) / h) + 0.5)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_level_tables_follow_the_cubic_log_map_rounded_to_int8(bits):
    table = level_table(bits)
    curvatures = (0,) if bits == 8 else CURVATURES
    assert table.dtype == torch.int8 and table.shape == (len(curvatures), 2**bits)
    expected = [[spec_level(q, c, bits) for q in range(2**bits)] for c in curvatures]
    assert table.tolist() == expected
    assert bool((table.diff(dim=-1) > 0).all())  # strictly ascending: nearest-level rounding is sound


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_grid_has_an_exact_zero_and_gets_denser_near_it_with_curvature(bits):
    table = level_table(bits).double()
    h = 2 ** (bits - 1) - 1
    assert bool((table[:, h] == 0).all()) and bool((table[:, -1] == 127).all())
    assert bool((table[:, -1] > -table[:, 0]).all())  # one extra level above zero
    if bits >= 3:
        first_step = table[:, h + 1]  # the smallest positive level shrinks as c grows
        assert bool((first_step.diff() < 0).all())


def test_group_bytes_round_trip_signed_steps_and_table_indices():
    steps = torch.arange(-32, 32).repeat_interleave(4)
    tables = torch.arange(4).repeat(64)
    k, c = unpack_groups(pack_groups(steps, tables, 4), 4)
    assert torch.equal(k, steps.int()) and torch.equal(c, tables.int())
    k8, c8 = unpack_groups(pack_groups(torch.arange(-128, 128), torch.zeros(256), 8), 8)
    assert torch.equal(k8, torch.arange(-128, 128, dtype=torch.int32)) and not c8.any()


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_decode_matches_the_float64_formula_exactly(bits):
    g = torch.Generator().manual_seed(bits)
    n, k, group = 5, 40, 16  # k not a multiple of the group: padded last group
    ng = math.ceil(k / group)
    q = torch.randint(0, 2**bits, (n, ng * group), generator=g)
    lim = 128 if bits == 8 else 32
    steps = torch.randint(-lim, lim, (n, ng), generator=g)
    tables = torch.randint(0, 1 if bits == 8 else 4, (n, ng), generator=g)
    row_scale = (torch.rand(n, generator=g) * 1e-2).to(torch.bfloat16)
    got = decode_weight(pack_codes(q, bits, group), pack_groups(steps, tables, bits), row_scale,
                        bits, group, k)
    curv = (0,) if bits == 8 else CURVATURES
    expected = torch.tensor([[float(row_scale[r]) * int(steps[r, j // group])
                              * spec_level(int(q[r, j]), curv[int(tables[r, j // group])], bits)
                              for j in range(k)] for r in range(n)], dtype=torch.float64)
    assert got.shape == (n, k) and got.dtype == torch.float32
    assert torch.equal(got.double(), expected)  # exact: integer levels and steps, 8-bit row scale
