"""Mixture-of-experts (issue K): transformers' 3-D expert tensors compressed by convert
(CompressedExperts, rs::expert_linear), checked on tiny random Mixtral, Qwen3-MoE and DeepSeek-V3.

References: the original model (4-bit codec error), a float64 copy of it that holds the decoded
weights and runs its experts through a plain expert loop written here (independent of both
transformers' experts forward and CompressedExperts), and the eager converted model for the
compiled one.
"""

import copy

import pytest
import torch
from torch import nn

import rs_compile
from rs_compile.backend import RealityStoneBackend
from rs_compile.codec import encode
from rs_compile.codec.format import Format
from rs_compile.experts import CompressedExperts, expert_linear
from rs_compile.generation import compile_for_generation
from rs_compile.modules import CompressedEmbedding, CompressedLinear

transformers = pytest.importorskip("transformers")


def _mixtral():
    cfg = transformers.MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg)


def _qwen3_moe():
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True)
    return transformers.Qwen3MoeForCausalLM(cfg)


def _deepseek_v3():
    cfg = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, n_shared_experts=1, q_lora_rank=32, kv_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, num_attention_heads=4,
        num_key_value_heads=4)
    return transformers.DeepseekV3ForCausalLM(cfg)


MODELS = {"mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "deepseek_v3": _deepseek_v3}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own models: without a reset, the same forward code objects compiled
    for earlier tests reach dynamo's recompile limit and run eagerly, silently."""
    torch._dynamo.reset()
    yield


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    """(name, original, converted) with the same random weights."""
    torch.manual_seed(0)
    original = MODELS[request.param]().eval()
    converted = rs_compile.convert(copy.deepcopy(original))
    return request.param, original, converted


def _ids(seed=1, length=12):
    return torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(seed))


class LoopExperts(nn.Module):
    """The reference: for every (token, slot), act(x W_gu[e]^T . gate) * (. up) W_d[e]^T, summed."""

    def __init__(self, gate_up, down, act_fn):
        super().__init__()
        self.gate_up, self.down, self.act_fn = gate_up, down, act_fn

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for j in range(top_k_index.shape[1]):
                e = int(top_k_index[t, j])
                gate, up = (self.gate_up[e] @ hidden_states[t]).chunk(2)
                out[t] += top_k_weights[t, j].to(out.dtype) * (self.down[e] @ (self.act_fn(gate) * up))
        return out


def _float64_reference(original, converted):
    """``original`` in float64 with every compressed weight replaced by its decoded value and
    every experts module by :class:`LoopExperts` on the decoded experts."""
    ref = copy.deepcopy(original).double()
    for name, module in converted.named_modules():
        if isinstance(module, (CompressedLinear, CompressedEmbedding)):
            ref.get_submodule(name).weight.data = module.dequantize().double()
        elif isinstance(module, CompressedExperts):
            dense = {k: v.double() for k, v in module.dequantize().items()}
            ref.set_submodule(name, LoopExperts(dense["gate_up_proj"], dense["down_proj"], module.act_fn))
    return ref


# --- convert ----------------------------------------------------------------------------------


def test_every_expert_tensor_is_compressed(pair):
    name, original, converted = pair
    dense_experts = [n for n, p in original.named_parameters() if p.dim() == 3]
    assert dense_experts, name
    assert not [n for n, p in converted.named_parameters() if p.dim() >= 3]
    experts = [m for m in converted.modules() if isinstance(m, CompressedExperts)]
    assert len(experts) * 2 == len(dense_experts)
    rows = [r for r in converted.rs_report.linear_rewrites if r.pattern == "experts"]
    assert sorted(r.module for r in rows) == sorted(dense_experts)
    for r in rows:
        assert r.dense_bytes >= 6 * r.compressed_bytes, r
    assert "expert tensors" in str(converted.rs_report)
    assert not [s for s in converted.rs_report.skipped if "expert" in s.reason]


def test_converted_close_to_original_within_codec_error(pair):
    name, original, converted = pair
    ids = _ids()
    with torch.no_grad():
        a, b = original(ids).logits, converted(ids).logits
    rel = ((a - b).norm() / a.norm()).item()
    # 4-bit codes on Gaussian weights: ~8% relative error per matrix (the dense layers of these
    # models alone give 6-11%); every weight is compressed here, experts included
    assert rel < 0.25, (name, rel)
    # the experts module alone: its relative error is a 4-bit codec's, like a dense layer's
    block = next(n for n, m in converted.named_modules() if isinstance(m, CompressedExperts))
    e_orig, e_conv = original.get_submodule(block), converted.get_submodule(block)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, e_conv.hidden_dim, generator=gen)
    index = torch.stack([torch.randperm(e_conv.num_experts, generator=gen)[:2] for _ in range(16)])
    weights = torch.rand(16, 2, generator=gen)
    with torch.no_grad():
        y0, y1 = e_orig(x, index, weights), e_conv(x, index, weights)
    assert ((y0 - y1).norm() / y0.norm()).item() < 0.15


def test_converted_matches_float64_loop_on_decoded_weights(pair):
    name, original, converted = pair
    ref = _float64_reference(original, converted)
    ids = _ids(seed=2, length=6)
    with torch.no_grad():
        expected, got = ref(ids).logits, converted(ids).logits
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)


# --- compile ----------------------------------------------------------------------------------


def test_compiled_converted_matches_eager_converted(pair):
    name, _, converted = pair
    backend = RealityStoneBackend(record_graphs=True)
    compiled = torch.compile(converted, backend=backend)
    ids = _ids(seed=4)
    with torch.no_grad():
        eager, got = converted(ids).logits, compiled(ids).logits
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-4)
    assert "rs.expert_linear" in backend.report.graph_after
    assert not [s for s in backend.report.skipped if "expert" in s.reason]


def test_greedy_generate_equal_compiled_and_eager(pair):
    name, _, converted = pair
    prompt = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(5))
    eager = copy.deepcopy(converted)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        expected = eager.generate(prompt, **kwargs)
        compiled = compile_for_generation(copy.deepcopy(converted))
        got = compiled.generate(prompt, **kwargs)
    assert torch.equal(got, expected), name


def test_compile_pass_compresses_grouped_mm_experts_like_convert():
    """The default experts implementation (grouped_mm) traces as transformers::grouped_mm_fallback on
    the 3-D parameters: the backend encodes them per expert (the same codes as convert) and calls
    rs::expert_linear with the rows' experts recovered from the offsets."""
    torch.manual_seed(0)
    model = _mixtral().eval()
    assert model.config._experts_implementation == "grouped_mm"
    reference = rs_compile.convert(copy.deepcopy(model), embeddings=False)  # the backend's scope
    backend = RealityStoneBackend(record_graphs=True)
    ids = _ids()
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(ids).logits
        torch.testing.assert_close(got, reference(ids).logits, rtol=0, atol=1e-4)
    rows = {r.module: r for r in backend.report.linear_rewrites if r.pattern == "experts"}
    dense = [n for n, p in model.named_parameters() if p.dim() == 3]
    assert sorted(rows) == sorted(dense)
    assert all(r.dense_bytes >= 6 * r.compressed_bytes for r in rows.values())
    assert "rs.expert_linear" in backend.report.graph_after and "grouped_mm" not in backend.report.graph_after
    assert not [s for s in backend.report.skipped if "expert" in s.reason]


def test_compile_pass_lists_other_dense_expert_forms_as_skipped():
    torch.manual_seed(0)
    model = _mixtral().eval()
    model.set_experts_implementation("batched_mm")  # W[expert_ids] then bmm: not rewritten
    backend = RealityStoneBackend()
    with torch.no_grad():
        torch.compile(model, backend=backend)(_ids())
    skipped = {s.module: s.reason for s in backend.report.skipped}
    for name, p in model.named_parameters():
        if p.dim() == 3:
            assert name in skipped and "stays dense" in skipped[name], (name, skipped)


# --- unrecognised modules -----------------------------------------------------------------------


class Mixer(nn.Module):
    """A 3-D parameter in a module convert does not understand."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 32, 32))

    def forward(self, x):
        return torch.einsum("bi,eoi->bo", x, self.weight)


class OddExperts(nn.Module):
    """The experts layout, but a forward that is not the standard one (no gating)."""

    def __init__(self, e=4, h=32, i=32):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(e, 2 * i, h) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(e, h, i) * 0.1)
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        w = self.gate_up_proj[top_k_index[:, 0]][:, : self.down_proj.shape[2]]
        return torch.einsum("ti,toi->to", hidden_states, w) @ self.down_proj[0].T


def test_unrecognised_3d_parameters_are_listed_as_skipped():
    model = nn.ModuleDict({"mixer": Mixer(), "odd": OddExperts(), "proj": nn.Linear(32, 32)})
    rs_compile.convert(model)
    skipped = {s.module: s.reason for s in model.rs_report.skipped}
    assert "not an experts layout" in skipped["mixer"]
    assert "standard experts forward" in skipped["odd"]
    assert isinstance(model["mixer"], Mixer) and isinstance(model["odd"], OddExperts)
    assert isinstance(model["proj"], CompressedLinear)


# --- the op -------------------------------------------------------------------------------------


def _stacked(e=4, n=48, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    encs = [encode(torch.randn(n, k, generator=g) * 0.05, Format(4, 32)) for _ in range(e)]
    return [torch.stack([enc.tensors()[i] for enc in encs]) for i in range(3)], encs


@pytest.mark.parametrize("rows", [10, 80])  # experts grouped in Python / by a sort (> 64 rows)
def test_expert_linear_matches_float64_per_row(rows):
    (codes, groups, scale), encs = _stacked()
    x = torch.randn(rows, 64)
    ids = torch.tensor([3, 0, 3, 1, 1, 1, 0, 3, 3, 0] * (rows // 10))  # runs and scattered rows
    out = expert_linear(x, ids, codes, groups, scale, 4, 32, 64)
    expected = torch.stack([encs[e].dequantize().double() @ x[s].double() for s, e in enumerate(ids.tolist())])
    assert out.shape == (rows, 48) and out.is_contiguous()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_expert_linear_reads_only_the_selected_experts():
    (codes, groups, scale), _ = _stacked()
    poisoned = scale.clone()
    poisoned[[1, 2]] = float("nan")  # experts 1 and 2 are never selected
    x, ids = torch.randn(3, 64), torch.tensor([0, 3, 0])
    out = expert_linear(x, ids, codes, groups, poisoned, 4, 32, 64)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expert_linear(x, ids, codes, groups, scale, 4, 32, 64))


def test_expert_linear_rejects_out_of_range_ids():
    (codes, groups, scale), _ = _stacked()
    with pytest.raises(ValueError, match="expert_ids range"):
        expert_linear(torch.randn(2, 64), torch.tensor([0, 4]), codes, groups, scale, 4, 32, 64)


@pytest.mark.parametrize("rows", [1, 2, 9])
def test_expert_linear_opcheck(rows):
    (codes, groups, scale), _ = _stacked()
    x = torch.randn(rows, 64, requires_grad=True)
    ids = torch.randint(0, 4, (rows,), generator=torch.Generator().manual_seed(rows))
    torch.library.opcheck(torch.ops.rs.expert_linear.default, (x, ids, codes, groups, scale, 4, 32, 64))


def test_expert_linear_gradient_to_inputs():
    (codes, groups, scale), encs = _stacked()
    x = torch.randn(5, 64, dtype=torch.float32, requires_grad=True)
    ids = torch.tensor([2, 2, 0, 1, 2])
    expert_linear(x, ids, codes, groups, scale, 4, 32, 64).pow(2).sum().backward()
    xr = x.detach().double().requires_grad_()
    w = torch.stack([encs[e].dequantize().double() for e in ids.tolist()])
    torch.einsum("sk,snk->sn", xr, w).pow(2).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)


def test_save_and_load_round_trip_compressed_experts(tmp_path):
    torch.manual_seed(0)
    model = rs_compile.convert(_qwen3_moe().eval())
    rs_compile.save(model, tmp_path / "m")
    with torch.device("meta"):
        fresh = _qwen3_moe()
    loaded = rs_compile.load(fresh, tmp_path / "m")
    assert isinstance(loaded.model.layers[1].mlp.experts, CompressedExperts)
    assert not [n for n, p in loaded.named_parameters() if p.dim() >= 3]
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_load_refuses_experts_into_another_architecture(tmp_path):
    torch.manual_seed(0)
    rs_compile.save(rs_compile.convert(_qwen3_moe().eval()), tmp_path / "m")
    cfg = copy.deepcopy(_qwen3_moe().config)
    cfg.moe_intermediate_size = 32
    other = transformers.Qwen3MoeForCausalLM(cfg)
    with pytest.raises(ValueError, match="experts 'model.layers.0.mlp.experts'"):
        rs_compile.load(other, tmp_path / "m")
    assert not any(isinstance(m, CompressedExperts) for m in other.modules())


@pytest.mark.parametrize("tokens", [1, 12])  # a decode step and a prefill
def test_inductor_compiled_experts_match_eager(tokens):
    """On CPU the compiled graph calls the kernel directly on the selected experts' codes (views
    of the stacked buffers: no index_select copy of an expert, no per-row rs::linear)."""
    from torch._inductor.utils import run_and_get_code

    from rs_compile.lowering import cpu_kernel

    torch.manual_seed(0)
    model = _qwen3_moe().eval()
    experts = rs_compile.convert(model).model.layers[0].mlp.experts
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 64, generator=gen)
    index = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2, generator=gen)
    with torch.no_grad():
        compiled = torch.compile(experts, backend="inductor", fullgraph=True)
        got, code = run_and_get_code(compiled, x, index, weights)
        torch.testing.assert_close(got, experts(x, index, weights), rtol=0, atol=1e-5)
    if cpu_kernel.kernel() is not None:
        code = "\n".join(code)
        assert code.count("extern_kernels.rs_cpu_expert_linear(") == 2  # gate_up and down
        assert "index_select" not in code and "rs_cpu_linear(" not in code


def test_bfloat16_model_experts_are_compressed():
    torch.manual_seed(0)
    model = _qwen3_moe().eval()
    fp32 = rs_compile.convert(copy.deepcopy(model))
    bf16 = rs_compile.convert(model.to(torch.bfloat16))  # the embedding's rows come out in bf16 too
    assert not [s for s in bf16.rs_report.skipped if "Experts" in s.reason]
    assert sum(isinstance(m, CompressedExperts) for m in bf16.modules()) == 2
    ids = _ids()
    with torch.no_grad():
        a, b = fp32(ids).logits, bf16(ids).logits
    assert b.dtype == torch.bfloat16
    # bf16 activations and weights (encoded from bf16-rounded values; a routing flip or two): 5.5%
    assert ((a - b.float()).norm() / a.norm()).item() < 0.15
