"""The Inductor lowering of rs::poincare_linear: numbers against a float64 reference, and the shape
of the code Inductor generates (fused vectorised GEMV for few rows, decode + GEMM for many)."""

import re

import pytest
import torch
import torch.nn.functional as F
from _codegen import buffer_sizes  # tests/_codegen.py
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.cpu_vec_isa import VecAVX2, pick_vec_isa
from torch._inductor.utils import run_and_get_code

from rs_compile.codec.encode import encode
from rs_compile.codec.format import SUPPORTED_BITS, unpack_codes
from rs_compile.lowering.linear import GEMV_MAX_ROWS, code_slots
from rs_compile.modules import CompressedLinear


def compressed(out_features, in_features, bits, group_size, seed=0) -> CompressedLinear:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) * 0.05
    bias = torch.randn(out_features, generator=g)
    return CompressedLinear(encode(weight, bits, group_size, curvatures=4, curv_step=1.0), bias).eval()


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
        outs = []
        for layer in self.layers:
            outs.append(layer(x))
        return outs


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", [24, 64])
def test_code_slots_match_the_format_unpacker(bits, group_size):
    layer = compressed(8, 2 * group_size, bits, group_size)
    q = unpack_codes(layer.codes, bits, group_size)  # [N, ng, G]
    assert torch.equal(torch.cat(code_slots(layer.codes, bits, group_size), dim=-1), q)


def test_compiled_op_matches_reference_for_every_width_and_row_count_without_recompiling():
    model = AllWidths()
    counter = CompileCounterWithBackend("realitystone")
    compiled = torch.compile(model, backend=counter)  # the row count turns dynamic at M=2
    frames = {}
    with torch.no_grad():
        for m in (1, 2, 3, 8, 9, 64):
            x = torch.randn(m, 100, generator=torch.Generator().manual_seed(m))
            for layer, y in zip(model.layers, compiled(x)):
                ref, bound = reference_and_bound(layer, x)
                assert ((y.double() - ref).abs() <= bound).all(), (layer.bits, m)
            frames[m] = counter.frame_count
    # one graph for M=1 (specialised), one GEMV graph for 2 <= M <= 3, one GEMM graph for M > 3
    assert GEMV_MAX_ROWS == 3
    assert frames[9] == frames[64] == frames[8] and frames[3] == frames[2]
    assert counter.frame_count == 3


N, K = 512, 256


@pytest.fixture(scope="module")
def layer():
    # groups of 32: at few rows 4-bit codes in groups of 64 go to the hand-written rs::gemv_w4
    # (tests/unit/test_gemv_w4.py); this is the GEMV Inductor generates for every other format
    return compressed(N, K, 4, 32)


def _code(layer, m):
    torch._dynamo.reset()
    with torch.no_grad():
        _, codes = run_and_get_code(torch.compile(layer, backend="realitystone"), torch.randn(m, K))
    return "\n".join(codes)


def test_one_row_is_a_vectorised_gemv_that_never_stores_the_weight(layer):
    code = _code(layer, 1)
    assert all(n < N * K for n in buffer_sizes(code)), buffer_sizes(code)
    assert "extern_kernels.mm" not in code and "extern_kernels.addmm" not in code
    # a vectorised reduction whose accumulator is one float vector: the narrow width at which
    # bytes widen to int32 in one instruction (float16 in the loop would make it VectorizedN<float,2>)
    assert "at::vec::Vectorized<float> tmp_acc0_vec" in code
    assert "at::vec::convert<int32_t>" in code and "at::vec::convert<float>" in code
    if type(pick_vec_isa()) is VecAVX2:  # the code bytes come in through one SSE load, no memcpy
        assert "_mm_loadl_epi64" in code and "Vectorized<uint8_t>::loadu(" not in code
    if torch.get_num_threads() > 1:  # OpenMP splits the output rows across the cores
        assert "#pragma omp parallel" in code


def test_many_rows_decode_once_then_gemm(layer):
    code = _code(layer, 64)
    assert N * K in buffer_sizes(code)  # the decoded weight
    assert re.search(r"extern_kernels\.(addmm|mm)\(", code)


def _avx2_capable() -> bool:
    with torch._inductor.config.patch({"cpp.simdlen": 256}):
        return type(pick_vec_isa()) is VecAVX2


@pytest.mark.skipif(not _avx2_capable(), reason="the byte-load codegen is AVX2-only")
def test_single_load_of_code_bytes_only_in_graphs_holding_rs_ops(layer):
    """The AVX2 SSE byte load is rs_compile's change to Inductor's codegen: it must not reach the
    kernels of graphs without rs ops (8 uint8 lanes meet 8 float lanes in both graphs here)."""
    def plain(q, y):
        return (q.to(torch.float32) * y).sum(-1)

    q = torch.randint(0, 255, (64, K), dtype=torch.uint8)
    with torch._inductor.config.patch({"cpp.simdlen": 256, "fx_graph_cache": False}):
        rs_code = _code(layer, 1)
        torch._dynamo.reset()
        _, codes = run_and_get_code(torch.compile(plain), q, torch.randn(64, K))
    plain_code = "\n".join(codes)
    assert "_mm_loadl_epi64" in rs_code
    assert "Vectorized<uint8_t>::loadu(" in plain_code and "_mm_loadl_epi64" not in plain_code
