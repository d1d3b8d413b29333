"""The hand-written 4-bit decode kernel ``rs::gemv_w4`` (float and int8 activations) and the int8
activation rounding, against float64 re-derivations, and the lowering that routes decode rows
to the kernel.

Tolerance: with int8 activations the kernel's integer sums are exact and only its float32
epilogue rounds (per group one product and one add, then a sum over groups); with float
activations each of 16 lanes sums at most K / 16 float32 products of x and an exact integer level
(relative error <= K / 16 * 2**-24, 2**-19.6 for K = 768). Either way it agrees with float64 to
well within 2**-17 of |x| @ |W|.T, the bound used, as for the float path.
"""

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from rs_compile import CompressionConfig
from rs_compile.codec.activations import quantize_activations
from rs_compile.codec.encode import encode
from rs_compile.codec.format import unpack_codes
from rs_compile.lowering import gemv_w4
from rs_compile.modules import CompressedLinear

needs_kernel = pytest.mark.skipif(not gemv_w4.available(),
                                  reason="rs::gemv_w4 needs an x86 CPU with AVX2")


def rounded_f64(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """float64 re-derivation of the activation rounding: per row and group, s = max|x| / 127
    (in float32, as stored), x -> round(x / s) * s."""
    k = x.shape[-1]
    xs = x.double().reshape(-1, k)
    out = torch.empty_like(xs)
    for r in range(xs.shape[0]):
        for g0 in range(0, k, group_size):
            v = xs[r, g0:g0 + group_size]
            s = torch.tensor(v.abs().max().item() / 127.0 if v.abs().max() > 0 else 1.0,
                             dtype=torch.float32).double()
            out[r, g0:g0 + group_size] = torch.round(v.float().double() / s) * s
    return out.view(x.shape)


def decoded_f64(layer: CompressedLinear) -> torch.Tensor:
    """float64 decode from the published formula w = s u (1 + c u^2 / 3), u = (q - 7) / 7."""
    q = unpack_codes(layer.codes, 4, layer.group_size).double()
    u = (q - 7.0) / 7.0
    c = layer.curv.double().unsqueeze(-1) * layer.curv_step
    w = layer.scales.double().unsqueeze(-1) * u * (1.0 + c * u * u / 3.0)
    return w.reshape(w.shape[0], -1)[:, :layer.in_features]


def layer_for(n, k, group_size=64, curvatures=4, curv_step=1.0, bias=True, seed=0, act_bits=8):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g) if bias else None
    return CompressedLinear(encode(w, 4, group_size, curvatures, curv_step), b,
                            act_bits=act_bits).eval()


def kernel(layer, x, bias=None):
    """``rs::gemv_w4`` on ``layer``'s codes; ``bias`` overrides the layer's."""
    return torch.ops.rs.gemv_w4(x, layer.codes, layer.scales, layer.curv,
                                layer.bias if bias is None else bias, layer.group_size,
                                layer.in_features, layer.curv_step, layer.act_bits)


def check_close(out, layer, x):
    xq = rounded_f64(x, layer.group_size) if layer.act_bits else x.double()
    w = decoded_f64(layer)
    b = None if layer.bias is None else layer.bias.double()
    ref = F.linear(xq, w, b)
    bound = 2.0**-17 * (F.linear(xq.abs(), w.abs(), None if b is None else b.abs()) + 1e-30)
    assert ((out.double() - ref).abs() <= bound).all(), (out.double() - ref).abs().max()


def test_rounding_matches_a_float64_rederivation_and_uses_int8_levels():
    x = torch.randn(3, 200) * torch.linspace(0.01, 10, 200)
    q = quantize_activations(x, 64)
    assert torch.equal(q.double(), rounded_f64(x, 64).float().double())
    for g0 in range(0, 200, 64):
        v, vq = x[:, g0:g0 + 64], q[:, g0:g0 + 64]
        s = v.abs().amax(-1, keepdim=True) / 127.0
        levels = vq / s
        assert torch.allclose(levels, levels.round(), atol=1e-3) and levels.abs().max() <= 127.001
        assert torch.allclose(vq.abs().amax(-1), v.abs().amax(-1))  # the largest keeps its value


def test_rounding_keeps_zeros_and_nans_so_the_layer_output_is_nan():
    x = torch.zeros(1, 128)
    x[0, 70] = float("nan")
    q = quantize_activations(x, 64)
    assert torch.equal(q[0, :64], torch.zeros(64)) and q[0, 70].isnan()
    assert layer_for(8, 128)(x).isnan().all()


@needs_kernel
@pytest.mark.parametrize("n,k,group_size,rows,bias", [
    (300, 200, 64, 1, True),     # in_features padded to 256
    (64, 768, 64, 3, False),
    (257, 384, 128, 2, True),    # two 32-byte chunks per group, an odd number of groups
    (40, 400, 192, 1, True),     # group size without an unrolled loop, padded to 576
])
@pytest.mark.parametrize("act_bits", [0, 8])
def test_kernel_matches_float64(n, k, group_size, rows, bias, act_bits):
    layer = layer_for(n, k, group_size, bias=bias, act_bits=act_bits)
    x = torch.randn(rows, k) * 2
    check_close(kernel(layer, x), layer, x)


@needs_kernel
def test_kernel_takes_a_half_precision_bias():
    layer = layer_for(32, 128)
    x = torch.randn(1, 128)
    out = kernel(layer, x, bias=layer.bias.half())
    layer.bias.data = layer.bias.half().float()
    check_close(out, layer, x)


@needs_kernel
@pytest.mark.parametrize("curvatures,curv_step,act_bits", [(1, 0.0, 8), (4, 2.0, 8), (62, 1.0, 8),
                                                          (62, 1.0, 0)])
def test_kernel_levels_for_other_curvature_grids(curvatures, curv_step, act_bits):
    layer = layer_for(96, 256, curvatures=curvatures, curv_step=curv_step, act_bits=act_bits)
    x = torch.randn(1, 256)
    check_close(kernel(layer, x), layer, x)


@needs_kernel
@pytest.mark.parametrize("act_bits", [0, 8])
def test_kernel_falls_back_with_a_warning_when_levels_overflow_int16(act_bits):
    layer = layer_for(32, 128, curvatures=4, curv_step=1.0, act_bits=act_bits)
    layer.curv[0, 0] = 62  # 147 * 8 + 62 * 512 > 32767
    x = torch.randn(1, 128)
    with pytest.warns(UserWarning, match="exceeds 61"):
        out = kernel(layer, x)
    check_close(out, layer, x)


@needs_kernel
@pytest.mark.parametrize("act_bits", [0, 8])
def test_kernel_nan_and_inf_activations_are_not_finite_not_garbage(act_bits):
    layer = layer_for(16, 128, act_bits=act_bits)
    x = torch.randn(3, 128)
    x[1, 5], x[2, 100] = float("nan"), float("inf")
    out = kernel(layer, x)
    assert out[0].isfinite().all()
    if act_bits:  # a non-finite group rounds to NaN
        assert out[1:].isnan().all()
    else:  # as the float matmul: NaN, or inf times a level (inf - inf or inf * 0 is NaN)
        assert out[1].isnan().all() and not out[2].isfinite().any()


@needs_kernel
def test_kernel_rejects_what_it_cannot_compute():
    layer = layer_for(16, 128)
    args = (layer.codes, layer.scales, layer.curv, None, 64, 128)
    with pytest.raises(RuntimeError, match="float32 CPU activations"):
        torch.ops.rs.gemv_w4(torch.randn(1, 128, dtype=torch.float64), *args, 1.0, 8)
    with pytest.raises(RuntimeError, match="integer curv_step"):
        torch.ops.rs.gemv_w4(torch.randn(1, 128), *args, 0.5, 8)
    with pytest.raises(RuntimeError, match="act_bits=4"):
        torch.ops.rs.gemv_w4(torch.randn(1, 128), *args, 1.0, 4)


@pytest.fixture(scope="module")
def compiled_layers():
    """One compile each of 4-bit and 8-bit act_bits=8 layers and a 4-bit weight-only one, called
    with 1 and 8 rows."""
    layers = {(bits, act_bits): CompressedLinear(
        encode(torch.randn(96, 200) * 0.05, bits, 64, 4, 1.0), torch.randn(96),
        act_bits=act_bits).eval() for bits, act_bits in ((4, 8), (8, 8), (4, 0))}
    codes = {}
    with torch.inference_mode():
        for key, layer in layers.items():
            fn = torch.compile(layer, backend="realitystone", dynamic=False)
            for rows in (1, 8):
                x = torch.randn(rows, 200)
                out, code = run_and_get_code(fn, x)
                codes[(*key, rows)] = (x, out, "\n".join(code))
    return layers, codes


@needs_kernel
@pytest.mark.parametrize("act_bits", [0, 8])
def test_one_row_4bit_goes_to_the_kernel_and_matches(compiled_layers, act_bits):
    layers, codes = compiled_layers
    x, out, code = codes[4, act_bits, 1]
    assert "extern_kernels.rs_gemv_w4(" in code  # called directly, not through the dispatcher
    check_close(out, layers[4, act_bits], x)


@pytest.mark.parametrize("bits,act_bits,rows", [(4, 8, 8), (8, 8, 1), (8, 8, 8), (4, 0, 8)])
def test_other_shapes_take_inductors_path(compiled_layers, bits, act_bits, rows):
    layers, codes = compiled_layers
    x, out, code = codes[bits, act_bits, rows]
    assert "gemv_w4" not in code
    layer = layers[bits, act_bits]
    xq = rounded_f64(x, 64) if act_bits else x.double()
    ref = F.linear(xq, layer.dequantize().double(), layer.bias.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_act_bits_is_validated_and_kept_by_the_module():
    with pytest.raises(ValueError, match="act_bits=4 is invalid"):
        CompressionConfig(act_bits=4)
    layer = layer_for(16, 64)
    assert layer.meta()["act_bits"] == 8 and "act_bits=8" in repr(layer)
    x = torch.randn(2, 64)
    check_close(layer(x), layer, x)  # the eager op rounds the activations too


@needs_kernel
def test_backend_option_act_bits_rewrites_plain_linears_to_the_kernel():
    """torch.compile(..., options={"act_bits": 8}) on nn.Linear: same rounding, kernel for 1 row."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64))
    compiled = torch.compile(model, backend="realitystone", options={"act_bits": 8}, dynamic=False)
    x = torch.randn(1, 128)
    with torch.inference_mode():
        out, code = run_and_get_code(compiled, x)
    assert "\n".join(code).count("extern_kernels.rs_gemv_w4(") == 2
    first, second = (CompressedLinear(encode(m.weight.detach(), 4, 64, 4, 1.0), m.bias.detach(),
                                      act_bits=8) for m in (model[0], model[2]))
    hidden = torch.relu(first(x))
    check_close(out, second, hidden)


@needs_kernel
@pytest.mark.slow
def test_cpp_wrapper_keeps_the_op_call():
    """Inductor's C++ wrapper cannot call the Python extern kernel: the op goes through the
    dispatcher there, same numbers."""
    import torch._inductor.config as inductor_config

    layer = layer_for(96, 128)
    x = torch.randn(1, 128)
    with inductor_config.patch(cpp_wrapper=True), torch.inference_mode():
        out = torch.compile(layer, backend="realitystone")(x)
    check_close(out, layer, x)
