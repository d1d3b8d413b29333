"""The attention and q/k/v-fusion passes on small hand-written modules, without Inductor.

A capturing dynamo backend runs the passes and executes the rewritten FX graph eagerly, so each
case costs a dynamo trace only. Reference: the same function run eagerly (no dynamo). rs::attention
computes the same fp32 math in another order, hence atol 1e-5 on outputs of size ~1.
Every case runs two sequence lengths: the second compiles a dynamic-shape graph, which must be
rewritten too.
"""

import copy
import math

import expecttest
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rs_compile
from rs_compile.config import split_options
from rs_compile.passes.attention import rewrite_attention
from rs_compile.passes.graph import GraphRewrite
from rs_compile.passes.linear import compress_linears
from rs_compile.passes.qkv import fuse_qkv_projections
from rs_compile.report import Report, readable_graph

B, H, HKV, D = 2, 4, 2, 16
BITS8 = split_options({"bits": 8})  # (EncodingConfig, CompileConfig)


class Capture:
    """Dynamo backend: run ``passes`` on each graph, then execute the rewritten graph eagerly."""

    def __init__(self, passes=(rewrite_attention,), configs=BITS8):
        self.passes, self.configs = passes, configs
        self.report = Report()
        self.compiles = []  # (rewrite counts per pass, dynamic?, rewritten GraphModule)

    def __call__(self, gm, example_inputs):
        rw = GraphRewrite(gm, example_inputs)
        counts = [p(rw, *self.configs, self.report) for p in self.passes]
        new = rw.finish()
        dynamic = any(isinstance(n.meta.get("example_value"), torch.SymInt)
                      for n in gm.graph.nodes if n.op == "placeholder")
        self.compiles.append((counts, dynamic, new))
        extras = tuple(rw.extra_inputs)
        return lambda *args: new(*args, *extras)


def run(fn, inputs_per_call, capture=None):
    """Compile ``fn`` with a Capture backend; returns (capture, compiled outputs, eager outputs)."""
    torch._dynamo.reset()  # each case starts from a static compile
    capture = capture or Capture()
    compiled = torch.compile(fn, backend=capture, fullgraph=True)
    with torch.no_grad():
        outs = [compiled(*inputs) for inputs in inputs_per_call]
        refs = [fn(*inputs) for inputs in inputs_per_call]
    return capture, outs, refs


def qkv(t, s=None, hkv=H, seed=0):
    g = torch.Generator().manual_seed(seed + t)
    s = s or t
    return (torch.randn(B, H, t, D, generator=g), torch.randn(B, hkv, s, D, generator=g),
            torch.randn(B, hkv, s, D, generator=g))


def padding_mask(t, dtype=torch.float32):
    """[B, 1, 1, T]: the last two keys of batch 1 are padding."""
    keep = torch.ones(B, 1, 1, t, dtype=torch.bool)
    keep[1, ..., -2:] = False
    if dtype == torch.bool:
        return keep
    return torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)


def repeat_kv(x, n):
    b, hkv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, hkv, n, s, d).reshape(b, hkv * n, s, d)


# --- eager forms -------------------------------------------------------------------------------

def gpt2_eager(q, k, v, mask):
    w = torch.matmul(q, k.transpose(-1, -2)) * 0.25 + mask
    w = F.softmax(w, dim=-1).type(q.dtype)
    w = F.dropout(w, p=0.0, training=False)
    return torch.matmul(w, v)


def bert_eager(q, k, v, mask):
    w = q @ k.transpose(2, 3) / math.sqrt(D)
    w = (w + mask).softmax(-1)
    return nn.functional.dropout(w, p=0.1, training=False) @ v


def causal_masked_fill(q, k, v, mask):
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    w = torch.matmul(q, k.permute(0, 1, 3, 2)) * 0.3
    w = w.masked_fill(~causal, float("-inf"))
    return torch.softmax(w, dim=3) @ v


def causal_where_then_padding(q, k, v, mask):
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    w = torch.matmul(q, k.transpose(-2, -1)) / 4.0
    w = torch.where(causal, w, torch.finfo(w.dtype).min)
    return F.softmax(w + mask, dim=-1) @ v


def unscaled_bias_upcast(q, k, v, mask):
    w = torch.matmul(q, k.transpose(3, 2)) + mask
    return F.softmax(w.float(), dim=-1).type_as(w) @ v


def llama_repeat_kv(q, k, v, mask):
    k, v = repeat_kv(k, H // HKV), repeat_kv(v, H // HKV)
    w = torch.matmul(q, k.transpose(2, 3)) * D**-0.5 + mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(F.dropout(w, p=0.0, training=False), v)


def repeat_interleave_gqa(q, k, v, mask):
    k, v = k.repeat_interleave(H // HKV, dim=1), torch.repeat_interleave(v, H // HKV, dim=1)
    return torch.matmul(torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1), v)


# --- SDPA forms --------------------------------------------------------------------------------

def sdpa_default_scale(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_causal_scale(q, k, v, mask):
    return torch._C._nn.scaled_dot_product_attention(q, k, v, None, 0.0, True, scale=0.3)


def sdpa_causal_shorter_query(q, k, v, mask):
    """SDPA's is_causal is top-left aligned: query i sees keys 0..i even when T < S."""
    return F.scaled_dot_product_attention(q[:, :, 2:], k, v, is_causal=True)


def sdpa_bool_mask(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask > -1, dropout_p=0.0)


def sdpa_float_mask_gqa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2, enable_gqa=True)


def sdpa_repeat_kv(q, k, v, mask):
    return F.scaled_dot_product_attention(q, repeat_kv(k, H // HKV), repeat_kv(v, H // HKV),
                                          attn_mask=mask)


FORMS = {  # fn -> (pattern, kv heads)
    gpt2_eager: ("eager", H), bert_eager: ("eager", H), causal_masked_fill: ("eager", H),
    causal_where_then_padding: ("eager", H), unscaled_bias_upcast: ("eager", H),
    llama_repeat_kv: ("eager", HKV), repeat_interleave_gqa: ("eager", HKV),
    sdpa_default_scale: ("sdpa", H), sdpa_causal_scale: ("sdpa", H),
    sdpa_causal_shorter_query: ("sdpa", H), sdpa_bool_mask: ("sdpa", H),
    sdpa_float_mask_gqa: ("sdpa", HKV), sdpa_repeat_kv: ("sdpa", HKV),
}


@pytest.mark.parametrize("fn", FORMS, ids=lambda f: f.__name__)
def test_form_is_rewritten_and_matches_eager(fn):
    pattern, hkv = FORMS[fn]
    calls = [(*qkv(t, hkv=hkv), padding_mask(t)) for t in (8, 11)]
    cap, outs, refs = run(fn, calls)
    assert [(c[0], c[1]) for c in cap.compiles] == [([1], False), ([1], True)]
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert [a.pattern for a in cap.report.attention_rewrites] == [pattern, pattern]
    assert cap.report.skipped == []
    for _, _, gm in cap.compiles:
        ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        assert ops.count(torch.ops.rs.attention.default) == 1
        assert F.softmax not in ops and F.scaled_dot_product_attention not in ops
        # k/v reach the op with kv heads: repeat_kv / repeat_interleave are gone
        node = next(n for n in gm.graph.nodes if n.target is torch.ops.rs.attention.default)
        assert node.args[1].op == "placeholder" and node.args[2].op == "placeholder"


# --- near misses: the graph is left alone and the reason recorded -------------------------------

def softmax_over_queries(q, k, v, mask):
    return F.softmax(q @ k.transpose(-1, -2), dim=-2) @ v


def returns_weights(q, k, v, mask):
    w = F.softmax(q @ k.transpose(-1, -2) * 0.25 + mask, dim=-1)
    return w @ v, w


def int64_mask(q, k, v, mask):
    return F.softmax(q @ k.transpose(-1, -2) + mask.long(), dim=-1) @ v


def scale_after_mask(q, k, v, mask):
    return F.softmax((q @ k.transpose(-1, -2) + mask) * 0.25, dim=-1) @ v


def v_head_dim_differs(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v[..., :8])


NEAR_MISSES = {
    softmax_over_queries: "softmax over dim -2, not the last dim",
    returns_weights: "attention weights are returned to the caller (output_attentions)",
    int64_mask: "mask dtype int64 is neither bool nor floating",
    scale_after_mask: "scores are scaled after the mask is added",
    v_head_dim_differs: "differ in shape",
}


@pytest.mark.parametrize("fn", NEAR_MISSES, ids=lambda f: f.__name__)
def test_near_miss_keeps_the_original_and_says_why(fn):
    calls = [(*qkv(t), padding_mask(t)) for t in (8, 11)]
    cap, outs, refs = run(fn, calls)
    assert [c[0] for c in cap.compiles] == [[0], [0]]
    assert cap.report.attention_rewrites == []
    reasons = [s.reason for s in cap.report.skipped]
    assert len(reasons) == 2 and all(NEAR_MISSES[fn] in r for r in reasons), reasons
    torch.testing.assert_close(outs, refs, rtol=1e-5, atol=1e-5)


def eager_dropout_in_training(q, k, v, mask):
    return F.dropout(F.softmax(q @ k.transpose(-1, -2), dim=-1), p=0.1, training=True) @ v


def sdpa_dropout(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)


@pytest.mark.parametrize("fn, reason", [
    (eager_dropout_in_training, "dropout p=0.1 in training"),
    (sdpa_dropout, "dropout_p=0.1 (rs::attention has no dropout)"),
])
def test_dropout_is_a_near_miss(fn, reason):
    cap, outs, _ = run(fn, [(*qkv(8), None)])  # random output: only the decision is checked
    assert cap.compiles[0][0] == [0]
    assert [s.reason for s in cap.report.skipped] == [f"attention not rewritten: {reason}"]
    assert outs[0].shape == (B, H, 8, D)


# --- a mask that is only the causal rule becomes causal=True ------------------------------------

def index_causal(t, s, q_first, kv_first=0):
    """transformers' causal mask: ``kv_idx <= q_idx`` on arange positions, expanded to [B, 1, T, S]."""
    q_idx = (torch.arange(t) + q_first)[None, None, :, None]
    kv_idx = (kv_first + torch.arange(s))[None, None, None, :]
    return (kv_idx <= q_idx).expand(B, -1, t, s)


def eager_with(cond_fn, masked=None):
    """Eager attention with ``where(cond, 0, masked)`` as its additive mask (finfo.min default)."""
    def fn(q, k, v, mask):
        t, s = q.shape[2], k.shape[2]
        fill = torch.finfo(q.dtype).min if masked is None else masked
        bias = torch.where(cond_fn(t, s), torch.zeros(()), fill)
        return F.softmax(q @ k.transpose(-1, -2) * 0.25 + bias, dim=-1) @ v
    return fn


def sdpa_index_causal(q, k, v, mask):
    t, s = q.shape[2], k.shape[2]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=index_causal(t, s, s - t))


CAUSAL_RULES = {  # name -> (fn, query rows cut off q, folded into causal=True?)
    "eager T == S": (eager_with(lambda t, s: index_causal(t, s, 0)), 0, True),
    "eager KV cache, offsets": (eager_with(lambda t, s: index_causal(t, s, s - t + 5, 5)), 3, True),
    "eager -inf": (eager_with(lambda t, s: index_causal(t, s, 0), float("-inf")), 0, True),
    "sdpa bool": (sdpa_index_causal, 3, True),
    # kept as a mask: not the op's alignment, a finite fill that is not the dtype's minimum,
    # or fully masked rows (the first query sees no key), where mask and causal rule differ
    "eager top-left with T < S": (eager_with(lambda t, s: index_causal(t, s, 0)), 3, False),
    "eager fill -1e4": (eager_with(lambda t, s: index_causal(t, s, 0), -1e4), 0, False),
    "eager diagonal masked": (eager_with(lambda t, s: index_causal(t, s, -1)), 0, False),
}


@pytest.mark.parametrize("case", CAUSAL_RULES)
def test_causal_rule_mask_is_folded_only_when_exact(case):
    """q, k, v split from one tensor, as in a model: T and S stay related in the dynamic graph."""
    fn, cut, folded = CAUSAL_RULES[case]

    def split_qkv(x):
        q, k, v = x.split(D, dim=-1)
        return fn(q[:, :, cut:], k, v, None)

    calls = [(torch.cat(qkv(t), dim=-1),) for t in (8, 11)]
    cap, outs, refs = run(split_qkv, calls)
    assert [c[0] for c in cap.compiles] == [[1], [1]]
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for _, _, gm in cap.compiles:
        node = next(n for n in gm.graph.nodes if n.target is torch.ops.rs.attention.default)
        mask, causal = node.args[3:5]
        assert (mask is None, causal) == (folded, folded)


def test_attention_option_off_rewrites_nothing():
    cap = Capture(configs=split_options({"bits": 8, "attention": False}))
    cap, _, _ = run(gpt2_eager, [(*qkv(8), padding_mask(8))], cap)
    assert cap.compiles[0][0] == [0] and cap.report.skipped == []


# --- q/k/v projection fusion ---------------------------------------------------------------------

class TinyAttention(nn.Module):
    """Llama-like block: q/k/v projections of one input, RoPE-free GQA eager attention."""

    def __init__(self, hidden=64, bias=(True, False, True)):
        super().__init__()
        self.q_proj = nn.Linear(hidden, H * D, bias=bias[0])
        self.k_proj = nn.Linear(hidden, HKV * D, bias=bias[1])
        self.v_proj = nn.Linear(hidden, HKV * D, bias=bias[2])
        self.o_proj = nn.Linear(H * D, hidden)

    def forward(self, x, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, D).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, D).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, D).transpose(1, 2)
        out = llama_repeat_kv(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def tiny_attention(**kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinyAttention(**kw).eval()


def block_inputs(t):
    return torch.randn(B, t, 64, generator=torch.Generator().manual_seed(t)), padding_mask(t)


ALL_PASSES = (rewrite_attention, fuse_qkv_projections, compress_linears)


@pytest.mark.parametrize("bias", [(True, False, True), (False, False, False)])
def test_qkv_fusion_matches_converted_model(bias):
    model = tiny_attention(bias=bias)
    cap, outs, _ = run(model, [block_inputs(t) for t in (8, 11)], Capture(ALL_PASSES))
    assert [c[0] for c in cap.compiles] == [[1, 1, 1], [1, 1, 1]]
    assert cap.report.fused_qkv == 2
    patterns = sorted((r.module, r.pattern) for r in cap.report.linear_rewrites[:4])
    assert patterns == [("k_proj", "fused_qkv"), ("o_proj", "linear"), ("q_proj", "fused_qkv"),
                        ("v_proj", "fused_qkv")]
    # Reference: the same decoded weights in eager nn modules (rs_compile.convert)
    ref = rs_compile.convert(copy.deepcopy(model), bits=8)
    for out, t in zip(outs, (8, 11)):
        torch.testing.assert_close(out, ref(*block_inputs(t)), rtol=1e-5, atol=1e-5)


def test_qkv_fusion_respects_linear_skip_rules():
    cap = Capture(ALL_PASSES, split_options({"bits": 8, "min_features": 48}))
    cap, _, _ = run(tiny_attention(), [block_inputs(8)], cap)
    assert cap.compiles[0][0] == [1, 0, 2]  # q_proj, o_proj compressed alone; k/v stay dense
    assert cap.report.skipped[0].reason == (
        "q/k/v projections not fused: k_proj: weight (32, 64) smaller than min_features=48")


def test_qkv_fusion_option_off():
    cap = Capture(ALL_PASSES, split_options({"bits": 8, "fuse_qkv": False}))
    cap, _, _ = run(tiny_attention(), [block_inputs(8)], cap)
    assert cap.compiles[0][0] == [1, 0, 4] and cap.report.fused_qkv == 0


class GoldenGraph(expecttest.TestCase):
    def test_rewritten_block(self):
        """One fused q/k/v op, split; repeat_kv and the softmax chain replaced by rs::attention."""
        cap, _, _ = run(tiny_attention(), [block_inputs(8)], Capture(ALL_PASSES))
        calls = [line for line in readable_graph(cap.compiles[0][2]).splitlines()
                 if " = placeholder[" not in line]
        self.assertExpectedInline("\n".join(calls), """\
%linear_default : [num_users=1] = call_function[target=torch.ops.rs.linear.default](args = (%l_x_, %rs_qkv_codes, %rs_qkv_groups, %rs_qkv_row_scale, %rs_qkv_bias, 8, 32, 64), kwargs = {})
%split : [num_users=3] = call_function[target=torch.functional.split](args = (%linear_default, [64, 32, 32]), kwargs = {dim: -1})
%getitem_2 : [num_users=1] = call_function[target=operator.getitem](args = (%split, 0), kwargs = {})  # q_proj
%contiguous : [num_users=1] = call_method[target=contiguous](args = (%getitem_2,), kwargs = {})  # q_proj
%getitem_3 : [num_users=1] = call_function[target=operator.getitem](args = (%split, 1), kwargs = {})  # k_proj
%contiguous_1 : [num_users=1] = call_method[target=contiguous](args = (%getitem_3,), kwargs = {})  # k_proj
%getitem_4 : [num_users=1] = call_function[target=operator.getitem](args = (%split, 2), kwargs = {})  # v_proj
%contiguous_2 : [num_users=1] = call_method[target=contiguous](args = (%getitem_4,), kwargs = {})  # v_proj
%view : [num_users=1] = call_method[target=view](args = (%contiguous, 2, 8, -1, 16), kwargs = {})
%q : [num_users=1] = call_method[target=transpose](args = (%view, 1, 2), kwargs = {})
%view_1 : [num_users=1] = call_method[target=view](args = (%contiguous_1, 2, 8, -1, 16), kwargs = {})
%k : [num_users=1] = call_method[target=transpose](args = (%view_1, 1, 2), kwargs = {})
%view_2 : [num_users=1] = call_method[target=view](args = (%contiguous_2, 2, 8, -1, 16), kwargs = {})
%v : [num_users=1] = call_method[target=transpose](args = (%view_2, 1, 2), kwargs = {})
%attention_default : [num_users=1] = call_function[target=torch.ops.rs.attention.default](args = (%q, %k, %v, %l_mask_, False, 0.25), kwargs = {})
%transpose_4 : [num_users=1] = call_method[target=transpose](args = (%attention_default, 1, 2), kwargs = {})
%reshape_2 : [num_users=1] = call_method[target=reshape](args = (%transpose_4, 2, 8, -1), kwargs = {})
%linear_default_1 : [num_users=1] = call_function[target=torch.ops.rs.linear.default](args = (%reshape_2, %rs_o_proj_codes, %rs_o_proj_groups, %rs_o_proj_row_scale, %l_self_modules_o_proj_parameters_bias_, 8, 32, 64), kwargs = {})  # o_proj
return (linear_default_1,)""")
