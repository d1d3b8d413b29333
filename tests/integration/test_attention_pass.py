"""Attention rewrite and q/k/v fusion on tiny GPT-2, BERT and Llama (GQA), eager and SDPA attention.

The backend below is compile_graph's flow with the two new passes ahead of compress_linears, then
Inductor. Each model runs two sequence lengths: the second forces dynamo's dynamic-shape recompile,
which must be rewritten the same way.

Inductor compiles (two per model) are most of this module's time, so each model goes through
Inductor with one attention implementation and runs the other's rewritten graph eagerly (the op's
CPU reference). After the rewrite both hand Inductor the same op and differ only in its mask and
causal arguments, whose lowering tests/unit/test_attention_op.py covers (static, dynamic, GQA,
masks, causal). Through Inductor: GPT-2 eager, BERT SDPA, Llama SDPA (GQA), all with a padding
mask; test_unpadded_causal_mask_becomes_the_causal_flag covers the unpadded causal form.

References, bits=8:
* tight: the same model after ``rs_compile.convert`` (the same decoded weights in eager nn
  modules, the model's own attention code). Only fp32 summation order differs: rtol/atol 1e-4.
* loose: the original fp32 model. The difference is the 8-bit codec's error: 0.06-0.84% of the
  output norm measured on these random weights, bound 2%; a broken codec is off by O(1).
"""

import copy

import pytest
import torch

import rs_compile
from rs_compile.backend import _static_fakes
from rs_compile.config import split_options
from rs_compile.lowering import install_lowerings
from rs_compile.lowering.cache import inductor_config_patches
from rs_compile.models import configs
from rs_compile.passes.attention import rewrite_attention
from rs_compile.passes.graph import GraphRewrite
from rs_compile.passes.linear import compress_linears
from rs_compile.passes.qkv import fuse_qkv_projections
from rs_compile.report import Report

CONFIGS = split_options({"bits": 8})  # (EncodingConfig, CompileConfig)
LAYERS = 2
MODELS = {"gpt2": (configs.gpt2, 0), "bert": (configs.bert, 2), "llama": (configs.llama, 2)}
LENGTHS = (8, 13)
# (model, attention implementation, through Inductor?)
CASES = [("gpt2", "eager", True), ("gpt2", "sdpa", False), ("bert", "eager", False),
         ("bert", "sdpa", True), ("llama", "eager", False), ("llama", "sdpa", True)]


class AttentionBackend:
    """compile_graph with rewrite_attention and fuse_qkv_projections; Inductor optional."""

    def __init__(self, configs=CONFIGS, inductor=True):
        self.configs, self.inductor = configs, inductor
        self.compiles: list[tuple[Report, bool]] = []  # per graph: its report, dynamic shapes?

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        install_lowerings()
        rw = GraphRewrite(gm, example_inputs)
        report = Report()
        for rewrite in (rewrite_attention, fuse_qkv_projections, compress_linears):
            rewrite(rw, *self.configs, report)
        new_gm = rw.finish()
        dynamic = any(isinstance(n.meta.get("example_value"), torch.SymInt)
                      for n in gm.graph.nodes if n.op == "placeholder")
        self.compiles.append((report, dynamic))
        extras = tuple(rw.extra_inputs)
        if not self.inductor:
            return lambda *args: new_gm(*args, *extras)
        compiled = compile_fx(new_gm, [*example_inputs, *_static_fakes(example_inputs, extras)],
                              config_patches=inductor_config_patches())
        return lambda *args: compiled(*args, *extras)


def inputs(t):
    ids = torch.randint(0, 1000, (2, t), generator=torch.Generator().manual_seed(t))
    mask = torch.ones(2, t, dtype=torch.long)
    mask[1, -3:] = 0  # right padding in the second sequence
    return dict(input_ids=ids, attention_mask=mask)


def output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module", params=CASES,
                ids=lambda p: f"{p[0]}-{p[1]}-{'inductor' if p[2] else 'passes'}")
def compiled(request):
    """Compile once per model and attention implementation; run both lengths."""
    name, attn, inductor = request.param
    build, fused = MODELS[name]
    model = build("tiny", attn_implementation=attn)
    reference = rs_compile.convert(copy.deepcopy(model), bits=CONFIGS[0].bits, embeddings=False)
    torch._dynamo.reset()  # the first length compiles static, the second dynamic
    backend = AttentionBackend(inductor=inductor)
    opt = torch.compile(model, backend=backend)
    with torch.no_grad():
        runs = [(output(opt(**inputs(t))), output(reference(**inputs(t))),
                 output(model(**inputs(t)))) for t in LENGTHS]
    return attn, fused, backend.compiles, runs


def test_one_rewrite_per_layer_in_static_and_dynamic_graphs(compiled):
    attn, fused, compiles, _ = compiled
    assert [dynamic for _, dynamic in compiles] == [False, True]
    for report, _ in compiles:
        assert [a.pattern for a in report.attention_rewrites] == [attn] * LAYERS
        assert not [s for s in report.skipped if "attention" in s.reason or "q/k/v" in s.reason]
        assert report.fused_qkv == fused
        assert sum(r.pattern == "fused_qkv" for r in report.linear_rewrites) == 3 * fused


def test_outputs_match_eager_at_both_lengths(compiled):
    _, _, _, runs = compiled
    for out, converted, dense in runs:
        torch.testing.assert_close(out, converted, rtol=1e-4, atol=1e-4)
        rel = float((out - dense).norm() / dense.norm())
        assert rel < 0.02, rel


def near_misses(model, **kwargs):
    """Reasons recorded for one forward through the passes (graph run eagerly, no Inductor)."""
    torch._dynamo.reset()
    backend = AttentionBackend(inductor=False)
    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs(8), **kwargs)
    report = Report()  # output_attentions installs hooks: graph breaks, several graphs
    for local, _ in backend.compiles:
        report.extend(local)
    return report.attention_rewrites, [s.reason for s in report.skipped if "attention" in s.reason]


@pytest.mark.parametrize("name", MODELS)
def test_output_attentions_is_a_near_miss(name):
    model = MODELS[name][0]("tiny", attn_implementation="eager")
    rewrites, reasons = near_misses(model, output_attentions=True)
    assert rewrites == []
    reason = ("attention not rewritten: attention weights are returned to the caller "
              "(output_attentions)")
    assert reasons == [reason] * LAYERS


@pytest.mark.parametrize("attn, reason", [
    ("eager", "dropout p=0.1 in training"),
    ("sdpa", "dropout_p=0.1 (rs::attention has no dropout)"),
])
def test_attention_dropout_in_training_is_a_near_miss(attn, reason):
    model = configs.bert("tiny", attn_implementation=attn).train()
    rewrites, reasons = near_misses(model)
    assert rewrites == [] and reasons == [f"attention not rewritten: {reason}"] * LAYERS


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_unpadded_causal_mask_becomes_the_causal_flag(name):
    """Without padding, transformers' eager causal mask is only the causal rule: the op gets
    causal=True and no mask (what lets the flash kernel skip the upper triangle at T = 1024)."""
    model = MODELS[name][0]("tiny", attn_implementation="eager")
    torch._dynamo.reset()
    backend = AttentionBackend(split_options({"min_features": 2**31 - 1}), inductor=False)
    opt = torch.compile(model, backend=backend)
    with torch.no_grad():
        for t in LENGTHS:
            ids = inputs(t)["input_ids"]
            torch.testing.assert_close(output(opt(ids)), output(model(ids)), rtol=1e-5, atol=1e-5)
    assert [dynamic for _, dynamic in backend.compiles] == [False, True]
    for report, _ in backend.compiles:
        assert [a.detail.split(", ")[-1] for a in report.attention_rewrites] == ["causal"] * LAYERS
