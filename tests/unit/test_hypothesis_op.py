"""Property test: CompressedLinear, rs::linear and its Inductor decomposition against a
float64 F.linear on the decoded weight, over random shapes, formats and input dtypes.

Tolerance: every path rounds the decoded weight to x's dtype and rounds the result once, and
bf16/fp16 products accumulate in float32, so elementwise

    |y - y_ref| <= TOL[dtype] * (|x| @ |W|.T + |b|) + SUB[dtype] * (1 + sum |x|)

The first term is relative to the magnitude of the sum (not of its possibly cancelling result):
TOL is two units of roundoff of the dtype (bf16 2^-7, fp16 2^-10) and, for float32, 2^-17 covering
accumulation of up to 300 products. The second is the absolute rounding below the normal range,
where the spacing is fixed (the subnormal step, 6e-8 for fp16): it bounds the rounding of a tiny
output and of tiny weights cast to x's dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rs_compile.codec.encode import encode
from rs_compile.codec.format import SUPPORTED_BITS, Format
from rs_compile.lowering.linear import linear_decomposition
from rs_compile.modules import CompressedLinear

TOL = {torch.float32: 2.0**-17, torch.bfloat16: 2 * 2.0**-7, torch.float16: 2 * 2.0**-10}
GROUP_SIZES = (8, 16, 24, 32, 64, 128, 256)  # positive multiples of 8, incl. a non power of two
SETTINGS = settings(deadline=None, max_examples=50, derandomize=True)


@st.composite
def layers(draw):
    out_features = draw(st.integers(1, 300))
    in_features = draw(st.integers(1, 300))
    bits = draw(st.sampled_from(SUPPORTED_BITS))
    group_size = draw(st.sampled_from(GROUP_SIZES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) * draw(st.sampled_from([1e-3, 0.05, 3.0]))
    bias = torch.randn(out_features, generator=g) if draw(st.booleans()) else None
    enc = encode(weight, Format(bits, group_size), curvatures=draw(st.integers(1, 4)))
    return CompressedLinear(enc, bias), g


@SETTINGS
@given(layer=layers(), batch=st.integers(0, 5), seq=st.sampled_from([None, 3]),
       dtype=st.sampled_from(list(TOL)))
def test_op_matches_float64_reference(layer, batch, seq, dtype):
    module, g = layer
    shape = (batch, module.in_features) if seq is None else (batch, seq, module.in_features)
    x = torch.randn(shape, generator=g).to(dtype)
    w = module.dequantize().double()
    b = None if module.bias is None else module.bias.double()
    reference = F.linear(x.double(), w, b)
    finfo = torch.finfo(dtype)
    bound = (F.linear(x.double().abs(), w.abs(), None if b is None else b.abs()) * TOL[dtype]
             + finfo.tiny * finfo.eps * (1 + x.double().abs().sum(-1, keepdim=True)))

    y_module = module(x)
    y_decomposed = linear_decomposition(
        x, module.codes, module.groups, module.row_scale, module.bias, module.bits,
        module.group_size, module.in_features)
    for y in (y_module, y_decomposed):
        assert y.dtype == dtype and y.shape == (*shape[:-1], module.out_features)
        assert torch.isfinite(y).all()
        assert ((y.double() - reference).abs() <= bound).all()


@SETTINGS
@given(layer=layers(), delta=st.integers(-8, 8).filter(bool))
def test_wrong_feature_count_is_the_documented_value_error(layer, delta):
    module, _ = layer
    features = module.in_features + delta
    if features < 0:
        features = module.in_features + abs(delta)
    x = torch.randn(2, features)
    with pytest.raises(ValueError, match=f"x has {features} features but the layer expects {module.in_features}"):
        module(x)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_non_float_input_is_the_documented_type_error(dtype):
    module = CompressedLinear(encode(torch.randn(16, 16), Format(4, 8)))
    with pytest.raises(TypeError, match="x must be floating point"):
        module(torch.zeros(2, 16, dtype=dtype))
