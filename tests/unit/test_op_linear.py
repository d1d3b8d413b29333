"""rs::linear against a float64 re-computation from the decoded weight."""

import pytest
import torch
import torch.nn.functional as F

from rs_compile.codec import encode
from rs_compile.codec.format import Format
from rs_compile.ops.linear import linear


def _layer(n=48, k=100, bits=4, group_size=32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    enc = encode(w, Format(bits, group_size))
    b = torch.randn(n, generator=g) if bias else None
    return enc, b


def _call(x, enc, b):
    return linear(x, *enc.tensors(), b, enc.bits, enc.group_size, enc.in_features)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
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
            torch.ops.rs.linear.default,
            (x, *enc.tensors(), bias, enc.bits, enc.group_size, enc.in_features),
        )


def test_trainable_bias_gets_its_gradient():
    """The weight is frozen, the bias is not: a trainable bias (BitFit, or a compiled model with
    frozen compressed weights) must not get a silent grad=None."""
    enc, b = _layer()
    for x in (torch.randn(3, 100, requires_grad=True), torch.randn(2, 5, 100)):
        bias = b.clone().requires_grad_()
        args = (x, *enc.tensors(), bias, enc.bits, enc.group_size, enc.in_features)
        torch.library.opcheck(torch.ops.rs.linear.default, args)
        g = torch.randn(*x.shape[:-1], 48)
        (_call(x, enc, bias) * g).sum().backward()
        torch.testing.assert_close(bias.grad, g.reshape(-1, 48).sum(0))


def test_bad_inputs_raise_clear_errors():
    enc, b = _layer()
    with pytest.raises(ValueError, match="x has 99 features but the layer expects 100"):
        _call(torch.randn(2, 99), enc, b)
    with pytest.raises(TypeError, match="x must be floating point"):
        _call(torch.ones(2, 100, dtype=torch.int64), enc, b)
    with pytest.raises(ValueError, match="bias shape"):
        _call(torch.randn(2, 100), enc, torch.zeros(3))


def test_packed_tensors_that_do_not_match_the_format_are_rejected_before_any_kernel():
    enc, b = _layer(k=100)  # 4 groups of 32
    codes, groups, row_scale = enc.tensors()
    x = torch.randn(2, 100)
    extra = torch.cat([codes, codes[:, :16]], dim=1)  # one group too many: would read past a row
    with pytest.raises(ValueError, match="codes has shape"):
        linear(x, extra, groups, row_scale, b, 4, 32, 100)
    with pytest.raises(ValueError, match="groups has shape"):
        linear(x, codes, groups[:, :3], row_scale, b, 4, 32, 100)
    with pytest.raises(TypeError, match="row_scale must be torch.bfloat16"):
        linear(x, codes, groups, row_scale.float(), b, 4, 32, 100)
    with pytest.raises(ValueError, match="codes has shape"):  # the same bytes read as 8-bit codes
        linear(x, codes, groups, row_scale, b, 8, 16, 100)
