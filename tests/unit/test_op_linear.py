"""rs::poincare_linear against a float64 re-computation from the decoded weight."""

import pytest
import torch
import torch.nn.functional as F

from rs_compile.codec import encode
from rs_compile.ops.linear import poincare_linear


def _layer(n=48, k=100, bits=4, group_size=32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    enc = encode(w, bits=bits, group_size=group_size)
    b = torch.randn(n, generator=g) if bias else None
    return enc, b


def _call(x, enc, b):
    return poincare_linear(x, *enc.tensors(), b, enc.bits, enc.group_size, enc.in_features,
                           enc.curv_step)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_linear_on_dequantized_weight(bits, bias):
    enc, b = _layer(bits=bits, bias=bias)
    x = torch.randn(2, 5, 100)
    expected = F.linear(x.double(), enc.dequantize().double(), None if b is None else b.double())
    out = _call(x, enc, b)
    assert out.shape == (2, 5, 48) and out.dtype == torch.float32 and out.is_contiguous()
    # fp32 products of |x|~1, |w|~0.05 summed over 100 terms: error ~1e-6
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_half_outputs(dtype):
    enc, b = _layer()
    x = torch.randn(3, 100)
    out = _call(x.to(dtype), enc, b)
    assert out.dtype == dtype
    expected = F.linear(x.double(), enc.dequantize().double(), b.double())
    # bf16 has 8 mantissa bits: relative error ~2^-8 per operand
    torch.testing.assert_close(out.double(), expected, rtol=3e-2, atol=5e-2)


def test_gradient_flows_to_x_only():
    enc, b = _layer()
    x = torch.randn(4, 100, dtype=torch.float32, requires_grad=True)
    g = torch.randn(4, 48)
    _call(x, enc, b).backward(g)
    expected = g.double() @ enc.dequantize().double()
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_opcheck():
    enc, b = _layer()
    for x, bias in [(torch.randn(3, 100), b), (torch.randn(2, 4, 100, requires_grad=True), None),
                    (torch.randn(0, 100), b)]:
        torch.library.opcheck(
            torch.ops.rs.poincare_linear.default,
            (x, *enc.tensors(), bias, enc.bits, enc.group_size, enc.in_features, enc.curv_step),
        )


def test_packed_tensors_must_be_exactly_what_the_format_stores():
    enc, b = _layer()  # 100 inputs in groups of 32: 4 groups
    one_more_group = [torch.cat([t, t[:, : t.shape[1] // 4]], dim=1) for t in enc.tensors()]
    with pytest.raises(ValueError, match=r"store codes \[48, 64\], scales \[48, 4\], curv \[48, 4\]; "
                                         r"got codes \[48, 80\], scales \[48, 5\], curv \[48, 5\]"):
        poincare_linear(torch.randn(2, 100), *one_more_group, b, 4, 32, 100, 1.0)
    codes, scales, curv = enc.tensors()
    with pytest.raises(TypeError, match="scales torch.float16.*got .*scales torch.float32"):
        poincare_linear(torch.randn(2, 100), codes, scales.float(), curv, b, 4, 32, 100, 1.0)


def test_bad_inputs_raise_clear_errors():
    enc, b = _layer()
    with pytest.raises(ValueError, match="x has 99 features but the layer expects 100"):
        _call(torch.randn(2, 99), enc, b)
    with pytest.raises(TypeError, match="x must be floating point"):
        _call(torch.ones(2, 100, dtype=torch.int64), enc, b)
    with pytest.raises(ValueError, match="bias shape"):
        _call(torch.randn(2, 100), enc, torch.zeros(3))
