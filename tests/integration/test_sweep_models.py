"""Models that run in eager but crashed, or lost compression silently, under rs_compile.

Issue I items 8-10: layers shared between calls (ALBERT), two weights read by one module (a
torchvision-Swin-like block), model code that reads ``linear.weight`` itself (T5,
nn.TransformerEncoderLayer / nn.TransformerEncoder, Swin), and weights left dense with no reason
(nn.MultiheadAttention, Bloom's ALiBi and DeBERTa-v2's attention, Falcon's Linear subclass,
quantize_dynamic).

Compile-route cases run every rewrite pass in a capturing dynamo backend that executes the
rewritten graph eagerly (one dynamo trace each, no Inductor); one ALBERT case runs
``backend=RealityStoneBackend()`` end to end. References are the same models with every compressed
weight replaced by its decoded value, so the tolerance is tight.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rs_compile
from rs_compile.codec.encode import encode
from rs_compile.config import split_options
from rs_compile.modules import CompressedLinear
from rs_compile.passes.attention import rewrite_attention
from rs_compile.passes.graph import GraphRewrite
from rs_compile.passes.leftovers import report_dense_weights
from rs_compile.passes.linear import compress_linears
from rs_compile.passes.qkv import fuse_qkv_projections
from rs_compile.report import Report

transformers = pytest.importorskip("transformers")

ENCODING, COMPILE = split_options()
PASSES = (rewrite_attention, fuse_qkv_projections, compress_linears, report_dense_weights)
TOL = dict(rtol=1e-4, atol=1e-4)  # decoded reference: only the op's summation order differs


class Capture:
    """Dynamo backend: the backend's passes on each graph, then the rewritten graph run eagerly."""

    def __init__(self):
        self.report = Report()
        self.graphs = []

    def __call__(self, gm, example_inputs):
        rw = GraphRewrite(gm, example_inputs)
        for p in PASSES:
            p(rw, ENCODING, COMPILE, self.report)
        new = rw.finish()  # lint + recompile: where items 8's crashes surfaced
        self.graphs.append(new)
        extras = tuple(rw.extra_inputs)
        return lambda *args: new(*args, *extras)


def first(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def compile_run(model, *args, **kwargs):
    """(report, output, Capture) of ``model`` compiled with the capturing backend."""
    torch._dynamo.reset()
    cap = Capture()
    with torch.no_grad():
        out = torch.compile(model, backend=cap)(*args, **kwargs)
    return cap.report, first(out), cap


def decoded(model: nn.Module, names) -> nn.Module:
    """A copy of ``model`` whose listed layers' weights are replaced by their decoded codes."""
    ref = copy.deepcopy(model)
    for name in names:
        layer = ref.get_submodule(name)
        w = layer.weight
        layer.weight.data = encode(w.detach(), ENCODING.format,
                                   curvatures=ENCODING.curvatures).dequantize().to(w.dtype)
    return ref


def convert_run(model, *args, **kwargs):
    """(converted copy, its output, output of the dense model with the decoded weights)."""
    conv = rs_compile.convert(copy.deepcopy(model), embeddings=False)
    ref = copy.deepcopy(model)
    for name, layer in conv.named_modules():
        if isinstance(layer, CompressedLinear):
            ref.get_submodule(name).weight.data = layer.dequantize()
    with torch.no_grad():
        return conv, first(conv(*args, **kwargs)), first(ref(*args, **kwargs))


def rewritten(report: Report) -> list[str]:
    return [r.module for r in report.linear_rewrites]


# ---------------------------------------------------------------------------- models


class WindowAttention(nn.Module):
    """torchvision's ShiftedWindowAttention: ``F.linear`` on its own Linears' weights."""

    def __init__(self, dim=64, heads=4, window=4, shift=0):
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        grid = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
        rel = (grid.flatten(1)[:, :, None] - grid.flatten(1)[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("relative_position_index",
                             (rel[..., 0] * (2 * window - 1) + rel[..., 1]).flatten(), persistent=False)

    def forward(self, x):  # [B, H, W, C]
        b, h, w, c = x.shape
        win = self.window
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = x.view(b, h // win, win, w // win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, win * win, c)
        qkv_bias = self.qkv.bias.clone()  # Swin v2 zeroes the k bias on a copy
        qkv_bias[c:2 * c].zero_()
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        qkv = qkv.reshape(x.size(0), x.size(1), 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (c // self.heads) ** -0.5, qkv[1], qkv[2]
        attn = q.matmul(k.transpose(-2, -1))
        bias = self.relative_position_bias_table[self.relative_position_index].view(win * win, win * win, -1)
        attn = F.softmax(attn + bias.permute(2, 0, 1).unsqueeze(0), dim=-1)
        x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), c)
        x = F.linear(x, self.proj.weight, self.proj.bias)
        x = x.view(b, h // win, w // win, win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x


class SwinLikeBlock(nn.Module):
    def __init__(self, dim=64, shift=0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, shift=shift)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SwinLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Identity(), nn.Sequential(SwinLikeBlock(), SwinLikeBlock(shift=2)))

    def forward(self, x):
        return self.features(x)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def _seeded(build):
    torch.manual_seed(0)
    return build().eval()


@pytest.fixture(scope="module")
def albert():
    from transformers import AlbertConfig, AlbertModel

    return _seeded(lambda: AlbertModel(AlbertConfig(
        vocab_size=64, embedding_size=32, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32)))


@pytest.fixture(scope="module")
def t5():
    from transformers import T5Config, T5Model

    return _seeded(lambda: T5Model(T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=1,
                                            num_decoder_layers=1, num_heads=4)))


@pytest.fixture(scope="module")
def swin():
    return _seeded(SwinLike)


@pytest.fixture(scope="module")
def albert_compiled(albert, ids):
    return compile_run(albert, ids)


# ------------------------------------------------------------- item 8: compile crashes


def test_albert_shared_layers_compile_once_per_weight(albert, albert_compiled, ids):
    report, out, cap = albert_compiled
    names = rewritten(report)
    assert len(names) == len(set(names)), "a shared layer is listed once"
    layer = "encoder.albert_layer_groups.0.albert_layers.0."
    calls = {r.module: r.calls for r in report.linear_rewrites}
    for leaf in ("attention.query", "attention.key", "attention.value", "attention.dense", "ffn",
                 "ffn_output"):
        assert calls[layer + leaf] == 3
    assert report.fused_qkv == 3 and report.skipped == []
    # one set of codes per weight: 8 weights x (codes, groups, row_scale); biases are parameters
    codes = [n for n in cap.graphs[0].graph.nodes if n.op == "placeholder" and n.name.startswith("rs_")]
    assert len(codes) == 3 * 6 + 1  # q/k/v fused: one set + its bias; dense, ffn, ffn_output, the
    # embedding projection and the pooler: one set each
    ref = decoded(albert, names)
    with torch.no_grad():
        torch.testing.assert_close(out, first(ref(ids)), **TOL)


def test_swin_like_two_weights_in_one_module_compile(swin):
    x = torch.randn(2, 8, 8, 64, generator=torch.Generator().manual_seed(1))
    report, out, _ = compile_run(swin, x)
    names = rewritten(report)
    assert sorted(names) == sorted(f"features.1.{i}.{leaf}" for i in (0, 1)
                                   for leaf in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2"))
    with torch.no_grad():
        torch.testing.assert_close(out, decoded(swin, names)(x), **TOL)


def test_linear_called_twice_and_fed_by_a_linear_is_listed_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, x):
            return self.b(self.a(self.a(x)))

    model = _seeded(Twice)
    x = torch.randn(4, 32)
    report, out, _ = compile_run(model, x)
    assert [(r.module, r.calls) for r in report.linear_rewrites] == [("a", 2), ("b", 1)]
    torch.testing.assert_close(out, decoded(model, ["a", "b"])(x), **TOL)
    assert "a" in str(report) and "x2" in str(report)


def test_albert_through_the_realitystone_backend(albert, ids):
    from rs_compile.backend import RealityStoneBackend

    torch._dynamo.reset()
    backend = RealityStoneBackend()
    with torch.no_grad():
        out = torch.compile(albert, backend=backend)(ids).last_hidden_state
        ref = decoded(albert, rewritten(backend.report))(ids).last_hidden_state
    torch.testing.assert_close(out, ref, **TOL)
    assert len(backend.report.linear_rewrites) == 8


# -------------------------------------------- item 9: convert and code that reads .weight


def test_compressed_linear_weight_is_decoded_on_access():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    rs_compile.convert(model)
    layer = model[0]
    w = layer.weight
    assert w.shape == (48, 64) and w.dtype == torch.float32 and not isinstance(w, nn.Parameter)
    torch.testing.assert_close(w, layer.dequantize(), rtol=0, atol=0)
    assert "weight" not in dict(layer.named_parameters()) and "weight" not in layer.state_dict()
    assert layer.weight is not w, "decoded per access, no dense copy held"
    with pytest.raises(AttributeError):
        layer.weight = torch.zeros(48, 64)
    x = torch.randn(3, 64)
    torch.testing.assert_close(F.linear(x, layer.weight, layer.bias), layer(x), **TOL)
    model.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16


def test_convert_t5(t5, ids):
    conv, out, ref = convert_run(t5, input_ids=ids, decoder_input_ids=ids)
    assert len(conv.rs_report.linear_rewrites) == 4 + 4 + 4 + 2 + 2
    torch.testing.assert_close(out, ref, **TOL)


def test_compile_t5(t5, ids):
    report, out, _ = compile_run(t5, input_ids=ids, decoder_input_ids=ids)
    assert len(report.linear_rewrites) == 16
    with torch.no_grad():
        torch.testing.assert_close(out, first(decoded(t5, rewritten(report))(input_ids=ids, decoder_input_ids=ids)), **TOL)


@pytest.mark.parametrize("grad", [False, True], ids=["fast-path", "slow-path"])
def test_convert_transformer_encoder(grad):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    for model in (layer.eval(), nn.TransformerEncoder(copy.deepcopy(layer), 2, enable_nested_tensor=False).eval()):
        x = torch.randn(2, 8, 64)
        conv = rs_compile.convert(copy.deepcopy(model), embeddings=False)
        ref = copy.deepcopy(model)
        for name, m in conv.named_modules():
            if isinstance(m, CompressedLinear):
                ref.get_submodule(name).weight.data = m.dequantize()
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(conv(x), ref(x), **TOL)
        layers = len(getattr(model, "layers", [model]))
        assert len(conv.rs_report.linear_rewrites) == 3 * layers  # out_proj, linear1, linear2
        assert [s.reason for s in conv.rs_report.skipped if s.module.endswith("in_proj_weight")] \
            and len(conv.rs_report.skipped) == layers


def test_convert_swin_like(swin):
    x = torch.randn(2, 8, 8, 64)
    conv, out, ref = convert_run(swin, x)
    assert len(conv.rs_report.linear_rewrites) == 8
    torch.testing.assert_close(out, ref, **TOL)


def test_convert_albert(albert, ids):
    conv, out, ref = convert_run(albert, ids)
    names = rewritten(conv.rs_report)
    assert len(names) == len(set(names)) == 8
    torch.testing.assert_close(out, ref, **TOL)


# ------------------------------------------------ item 10: every weight compressed or listed


def test_transformer_encoder_layer_fused_call_is_listed_by_compile():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 8, 64)
    report, out, _ = compile_run(model, x)
    reasons = dict(report.skipped)
    assert set(reasons) == {"self_attn.in_proj_weight", "self_attn.out_proj", "linear1", "linear2"}
    assert all("_transformer_encoder_layer_fwd" in r for r in reasons.values())
    torch.testing.assert_close(out, model(x))


def test_multihead_attention_in_proj_is_listed_by_both_routes():
    torch.manual_seed(0)
    model = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(2, 8, 64)
    report, _, _ = compile_run(model, x, x, x)
    assert "in_proj_weight" in dict(report.skipped)
    conv, out, ref = convert_run(model, x, x, x)
    assert "bare Parameter" in dict(conv.rs_report.skipped)["in_proj_weight"]
    assert isinstance(conv.out_proj, CompressedLinear)  # MHA reads out_proj.weight: decoded
    torch.testing.assert_close(out, ref, **TOL)


def test_bloom_and_deberta_attention_are_listed_with_the_reason(ids):
    from transformers import BloomConfig, BloomModel, DebertaV2Config, DebertaV2Model

    bloom = _seeded(lambda: BloomModel(BloomConfig(vocab_size=64, hidden_size=64, n_layer=1, n_head=4)))
    deberta = _seeded(lambda: DebertaV2Model(DebertaV2Config(
        vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=32, relative_attention=True, pos_att_type=["p2c", "c2p"],
        position_buckets=16, max_relative_positions=32)))
    for model, module, why in ((bloom, "h.0.self_attention", "ALiBi"),
                               (deberta, "encoder.layer.0.attention.self", "relative-position")):
        report, _, _ = compile_run(model, ids)
        reasons = dict(report.skipped)
        assert reasons[module].startswith("attention not rewritten: ") and why in reasons[module]
        assert report.linear_rewrites


def test_falcon_linear_subclass_is_compressed_by_both_routes(ids):
    from transformers import FalconConfig, FalconModel

    falcon = _seeded(lambda: FalconModel(FalconConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1,
                                                      num_attention_heads=4)))
    report, out, _ = compile_run(falcon, ids)
    conv, conv_out, ref = convert_run(falcon, ids)
    assert sorted(rewritten(conv.rs_report)) == sorted(rewritten(report))
    assert len(rewritten(report)) == 4 and not conv.rs_report.skipped
    torch.testing.assert_close(conv_out, ref, **TOL)


def test_quantize_dynamic_model_lists_the_quantized_layers():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)), {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(2, 64)
    conv = rs_compile.convert(copy.deepcopy(model))
    inspected = rs_compile.inspect(model, x)
    for report in (conv.rs_report, inspected):
        reasons = dict(report.skipped)
        assert set(reasons) == {"0", "2"} and report.linear_rewrites == []
        assert all("already quantized" in r and "quantized.dynamic" in r for r in reasons.values())


def test_linear_weight_computed_from_parameters_is_listed():
    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.q, self.k = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, x):
            y = F.linear(x, self.a.weight + 0, self.a.bias)
            return F.linear(y, torch.cat([self.q.weight, self.k.weight]))

    report, _, _ = compile_run(_seeded(Computed), torch.randn(4, 32))
    reasons = [s.reason for s in report.skipped]
    assert len(reasons) == 2 and report.linear_rewrites == []
    assert "['a']" in reasons[0] and "['k', 'q']" in reasons[1]
    assert all("computed from" in r for r in reasons)
