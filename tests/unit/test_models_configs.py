"""Random-weight builders: seeded, eval-mode, the advertised shapes, both attention kernels."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from rs_compile.models import configs

TINY_BUILDERS = [configs.gpt2, configs.bert, configs.llama]


def _inputs(model):
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=generator)


@pytest.mark.parametrize("build", TINY_BUILDERS)
def test_seeded_and_rng_neutral(build):
    before = torch.random.get_rng_state()
    a, b, c = build(seed=5), build(seed=5), build(seed=6)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert not a.training
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("build", TINY_BUILDERS)
def test_eager_and_sdpa_agree(build):
    eager, sdpa = build(attn_implementation="eager"), build(attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager"
    assert sdpa.config._attn_implementation == "sdpa"
    x = _inputs(eager)
    with torch.no_grad():
        out_e, out_s = eager(x), sdpa(x)
    key = "logits" if "logits" in out_e else "last_hidden_state"
    torch.testing.assert_close(out_e[key], out_s[key], atol=1e-5, rtol=1e-5)


def test_tiny_shapes():
    gpt2, bert, llama = (b() for b in TINY_BUILDERS)
    for model in (gpt2, bert, llama):
        assert model.config.num_hidden_layers == 2 and 64 <= model.config.hidden_size <= 128
    assert isinstance(gpt2.transformer.h[0].attn.c_attn, Conv1D)
    assert bert.pooler is None
    attn = llama.model.layers[0].self_attn
    assert attn.k_proj.out_features * 2 == attn.q_proj.out_features  # GQA: 2 q heads per kv head


@pytest.mark.parametrize(
    ("build", "kwargs", "params"),
    [
        (configs.gpt2, {"size": "small"}, 124_439_808),  # GPT-2 small, published count
        (configs.bert, {"size": "base"}, 109_482_240 - 768 * 769),  # bert-base-uncased - pooler
        (configs.llama, {"size": "small"}, 134_515_008),  # SmolLM-135M
    ],
)
def test_real_size_parameter_counts(build, kwargs, params):
    with torch.device("meta"):
        model = build(**kwargs)
    assert sum(p.numel() for p in model.parameters()) == params


def test_kogpt2_shape():
    with torch.device("meta"):
        model = configs.kogpt2()
    c = model.config
    assert (c.vocab_size, c.n_embd, c.n_layer, c.n_head) == (51200, 768, 12, 12)
    assert model.transformer.wte.weight.shape == (51200, 768)


def test_unknown_size_is_rejected():
    with pytest.raises(ValueError, match="choose one of"):
        configs.llama(size="huge")
