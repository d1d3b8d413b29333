"""format.decode_weight against the decode formula re-derived in float64 from its specification."""

import math

import pytest
import torch

from rs_compile.codec.format import decode_weight, pack_codes


def spec_decode(q: int, scale: float, c: float, bits: int) -> float:
    """w = scale * u * (1 + c u^2 / 3), u = (q - h) / h with h = 2**(bits-1) - 1 (exact zero at q = h)."""
    h = 2 ** (bits - 1) - 1
    u = (q - h) / h
    return scale * u * (1 + c * u * u / 3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_decode_matches_the_float64_formula(bits):
    g = torch.Generator().manual_seed(bits)
    n, k, group, curv_step = 5, 40, 16, 0.75  # k not a multiple of the group: padded last group
    ng = math.ceil(k / group)
    q = torch.randint(0, 2**bits, (n, ng * group), generator=g)
    scales = (torch.randn(n, ng, generator=g) * 0.1).half()
    curv = torch.randint(0, 4, (n, ng), generator=g, dtype=torch.uint8)
    got = decode_weight(pack_codes(q, bits, group), scales, curv, bits, group, k, curv_step)
    expected = torch.tensor([[spec_decode(int(q[r, j]), float(scales[r, j // group]),
                                          int(curv[r, j // group]) * curv_step, bits)
                              for j in range(k)] for r in range(n)], dtype=torch.float64)
    assert got.shape == (n, k) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_level_grid_has_an_exact_zero_and_one_extra_level_above(bits):
    h = 2 ** (bits - 1) - 1
    q = torch.arange(2**bits).view(1, -1)
    scales = torch.ones(1, 1, dtype=torch.float16)
    for c in (0.0, 2.0):
        curv = torch.full((1, 1), int(c), dtype=torch.uint8)
        levels = decode_weight(pack_codes(q, bits, 2**bits), scales, curv, bits, 2**bits, 2**bits, 1.0)[0]
        assert levels[h] == 0.0
        assert levels[0].item() == pytest.approx(-(1 + c / 3))
        assert levels[-1].item() == pytest.approx(spec_decode(2**bits - 1, 1.0, c, bits))
        assert (levels[-1] > -levels[0]).item() and bool((levels.diff() > 0).all())
