"""The Inductor lowering of rs::linear: numbers against a float64 reference, and the shape of the
code Inductor generates (decode the weight once into a buffer, then one GEMM)."""

import re

import pytest
import torch
import torch.nn.functional as F
from _codegen import buffer_sizes  # tests/_codegen.py
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.utils import run_and_get_code

from rs_compile.codec.encode import encode
from rs_compile.codec.format import SUPPORTED_BITS, Format
from rs_compile.lowering import cpu_kernel
from rs_compile.modules import CompressedLinear


def compressed(out_features, in_features, bits, group_size, seed=0) -> CompressedLinear:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) * 0.05
    bias = torch.randn(out_features, generator=g)
    return CompressedLinear(encode(weight, Format(bits, group_size)), bias).eval()


def reference_and_bound(layer: CompressedLinear, x: torch.Tensor):
    """float64 F.linear on the decoded weight, and a float32 rounding bound relative to |x| @ |W|.T."""
    w = layer.dequantize().double()
    ref = F.linear(x.double(), w, layer.bias.double())
    bound = 2.0**-17 * (F.linear(x.double().abs(), w.abs(), layer.bias.double().abs()) + 1e-30)
    return ref, bound


class AllWidths(nn.Module):
    def __init__(self):
        super().__init__()
        # 100 input features: not a multiple of the group, so the padded tail is exercised
        self.layers = nn.ModuleList(compressed(40, 100, bits, 32, seed=bits) for bits in SUPPORTED_BITS)

    def forward(self, x):
        return [layer(x) for layer in self.layers]


def test_compiled_op_matches_reference_for_every_width_and_row_count_without_recompiling():
    model = AllWidths()
    counter = CompileCounterWithBackend("realitystone")
    compiled = torch.compile(model, backend=counter)  # the row count turns dynamic at M=2
    with torch.no_grad():
        for m in (1, 2, 3, 8, 64):
            x = torch.randn(m, 100, generator=torch.Generator().manual_seed(m))
            for layer, y in zip(model.layers, compiled(x)):
                ref, bound = reference_and_bound(layer, x)
                assert ((y.double() - ref).abs() <= bound).all(), (layer.bits, m)
    assert counter.frame_count == 2  # M=1 (specialised), then one dynamic graph


N, K = 512, 256


@pytest.fixture(scope="module")
def layer():
    return compressed(N, K, 4, 32)


def test_many_rows_call_the_kernel_which_decodes_then_gemms(layer):
    """With the CPU kernel available the graph calls it directly for every row count (it picks
    its GEMV or decoded tiles + BLAS per call): no decoded weight in the graph, no guard on M."""
    assert cpu_kernel.kernel() is not None, cpu_kernel.status()
    torch._dynamo.reset()
    x = torch.randn(64, K)
    with torch.no_grad():
        y, codes = run_and_get_code(torch.compile(layer, backend="realitystone"), x)
    code = "\n".join(codes)
    assert "extern_kernels.rs_cpu_linear(" in code
    assert N * K not in buffer_sizes(code)
    ref, bound = reference_and_bound(layer, x)
    assert ((y.double() - ref).abs() <= bound).all()


def test_without_the_kernel_many_rows_decode_once_then_gemm(layer, monkeypatch):
    monkeypatch.setitem(cpu_kernel._state, "tried", True)
    monkeypatch.setitem(cpu_kernel._state, "kernel", None)
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        _, codes = run_and_get_code(torch.compile(layer, backend="realitystone"), torch.randn(64, K))
    torch._dynamo.reset()
    code = "\n".join(codes)
    assert N * K in buffer_sizes(code)  # the decoded weight
    assert re.search(r"extern_kernels\.(addmm|mm)\(", code)
    assert "rs_cpu_linear" not in code


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_decomposition_with_a_partial_last_group(bits):
    """Inductor once left the partial last group of 8-bit codes unwritten (NaN outputs) when the
    decode sliced the padded rows back; the decode now cuts that group apart."""
    layer = compressed(24, 80, bits, 32)
    x = torch.randn(1, 80, dtype=torch.float64)  # float64: no CPU kernel, the decomposition runs
    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(layer, backend="inductor", fullgraph=True)(x)
    ref, bound = reference_and_bound(layer, x)
    assert ((y.double() - ref).abs() <= bound).all()
