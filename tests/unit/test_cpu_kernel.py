"""rs::linear's hand-written CPU kernel (rs_compile/lowering/cpu_kernel.cpp) against a float64
re-derivation of the format's decode written here from the spec (not the kernel's, nor
``format.decode_weight``'s code), its routing, and its fallback when the build is unavailable."""

import math
import warnings

import numpy as np
import pytest
import torch

from rs_compile.codec.format import PLANES, Format, decode_weight, level_table
from rs_compile.lowering import cpu_kernel
from rs_compile.ops.linear import linear


@pytest.fixture(scope="module")
def kern():
    """The kernel, built (or loaded from Inductor's cache) once for the module."""
    k = cpu_kernel.kernel()
    assert k is not None, cpu_kernel.status()
    return k


def levels64(bits: int) -> np.ndarray:
    """The level tables re-derived from format.py's doc: the int8 rounding of 127 f_c(u) / f_c(top)."""
    if bits == 8:
        return np.arange(-128, 128, dtype=np.float64)[None]
    h = 2 ** (bits - 1) - 1
    u = (np.arange(2**bits) - h) / h
    rows = []
    for c in (0, 1, 2, 3):
        f = u * (1 + c * u * u / 3)
        rows.append(np.floor(127 * f / f[-1] + 0.5))
    return np.array(rows)


def decode64(codes, groups, row_scale, bits, group_size, in_features) -> np.ndarray:
    """float64 [N, in_features] from the packed bytes, element by element as format.py's doc says."""
    codes = codes.numpy().astype(np.int64)
    gbytes = groups.numpy().view(np.int8).astype(np.int64)
    rs = row_scale.float().double().numpy()
    n, ng = gbytes.shape
    table = levels64(bits)
    gsz = group_size * bits // 8
    w = np.zeros((n, ng * group_size))
    for g in range(ng):
        q = np.zeros((n, group_size), dtype=np.int64)
        start, low = g * gsz, 0
        for width in PLANES[bits]:
            nbytes = group_size * width // 8
            for j in range(group_size):  # code j: byte j % nbytes, bit offset width * (j // nbytes)
                part = (codes[:, start + j % nbytes] >> (width * (j // nbytes))) & ((1 << width) - 1)
                q[:, j] |= part << low
            start += nbytes
            low += width
        if bits == 8:
            k, c = gbytes[:, g], np.zeros(n, dtype=np.int64)
        else:
            k, c = gbytes[:, g] >> 2, gbytes[:, g] & 3
        w[:, g * group_size:(g + 1) * group_size] = rs[:, None] * k[:, None] * table[c[:, None], q]
    return w[:, :in_features]


def round_activations64(x: torch.Tensor, group_size: int) -> np.ndarray:
    """activations.py's rounding, re-done in numpy float32 (s = amax / 127, round half to even)."""
    x = x.numpy().astype(np.float32)
    out = np.empty_like(x)
    for g0 in range(0, x.shape[-1], group_size):
        xg = x[..., g0:g0 + group_size]
        amax = np.abs(xg).max(-1, keepdims=True)
        s = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
        out[..., g0:g0 + group_size] = np.round(xg / s) * s
    return out.astype(np.float64)


def random_layer(n, k, bits, group_size, seed):
    g = torch.Generator().manual_seed(seed)
    spec = Format(bits, group_size).packed_specs(n, k)
    codes = torch.randint(0, 256, spec["codes"][0], generator=g, dtype=torch.int32).to(torch.uint8)
    groups = torch.randint(0, 256, spec["groups"][0], generator=g, dtype=torch.int32).to(torch.uint8)
    row_scale = (torch.rand(n, generator=g) * 0.02 + 1e-3).to(torch.bfloat16)
    return codes, groups, row_scale


def assert_close_to_float64(y, x64, w64, b64, k):
    """|y - ref| within float32 summation error: K * 2**-23 of |x| @ |W|.T (+ |b|)."""
    ref = x64 @ w64.T + (b64 if b64 is not None else 0)
    mag = np.abs(x64) @ np.abs(w64).T + (np.abs(b64) if b64 is not None else 0)
    err = np.abs(y.double().numpy().reshape(ref.shape) - ref)
    assert (err <= (k + 2) * 2.0**-23 * mag + 1e-30).all(), float(err.max())


def test_level_tables_match_the_rederivation():
    for bits in (2, 3, 4, 5, 8):
        assert np.array_equal(level_table(bits).numpy().astype(np.float64), levels64(bits))


CASES = [(bits, gs) for bits in (4, 5, 8) for gs in (32, 64, 128)] + [(2, 32), (3, 64), (4, 48)]


@pytest.mark.parametrize("bits,group_size", CASES)
@pytest.mark.parametrize("act_bits", [0, 8])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("path", ["auto", "generic", "no-vnni"])
def test_kernel_matches_float64_rederivation(kern, bits, group_size, act_bits, m, path):
    n = 45
    k = 3 * group_size - 13  # not a multiple of the group: the padded tail is exercised
    codes, groups, row_scale = random_layer(n, k, bits, group_size, seed=bits * 100 + group_size + m)
    gen = torch.Generator().manual_seed(m)
    bias = torch.randn(n, generator=gen) if m != 3 else None
    x = torch.randn(m, 2 * k, generator=gen)[:, ::2]  # non-contiguous rows
    assert not x.is_contiguous()
    w64 = decode64(codes, groups, row_scale, bits, group_size, k)
    x64 = round_activations64(x, group_size) if act_bits else x.double().numpy()
    b64 = None if bias is None else bias.double().numpy()
    if path != "auto":  # the plain C++ GEMV whatever this CPU has (17 rows: 8 + 8 + 1), or
        # the AVX-512 float path instead of VNNI (act_bits=8: activations rounded to floats;
        # act_bits=0: the float activations as they are, not split into int8 digits)
        y = torch.empty(m, n)
        flags = cpu_kernel.FORCE_GENERIC if path == "generic" else cpu_kernel.NO_VNNI
        cpu_kernel._call(kern, x.contiguous(), codes, groups, row_scale, bias, y, m, bits, group_size,
                         k, act_bits, 0, flags=flags)
    else:
        y = linear(x, codes, groups, row_scale, bias, bits, group_size, k, act_bits)
    assert_close_to_float64(y, x64, w64, b64, k)
    # and against the reference op in float32 (the two float32 sums' errors add up)
    ref = cpu_kernel.reference_linear(x, codes, groups, row_scale, bias, bits, group_size, k, act_bits)
    mag = np.abs(x64) @ np.abs(w64).T + (np.abs(b64) if b64 is not None else 0)
    err = (y - ref).abs().double().numpy().reshape(mag.shape)
    assert (err <= 2 * (k + 2) * 2.0**-23 * mag + 1e-30).all()


@pytest.mark.parametrize("bits,group_size", CASES)
@pytest.mark.parametrize("flags", [0, cpu_kernel.FORCE_GENERIC])
def test_kernel_decode_is_bit_exact(kern, bits, group_size, flags):
    k = 2 * group_size + 8
    codes, groups, row_scale = random_layer(33, k, bits, group_size, seed=7 + bits)
    out = torch.empty(33, k)
    cpu_kernel._call(kern, out, codes, groups, row_scale, None, out, 0, bits, group_size, k, 0, 1, flags)
    assert torch.equal(out, decode_weight(codes, groups, row_scale, bits, group_size, k))
    assert np.array_equal(out.double().numpy(), decode64(codes, groups, row_scale, bits, group_size, k))


def test_higher_dimensional_input_and_tiled_prefill(kern, monkeypatch):
    codes, groups, row_scale = random_layer(300, 96, 4, 32, seed=3)
    x = torch.randn(2, 9, 96)
    w64 = decode64(codes, groups, row_scale, 4, 32, 96)
    monkeypatch.setattr(cpu_kernel, "DECODE_TILE_BYTES", 4 * 96 * 64)  # tiles of 64 rows
    y = linear(x, codes, groups, row_scale, None, 4, 32, 96)
    assert y.shape == (2, 9, 300)
    assert_close_to_float64(y.reshape(18, 300), x.reshape(18, 96).double().numpy(), w64, None, 96)


def test_nan_activation_gives_nan_row_like_the_reference(kern):
    codes, groups, row_scale = random_layer(16, 64, 4, 32, seed=1)
    x = torch.randn(2, 64)
    x[1, 5] = float("nan")
    for act_bits in (0, 8):
        y = linear(x, codes, groups, row_scale, None, 4, 32, 64, act_bits)
        ref = cpu_kernel.reference_linear(x, codes, groups, row_scale, None, 4, 32, 64, act_bits)
        assert torch.isnan(y[1]).all() and torch.isnan(ref[1]).all()
        assert not torch.isnan(y[0]).any()


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_float_activations_error_bound_beside_an_outlier(kern, bits):
    """act_bits=0 on a VNNI CPU splits each group of x into three int8 digits (cpu_kernel.cpp):
    each entry carries at most ~2**-24 max|x| of its group of absolute error (what float32 makes of
    the group's largest entry), on top of float32 summation. Next to a 1e4 outlier that bound is
    the documented one and no larger; groups without the outlier keep float32 accuracy."""
    n, k, gs = 37, 96, 32
    codes, groups, row_scale = random_layer(n, k, bits, gs, seed=7 + bits)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(3)) * 1e-3
    x[0, 3] = 1e4
    x[1, 40] = -3e4
    y = linear(x, codes, groups, row_scale, None, bits, gs, k)
    w64 = decode64(codes, groups, row_scale, bits, gs, k)
    x64 = x.double().numpy()
    err = np.abs(y.double().numpy() - x64 @ w64.T)
    amax = np.repeat(np.abs(x64).reshape(2, -1, gs).max(-1), gs, axis=1)  # per entry: its group's max
    sum_bound = (k + 2) * 2.0**-23 * (np.abs(x64) @ np.abs(w64).T)
    digit_bound = 2.0**-23 * (amax @ np.abs(w64).T)
    assert (err <= sum_bound + digit_bound).all(), float((err / (sum_bound + digit_bound)).max())
    # a row whose outlier group is dropped: float32 accuracy (no scale of another group leaks in)
    rest = x.clone()
    rest[0, :gs] = 0.0
    rest[1, gs:2 * gs] = 0.0
    y_rest = linear(rest, codes, groups, row_scale, None, bits, gs, k).double().numpy()
    r64 = rest.double().numpy()
    err_rest = np.abs(y_rest - r64 @ w64.T)
    assert (err_rest <= (k + 2) * 2.0**-23 * (np.abs(r64) @ np.abs(w64).T) + 2.0**-23 * (
        np.repeat(np.abs(r64).reshape(2, -1, gs).max(-1), gs, axis=1) @ np.abs(w64).T)).all()
    assert np.abs(r64 @ w64.T).mean() > 1e3 * err_rest.mean()


def test_inf_activation_propagates_like_the_reference(kern):
    codes, groups, row_scale = random_layer(16, 64, 4, 32, seed=1)
    x = torch.randn(2, 64)
    x[1, 5] = float("inf")
    y = linear(x, codes, groups, row_scale, None, 4, 32, 64)
    ref = cpu_kernel.reference_linear(x, codes, groups, row_scale, None, 4, 32, 64)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    assert torch.equal(y[1].sign()[torch.isinf(ref[1])], ref[1].sign()[torch.isinf(ref[1])])
    assert torch.allclose(y[0], ref[0], rtol=1e-5, atol=1e-6)


def test_bad_group_count_raises_before_any_read(kern):
    codes, groups, row_scale = random_layer(8, 100, 4, 32, seed=2)  # 4 groups
    with pytest.raises(ValueError, match="groups has shape"):
        linear(torch.randn(1, 100), codes, groups[:, :3].contiguous(), row_scale, None, 4, 32, 100)
    # the kernel itself refuses a group count that does not match in_features
    out = torch.empty(1, 8)
    status = kern(torch.randn(1, 100), codes, groups, row_scale.view(torch.int16), out,
                  cpu_kernel._levels(4), out, 1, 8, 100, 4, 32, 3, 0, 0, 1, 0, 0)
    assert status == -3


def test_embedding_rows_match_the_reference(kern):
    from rs_compile.ops.embedding import embedding

    codes, groups, row_scale = random_layer(50, 72, 5, 32, seed=4)
    ids = torch.tensor([[3, 49], [0, 3]])
    rows = embedding(ids, codes, groups, row_scale, 5, 32, 72)
    ref = decode_weight(codes, groups, row_scale, 5, 32, 72)[ids]
    assert torch.equal(rows, ref)


def test_fallback_when_the_build_is_disabled_warns_once_and_agrees(kern, monkeypatch):
    codes, groups, row_scale = random_layer(40, 100, 4, 32, seed=5)
    x = torch.randn(2, 100)
    fast = linear(x, codes, groups, row_scale, None, 4, 32, 100, 8)
    monkeypatch.setenv(cpu_kernel.ENV_VAR, "0")
    cpu_kernel.reset()
    try:
        with pytest.warns(RuntimeWarning, match="unavailable"):
            slow = linear(x, codes, groups, row_scale, None, 4, 32, 100, 8)
        assert cpu_kernel.status() == {"available": False, "reason": f"KernelUnavailable: disabled by "
                                       f"{cpu_kernel.ENV_VAR}=0", "avx512": False, "vnni": False}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not per call
            again = linear(x, codes, groups, row_scale, None, 4, 32, 100, 8)
    finally:
        monkeypatch.delenv(cpu_kernel.ENV_VAR)
        cpu_kernel.reset()
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)  # float sums in another order
    assert torch.equal(slow, again)
    assert cpu_kernel.kernel() is not None  # rebuilt from Inductor's cache


def test_failed_build_falls_back_without_crashing(kern, monkeypatch):
    def broken():
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(cpu_kernel, "_build", broken)
    cpu_kernel.reset()
    try:
        codes, groups, row_scale = random_layer(12, 64, 8, 32, seed=6)
        x = torch.randn(1, 64)
        with pytest.warns(RuntimeWarning, match="simulated compiler failure"):
            y = linear(x, codes, groups, row_scale, None, 8, 32, 64)
        ref = cpu_kernel.reference_linear(x, codes, groups, row_scale, None, 8, 32, 64)
        assert torch.equal(y, ref)
    finally:
        monkeypatch.undo()
        cpu_kernel.reset()


def test_compressed_linear_eager_fast_path_matches_the_op(kern):
    from rs_compile.codec.encode import encode
    from rs_compile.modules import CompressedLinear

    layer = CompressedLinear(encode(torch.randn(24, 80) * 0.05, Format(5, 32)), torch.randn(24)).eval()
    x = torch.randn(3, 80)
    with torch.no_grad():
        y = layer(x)
    ref = cpu_kernel.reference_linear(x, layer.codes, layer.groups, layer.row_scale, layer.bias, 5, 32, 80)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # a gradient still flows through the op's autograd
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()
    assert xg.grad is not None and math.isfinite(float(xg.grad.abs().sum()))
