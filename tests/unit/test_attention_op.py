"""rs::attention: CPU reference, op registration, Inductor lowering and the Triton kernel.

Every numeric check compares with float64 ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor import decomposition as inductor_decomp
from torch._inductor.utils import run_and_get_code

import rs_compile.lowering.attention as lowering
from _attention_reference import sdpa64
from rs_compile.ops.attention import attention, attention_supported

REPO = Path(__file__).resolve().parents[2]
NEG_INF = float("-inf")

lowering.install()


def qkv(b, h, hkv, t, s, d, dtype=torch.float32, requires_grad=False):
    make = lambda *shape: torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)
    return make(b, h, t, d), make(b, hkv, s, d), make(b, hkv, s, d)


def make_mask(kind, b, t, s, dtype=torch.float32):
    return {
        None: None,
        "bool": torch.rand(b, 1, t, s) > 0.3,
        "pad": torch.rand(b, 1, 1, s) > 0.2,  # HF padding form
        "add": torch.randn(t, s, dtype=dtype),
        "add4": torch.randn(b, 1, 1, s, dtype=dtype).masked_fill(torch.rand(b, 1, 1, s) < 0.2, NEG_INF),
    }[kind]


# (B, H, Hkv, T, S, D, mask kind, causal, scale)
CASES = [
    (2, 4, 4, 9, 9, 16, None, False, 0.25),
    (2, 4, 4, 9, 9, 16, None, True, 0.25),
    (2, 4, 2, 9, 9, 16, "bool", False, 0.5),  # GQA
    (2, 6, 1, 7, 7, 8, "add", True, 0.1),  # MQA
    (1, 4, 2, 5, 12, 16, "pad", True, 0.25),  # KV cache, bottom-right causal
    (1, 4, 2, 1, 12, 16, "add4", True, 0.25),  # decoding
    (1, 2, 2, 12, 5, 8, "bool", True, 1.0),  # T > S: first 7 rows fully masked
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_sdpa(case):
    b, h, hkv, t, s, d, kind, causal, scale = case
    torch.manual_seed(0)
    q, k, v = qkv(b, h, hkv, t, s, d)
    mask = make_mask(kind, b, t, s)
    out = attention(q, k, v, mask, causal, scale)
    assert out.shape == (b, h, t, d) and out.dtype == q.dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), sdpa64(q, k, v, mask, causal, scale), atol=1e-5, rtol=1e-5)


def test_causal_alignment():
    """T == S is SDPA's is_causal; decoding (T == 1) attends every cached key."""
    torch.manual_seed(0)
    q, k, v = qkv(1, 2, 2, 6, 6, 8)
    expect = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    torch.testing.assert_close(attention(q, k, v, None, True, 8**-0.5).double(), expect)
    q1 = q[:, :, :1]
    expect = F.scaled_dot_product_attention(q1.double(), k.double(), v.double())
    torch.testing.assert_close(attention(q1, k, v, None, True, 8**-0.5).double(), expect)


def test_fully_masked_rows_are_zero():
    torch.manual_seed(0)
    q, k, v = qkv(1, 2, 2, 4, 6, 8)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1] = False
    additive = torch.zeros(4, 6).masked_fill(~mask, NEG_INF)
    for m in (mask, additive):
        out = attention(q, k, v, m, False, 1.0)
        assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
        assert out[:, :, [0, 2, 3]].abs().sum() > 0


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_inputs(dtype, atol):
    torch.manual_seed(0)
    q, k, v = qkv(1, 4, 2, 40, 40, 16, dtype)
    mask = make_mask("add", 1, 40, 40, dtype)
    out = attention(q, k, v, mask, True, 0.25)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), sdpa64(q, k, v, mask, True, 0.25), atol=atol, rtol=0)


def test_non_contiguous_q_gives_contiguous_output():
    torch.manual_seed(0)
    q = torch.randn(2, 7, 4, 8).transpose(1, 2)  # HF layout [B, T, H, D] viewed as [B, H, T, D]
    _, k, v = qkv(2, 4, 2, 7, 7, 8)
    out = attention(q, k, v, None, True, 0.3)
    assert out.is_contiguous()
    torch.testing.assert_close(out.double(), sdpa64(q, k, v, None, True, 0.3), atol=1e-5, rtol=1e-5)


# Small shapes: gradcheck perturbs every input element.
SMALL_CASES = [
    (1, 4, 2, 3, 3, 4, "bool", False, 0.5),  # GQA
    (1, 2, 1, 3, 5, 4, "add", True, 0.3),  # MQA, KV cache
    (2, 2, 2, 5, 3, 4, "pad", True, 1.0),  # T > S: fully masked rows
]


@pytest.mark.parametrize("case", SMALL_CASES, ids=str)
def test_opcheck(case):
    b, h, hkv, t, s, d, kind, causal, scale = case
    torch.manual_seed(0)
    q, k, v = qkv(b, h, hkv, t, s, d, requires_grad=True)
    torch.library.opcheck(attention, (q, k, v, make_mask(kind, b, t, s), causal, scale))


@pytest.mark.parametrize("case", SMALL_CASES, ids=str)
def test_gradcheck(case):
    b, h, hkv, t, s, d, kind, causal, scale = case
    torch.manual_seed(0)
    q, k, v = qkv(b, h, hkv, t, s, d, torch.float64, requires_grad=True)
    mask = make_mask(kind, b, t, s, torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, mask, causal, scale), (q, k, v))


# The FX-graph and AOT-autograd caches do not key on our decomposition: a stale entry could hide
# a change to it.
@contextlib.contextmanager
def no_graph_caches():
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(
        enable_autograd_cache=False
    ):
        yield


def compiled_code(fn, *args, **compile_kwargs):
    """Output and generated code of a fresh Inductor compile (run_and_get_code resets dynamo)."""
    with no_graph_caches():
        out, code = run_and_get_code(torch.compile(fn, backend="inductor", **compile_kwargs), *args)
    return out, "\n".join(code)


def call_op(q, k, v, mask):
    return torch.ops.rs.attention(q, k, v, mask, True, 0.125)


def assert_lowered_to_flash(code):
    assert "_scaled_dot_product_flash_attention_for_cpu" in code
    assert "torch.ops.rs.attention" not in code  # the op did not survive as a fallback call


@pytest.mark.parametrize("dtype,t,s,atol", [(torch.float32, 20, 20, 1e-5), (torch.bfloat16, 12, 5, 1.6e-2)])
def test_compiled_static(dtype, t, s, atol):
    """T == S uses the kernel's causal flag, T > S (7 rows without keys) a mask; q in HF's
    transposed layout still gives a contiguous output."""
    torch.manual_seed(0)
    q = torch.randn(2, t, 4, 16, dtype=dtype).transpose(1, 2)
    _, k, v = qkv(2, 4, 2, t, s, 16, dtype)
    mask = make_mask("pad", 2, t, s)
    out, code = compiled_code(call_op, q, k, v, mask, dynamic=False)
    assert_lowered_to_flash(code)
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), sdpa64(q, k, v, mask, True, 0.125), atol=atol, rtol=0)


def test_compiled_dynamic():
    """Symbolic T and S, including T != S, where causal is lowered to a [T, S] mask."""
    counter = CompileCounterWithBackend("inductor")
    fn = torch.compile(call_op, backend=counter, dynamic=True)
    torch.manual_seed(0)
    with no_graph_caches():
        for i, (t, s) in enumerate([(9, 17), (5, 23), (13, 31)]):
            q, k, v = qkv(1, 4, 2, t, s, 16)
            mask = make_mask("pad", 1, t, s)
            if i == 0:  # run_and_get_code resets dynamo: first call only
                out, code = run_and_get_code(fn, q, k, v, mask)
                assert_lowered_to_flash("\n".join(code))
            else:
                out = fn(q, k, v, mask)
            expect = sdpa64(q, k, v, mask, True, 0.125)
            torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1  # one symbolic graph served all three shapes


def test_compiled_training():
    """Forward lowered inside the joint graph; gradients from the op's backward formula."""
    torch.manual_seed(0)
    args = qkv(1, 4, 2, 10, 14, 8, requires_grad=True)
    args64 = [x.detach().double().requires_grad_() for x in args]
    mask = make_mask("bool", 1, 10, 14)
    grad = torch.randn(1, 4, 10, 8)
    out, code = compiled_code(lambda q, k, v: call_op(q, k, v, mask), *args)
    assert_lowered_to_flash(code)
    expect = sdpa64(*args64, mask, True, 0.125)
    torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5)
    out.backward(grad)
    expect.backward(grad.double())
    for x, x64 in zip(args, args64):
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)


def test_no_score_matrix_at_1024():
    """GPT-2 small sizes with a padding mask and GQA: no buffer as large as [B, H, T, S], and none
    as large as repeated k/v [B, H, S, D] (flash reads the Hkv heads directly)."""
    b, h, hkv, t, d = 1, 12, 4, 1024, 64
    torch.manual_seed(0)
    q, k, v = qkv(b, h, hkv, t, t, d)
    mask = make_mask("pad", b, t, t)
    out, code = compiled_code(call_op, q, k, v, mask, dynamic=False)
    assert_lowered_to_flash(code)
    sizes = re.findall(r"empty_strided_cpu\(\((\d+(?:, \d+)*),?\)", code)
    assert sizes, "expected the float mask buffer"
    largest = max(eval("*".join(s.split(", "))) for s in sizes)
    assert largest < b * h * t * d, f"largest buffer has {largest} elements"
    torch.testing.assert_close(out.double(), sdpa64(q, k, v, mask, True, 0.125), atol=1e-5, rtol=1e-5)


def test_install_is_idempotent_and_reaches_the_cached_table():
    op = torch.ops.rs.attention.default
    inductor_decomp.decompositions.pop(op)
    inductor_decomp.fast_random_decomps.cache_clear()
    assert op not in inductor_decomp.select_decomp_table()  # now cached without the op
    lowering.install()
    lowering.install()
    assert op in inductor_decomp.select_decomp_table()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    script = Path(__file__).with_name("_triton_attention_check.py")
    run = subprocess.run([sys.executable, str(script)], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def t4(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize(
    "args,reason",
    [
        ((t4(1, 2, 3, 0), t4(1, 2, 3, 0), t4(1, 2, 3, 0), None), "head_dim 0"),
        ((t4(1, 2, 3, 4), t4(1, 2, 3, 4), t4(1, 2, 3, 4), t4(3, 3, dtype=torch.int64)),
         "mask dtype int64 is neither bool nor floating"),
        ((t4(1, 6, 3, 4), t4(1, 4, 3, 4), t4(1, 4, 3, 4), None), "6 query heads are not a multiple of 4 kv heads"),
        ((t4(2, 3, 4), t4(1, 2, 3, 4), t4(1, 2, 3, 4), None), "must be 4-D"),
        ((t4(1, 2, 3, 4), t4(1, 2, 3, 4, dtype=torch.float64), t4(1, 2, 3, 4), None), "share one floating dtype"),
        ((t4(1, 2, 3, 4), t4(1, 2, 3, 4), t4(1, 2, 5, 4), None), "differ in shape"),
        ((t4(1, 2, 3, 4), t4(1, 2, 3, 8), t4(1, 2, 3, 8), None), "do not match q"),
        ((t4(1, 2, 3, 4), t4(1, 2, 5, 4), t4(1, 2, 5, 4), t4(1, 1, 3, 4)), "does not broadcast"),
        ((t4(1, 2, 0, 4), t4(1, 2, 5, 4), t4(1, 2, 5, 4), None), "empty sequence"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_unsupported_inputs_are_explained(args, reason):
    assert reason in attention_supported(*args)
    with pytest.raises(ValueError, match=re.escape(reason)):
        attention(*args, False, 1.0)


def test_supported_inputs_have_no_reason():
    q, k, v = qkv(1, 4, 2, 3, 5, 8)
    for mask in (None, t4(5), t4(3, 5, dtype=torch.float16), t4(1, 4, 3, 5, dtype=torch.bool)):
        assert attention_supported(q, k, v, mask) is None
