"""Harness plumbing on tiny random models: which weights a quantizer sees, in what layout, and
that end-to-end measures are exactly neutral for a lossless quantizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from rs_compile.eval.harness import (
    baseline_quantizers,
    evaluate_causal_lm,
    layer_weight_errors,
    linear_weights,
    mean_layer_errors,
    quantize_model_weights,
)
from rs_compile.eval.splits import CALIBRATION_SEED
from rs_compile.models import configs


def identity(name, w):
    return w


def test_gpt2_conv1d_seen_as_out_in_and_tied_head_skipped():
    model = configs.gpt2()
    seen = {}

    def double(name, w):
        seen[name] = tuple(w.shape)
        return 2 * w

    quantized = quantize_model_weights(model, double)
    linears = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    expected = linears - {"lm_head"}
    assert set(seen) == expected  # lm_head is the token embedding (tied): left alone
    attn = model.transformer.h[0].attn.c_attn
    assert seen["transformer.h.0.attn.c_attn"] == (attn.nf, attn.weight.shape[0])  # [out, in]
    q_modules = dict(quantized.named_modules())
    for name, module in model.named_modules():
        if name in expected:
            torch.testing.assert_close(q_modules[name].weight, 2 * module.weight)
    torch.testing.assert_close(quantized.transformer.wte.weight, model.transformer.wte.weight)
    assert quantized.lm_head.weight is quantized.transformer.wte.weight


def test_original_is_untouched_and_output_uses_quantized_weights():
    model = configs.llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shift = 1e-3
    quantized = quantize_model_weights(model, lambda name, w: w + shift)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    x = torch.randn(3, model.config.hidden_size)
    layer = quantized.model.layers[1].mlp.up_proj
    torch.testing.assert_close(layer(x), x @ (model.model.layers[1].mlp.up_proj.weight + shift).T)


def test_bad_quantizer_output_is_rejected():
    model = configs.bert()
    with pytest.raises(ValueError, match="shaped like"):
        quantize_model_weights(model, lambda name, w: w.T)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_model_weights(model, lambda name, w: w / 0)


def test_layer_weight_errors_table():
    model = configs.llama()
    eps = 0.01
    quantizers = {"scaled": lambda name, w: w * (1 + eps), "nf4": baseline_quantizers()["nf4"]}
    table = layer_weight_errors(model, quantizers)
    assert list(table) == list(linear_weights(model))
    assert len(table) == 2 * 7 + 1  # 7 per layer, plus the untied lm_head
    for row in table.values():
        assert row["scaled"] == pytest.approx(eps**2, rel=1e-4)
        assert 0 < row["nf4"] < 0.05
    assert mean_layer_errors(table)["scaled"] == pytest.approx(eps**2, rel=1e-4)


def test_lossless_quantizer_is_neutral_and_lossy_is_not():
    model = configs.llama()
    results = evaluate_causal_lm(
        model, {"identity": identity, "rtn_int4": baseline_quantizers()["rtn_int4"]},
        n_sequences=4, length=16, bleu_prompts=2, prompt_length=4, new_tokens=8,
    )
    assert results["identity"].kl == pytest.approx(0.0, abs=1e-12)
    assert results["identity"].top1 == 1.0 and results["identity"].bleu == pytest.approx(100.0)
    assert results["rtn_int4"].kl > 1e-6


def test_calibration_seed_is_refused():
    with pytest.raises(ValueError, match="calibration seed"):
        evaluate_causal_lm(configs.llama(), {"identity": identity}, seed=CALIBRATION_SEED)
