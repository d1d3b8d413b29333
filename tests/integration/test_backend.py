"""End to end through torch.compile(backend="realitystone") on small models.

Reference for "matches eager": the same model after rs_compile.convert, run eagerly. Encoding is
deterministic and row-independent, so both paths multiply by exactly the same decoded weights; the
only differences are fp32 summation order (fused reduction vs BLAS), hence rtol/atol ~1e-4.
Against the original fp32 model the difference is the codec's error (4-bit: a few percent of the
output norm per layer on random weights), checked with a loose bound that a broken codec
(relative error ~1) cannot meet.
"""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import rs_compile
from rs_compile.models import configs


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_entry_point_without_import_matches_eager():
    script = textwrap.dedent("""
        import sys, torch
        from torch import nn
        assert "rs_compile" not in sys.modules
        assert "realitystone" in torch._dynamo.list_backends()
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).eval()
        x = torch.randn(4, 256)
        with torch.no_grad():
            out = torch.compile(m, backend="realitystone")(x)
            import copy, rs_compile
            ref = rs_compile.convert(copy.deepcopy(m))(x)
            dense = m(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        err = float((out - dense).norm() / dense.norm())
        assert err < 0.2, err
        print("OK", err)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("OK")


MODELS = {
    "gpt2": (configs.gpt2, 2, 4, {"lm_head"}),
    "bert": (configs.bert, 2, 6, set()),
    "llama": (configs.llama, 2, 7, set()),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def inspected(request):
    build, layers, per_layer, tied = MODELS[request.param]
    model = build("tiny")
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    backend = rs_compile.backend(attention=False)
    backend.report = rs_compile.Report()
    with torch.no_grad():
        out = _logits(torch.compile(model, backend=backend)(ids))
    return request.param, model, ids, backend.report, out, layers, per_layer, tied


def _logits(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_every_linear_is_rewritten(inspected):
    name, model, _, report, _, layers, per_layer, tied = inspected
    linears = {n for n, m in model.named_modules()
               if type(m) is nn.Linear or type(m).__name__ == "Conv1D"}
    rewritten = {r.module for r in report.linear_rewrites}
    assert len(report.linear_rewrites) >= per_layer * layers
    assert rewritten == linears - tied, (name, linears - rewritten)
    assert {s.module for s in report.skipped} == tied
    if tied:
        assert "tied" in report.skipped[0].reason


def test_compiled_matches_eager_within_codec_error(inspected):
    name, model, ids, _, out, *_ = inspected
    converted = rs_compile.convert(copy.deepcopy(model), embeddings=False)  # as the backend does
    with torch.no_grad():
        ref, dense = (_logits(f(ids)) for f in (converted, model))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert rel_err(out, dense) < 0.3


def test_converted_gpt2_is_6x_smaller_and_dequantize_reproduces_the_op():
    model = configs.gpt2("tiny")
    dense_bytes = {n: m.weight.numel() * 4 for n, m in model.named_modules()
                   if type(m).__name__ == "Conv1D"}
    rs_compile.convert(model, embeddings=False)
    compressed = {n: m for n, m in model.named_modules()
                  if isinstance(m, rs_compile.CompressedLinear)}
    assert set(compressed) == set(dense_bytes)
    for n, m in compressed.items():
        packed = sum(b.numel() * b.element_size() for k, b in m.named_buffers() if k != "bias")
        assert dense_bytes[n] / packed >= 6.0, (n, dense_bytes[n] / packed)
        assert not any(b.numel() == m.in_features * m.out_features and b.is_floating_point()
                       for b in m.buffers())
        x = torch.randn(3, m.in_features)
        expected = torch.nn.functional.linear(x.double(), m.dequantize().double(), m.bias.double())
        torch.testing.assert_close(m(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_converted_model_is_not_compressed_twice():
    model = rs_compile.convert(configs.gpt2("tiny"))
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(1))
    report = rs_compile.inspect(model, ids, attention=False)
    assert report.linear_rewrites == []
    assert "rs.linear" in report.graph_before
    assert report.max_abs_error < 1e-4
