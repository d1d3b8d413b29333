"""The calibration-free encoder against independent float64 references of what it must achieve."""

import pytest
import torch

from rs_compile.codec.encode import encode, packed_nbytes
from rs_compile.codec.format import decode_weight, pack_codes, unpack_codes


def format_levels(bits: int, c: float) -> torch.Tensor:
    """The format's levels at scale 1 (decode_weight is checked against its formula elsewhere)."""
    q = torch.arange(2**bits).view(1, -1)
    one = torch.ones(1, 1, dtype=torch.float16)
    curv = torch.full((1, 1), int(c), dtype=torch.uint8)
    return decode_weight(pack_codes(q, bits, 2**bits), one, curv, bits, 2**bits, 2**bits, 1.0)[0].double()


def grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    pad = -w.shape[1] % group
    return torch.nn.functional.pad(w.double(), (0, pad)).view(w.shape[0], -1, group)


def absmax_rounding_error(w: torch.Tensor, bits: int, group: int, curvatures: int, step: float,
                          importance: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group error of plain absmax rounding in the same format, best over the curvatures.

    The group's extreme value lands on the extreme level of its side (negative scale when the
    absmax is negative, the grid's extra level being on the positive side); scale rounded to
    float16 as stored; every weight rounded to its nearest level.
    """
    g = grouped(w, group)
    d = torch.ones_like(g) if importance is None else grouped(importance.view(1, -1), group).expand_as(g)
    idx = g.abs().argmax(-1, keepdim=True)
    sign = torch.where(g.gather(-1, idx) < 0, -1.0, 1.0).double()
    oriented = g * sign
    best = None
    for i in range(curvatures):
        lv = format_levels(bits, i * step)
        s = torch.maximum(oriented.amax(-1, keepdim=True) / lv[-1], oriented.amin(-1, keepdim=True) / lv[0])
        s = s.half().double()
        rec = (s.float().unsqueeze(-1) * lv.float()).double()  # the levels as decode computes them
        nearest = (oriented.unsqueeze(-1) - rec).abs().amin(-1)  # distance to the nearest level
        err = (d * nearest ** 2).sum(-1)
        best = err if best is None else torch.minimum(best, err)
    return best


def group_error(w, enc, group, importance=None):
    d = 1.0 if importance is None else grouped(importance.view(1, -1), group)
    return (d * (grouped(w, group) - grouped(enc.dequantize(), group)) ** 2).sum(-1)


def laplace_weights(n, k, seed):
    u = torch.rand(n, k, generator=torch.Generator().manual_seed(seed)) - 0.5
    return -0.02 * torch.sign(u) * torch.log1p(-2 * u.abs())  # heavy-tailed like trained weights


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("weighted", [False, True])
def test_error_never_worse_than_absmax_rounding_per_group(bits, weighted):
    w = laplace_weights(24, 200, seed=bits)
    imp = torch.rand(200, generator=torch.Generator().manual_seed(9)) * 3 if weighted else None
    enc = encode(w, bits, 64, curvatures=4, curv_step=1.0, importance=imp)
    ours, ref = group_error(w, enc, 64, imp), absmax_rounding_error(w, bits, 64, 4, 1.0, imp)
    # fp32 decode vs float64 reference: a relative 1e-6 slack
    assert bool((ours <= ref * (1 + 1e-6)).all())
    # the scale refit does real work; per-group curvature halves plain uniform (c = 0) rounding
    assert ours.sum() < 0.97 * ref.sum()
    assert ours.sum() < 0.7 * absmax_rounding_error(w, bits, 64, 1, 1.0, imp).sum()


def test_codes_are_nearest_levels_of_the_stored_scale_and_curvature():
    w = laplace_weights(16, 128, seed=3)
    enc = encode(w, 4, 64, curvatures=4, curv_step=1.0)
    q = unpack_codes(enc.codes, 4, 64).long()  # [n, ng, G]
    levels = torch.stack([format_levels(4, i) for i in range(4)])[enc.curv.long()]  # [n, ng, 16]
    rec = enc.scales.double().unsqueeze(-1) * levels
    dist = (grouped(w, 64).unsqueeze(-1) - rec.unsqueeze(-2)).abs()  # [n, ng, G, 16]
    chosen = dist.gather(-1, q.unsqueeze(-1)).squeeze(-1)
    assert bool((chosen <= dist.amin(-1) + 1e-9).all())


@pytest.mark.parametrize("bits,k,expected", [(4, 256, 4.375), (8, 256, 8.375), (3, 256, 3.375),
                                             (4, 100, 8 * 2 * (32 + 2 + 1) / 100)])
def test_bits_per_weight_counts_every_stored_byte(bits, k, expected):
    enc = encode(laplace_weights(12, k, seed=1), bits, 64)
    stored = sum(t.untyped_storage().nbytes() for t in enc.tensors())
    assert enc.nbytes() == stored == packed_nbytes(12, k, bits, 64)
    assert enc.bits_per_weight() == pytest.approx(8 * stored / (12 * k)) == pytest.approx(expected)


def test_encoding_is_deterministic_across_runs_and_thread_counts():
    w = laplace_weights(300, 384, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = encode(w)
        torch.set_num_threads(2)
        second, third = encode(w), encode(w.clone())
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first.tensors(), second.tensors(), third.tensors()):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_zero_weights_and_all_zero_groups_decode_to_zero():
    w = laplace_weights(4, 128, seed=2)
    w[0] = 0.0
    w[1, 10:50] = 0.0
    rec = encode(w).dequantize()
    assert bool((rec[0] == 0).all()) and bool((rec[1, 10:50] == 0).all())


def test_invalid_weights_are_rejected_with_the_reason():
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode(torch.tensor([[1.0, float("nan")] * 8]))
    with pytest.raises(ValueError, match="float16 group scales"):
        encode(torch.full((2, 16), 1e6))
    with pytest.raises(ValueError, match="2-D floating-point"):
        encode(torch.ones(3, 4, 5))
    with pytest.raises(ValueError, match="importance"):
        encode(torch.ones(2, 16), importance=-torch.ones(16))
