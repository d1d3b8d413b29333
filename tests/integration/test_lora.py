"""PEFT LoRA on a frozen compressed base: it trains, gradients flow through rs::linear, and a
merge re-encodes the merged weight with its error reported."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

import rs_compile  # noqa: E402
from rs_compile.lora import CompressedLoraLinear, for_compressed, merge_errors  # noqa: E402
from rs_compile.models import configs  # noqa: E402

IDS = torch.randint(0, 1024, (4, 16), generator=torch.Generator().manual_seed(2))


def lora_model(family: str = "gpt2", targets=("c_attn", "c_fc")):
    model = rs_compile.convert(getattr(configs, family)("tiny", seed=0))
    config = for_compressed(LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0,
                                       init_lora_weights=False))  # B != 0: the adapters act at once
    return get_peft_model(model, config)


def test_peft_without_the_mapping_rejects_compressed_layers():
    model = rs_compile.convert(configs.gpt2("tiny"))
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"]))


def test_lora_layer_gradients_match_a_dense_reference():
    """Output and gradients (adapters and inputs) of the LoRA layer on rs::linear equal plain
    PyTorch on the decoded weight, in float64; the codes get no gradient."""
    layer = lora_model().base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, CompressedLoraLinear)
    base = layer.get_base_layer()
    x = torch.randn(3, 5, 64, requires_grad=True, generator=torch.Generator().manual_seed(0))
    out = layer(x)
    out.square().sum().backward()
    a, b = (p.detach().double().requires_grad_() for p in (layer.lora_A["default"].weight,
                                                         layer.lora_B["default"].weight))
    xd = x.detach().double().requires_grad_()
    ref = F.linear(xd, base.dequantize().double(), base.bias.double()) + F.linear(F.linear(xd, a), b) * 2.0
    ref.square().sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    for got, want in ((x.grad, xd.grad), (layer.lora_A["default"].weight.grad, a.grad),
                      (layer.lora_B["default"].weight.grad, b.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)
    assert not any(t.requires_grad for t in base.buffers())


@pytest.mark.parametrize("family,targets", [("gpt2", ("c_attn", "c_fc")), ("llama", ("q_proj", "v_proj"))])
def test_lora_training_reduces_the_loss(family, targets):
    model = lora_model(family, targets)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(25):
        loss = model(input_ids=IDS, labels=IDS).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def test_merge_reencodes_with_the_error_reported_and_unmerge_restores():
    model = lora_model()
    model.eval()
    layer = model.base_model.model.transformer.h[1].mlp.c_fc
    base = layer.get_base_layer()
    codes_before = base.codes.clone()
    with torch.no_grad():
        expected = base.dequantize().double() + layer.get_delta_weight("default").double()
        adapted = model(input_ids=IDS).logits
    layer.merge()
    assert not torch.equal(base.codes, codes_before)
    error = float((base.dequantize().double() - expected).norm() / expected.norm())
    assert base.merge_error == pytest.approx(error, rel=1e-9) and 0 < error < 0.15
    layer.unmerge()
    assert torch.equal(base.codes, codes_before) and not hasattr(base, "merge_error")

    merged = model.merge_and_unload()
    errors = merge_errors(merged)
    assert sorted(errors) == sorted(f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc"))
    assert all(0 < e < 0.15 for e in errors.values())
    with torch.no_grad():
        got = merged(input_ids=IDS).logits
    unadapted = rs_compile.convert(configs.gpt2("tiny", seed=0))
    with torch.no_grad():
        base_logits = unadapted(input_ids=IDS).logits
    # the merged codes compute the adapted model, far closer to it than the model without adapters
    assert (got - adapted).norm() < 0.5 * (base_logits - adapted).norm()
