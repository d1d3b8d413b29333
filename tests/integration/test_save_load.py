"""rs_compile.save / load: bit-exact round trips (also into meta-device models) and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import rs_compile
from rs_compile import serialization
from rs_compile.demo import model_bytes
from rs_compile.hub import load_model, save_model
from rs_compile.models import configs
from rs_compile.modules import CompressedLinear

IDS = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(1))


def compressed_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, CompressedLinear))


def on_meta(build):
    with torch.device("meta"):
        return build()


@pytest.fixture(scope="module")
def gpt2_saved(tmp_path_factory):
    model = rs_compile.convert(configs.gpt2("tiny", seed=0))
    path = serialization.save(model, tmp_path_factory.mktemp("gpt2") / "saved")
    return model, path


@pytest.mark.parametrize("fresh", [lambda: configs.gpt2("tiny", seed=7), lambda: on_meta(lambda: configs.gpt2("tiny"))],
                         ids=["materialised", "meta"])
def test_gpt2_round_trip_is_bit_exact(gpt2_saved, fresh):
    converted, path = gpt2_saved
    loaded = serialization.load(fresh(), path)
    assert compressed_names(loaded) == compressed_names(converted) != []
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # the tie survives
    assert model_bytes(loaded) == model_bytes(converted)  # no dense copy of a compressed weight
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, converted(IDS).logits)
        generated = loaded.generate(IDS[:1, :4], max_new_tokens=8, do_sample=False, pad_token_id=0)
        expected = converted.generate(IDS[:1, :4], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, expected) and generated.shape == (1, 12)


def test_meta_llama_gets_its_non_persistent_buffers(tmp_path):
    converted = rs_compile.convert(configs.llama("tiny"), bits=3, group_size=32, act_bits=8)
    serialization.save(converted, tmp_path)
    loaded = serialization.load(on_meta(lambda: configs.llama("tiny", seed=3)), tmp_path)
    rotary = loaded.model.rotary_emb.inv_freq
    assert not rotary.is_meta and torch.equal(rotary, converted.model.rotary_emb.inv_freq)
    assert {(m.bits, m.act_bits) for m in loaded.modules() if isinstance(m, CompressedLinear)} == {(3, 8)}
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, converted(IDS).logits)


def test_folder_with_config_rebuilds_an_encoder_without_pooler(tmp_path):
    converted = rs_compile.convert(configs.bert("tiny"))
    save_model(converted, tmp_path)
    loaded, tokenizer = load_model(tmp_path)
    assert tokenizer is None and loaded.pooler is None and type(loaded) is type(converted)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).last_hidden_state, converted(IDS).last_hidden_state)


def test_unconverted_model_round_trips_too(tmp_path):
    model = configs.gpt2("tiny", seed=2)
    serialization.save(model, tmp_path)
    assert json.loads((tmp_path / serialization.META_FILE).read_text())["modules"] == {}
    loaded = serialization.load(on_meta(lambda: configs.gpt2("tiny")), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def assert_load_fails_untouched(model, path, message):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        serialization.load(model, path)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_missing_module_names(gpt2_saved):
    one_layer = configs.gpt2("tiny")
    one_layer.transformer.h = one_layer.transformer.h[:1]
    assert_load_fails_untouched(one_layer, gpt2_saved[1],
                                r"compresses layer 'transformer\.h\.1\.attn\.c_attn' but the model has no such module")


def test_shape_mismatch(gpt2_saved):
    from transformers import GPT2Config, GPT2LMHeadModel

    wider = GPT2LMHeadModel(GPT2Config(**{**configs.GPT2_SIZES["tiny"], "n_embd": 128}))
    assert_load_fails_untouched(wider, gpt2_saved[1],
                                r"layer 'transformer\.h\.0\.attn\.c_attn': the model's weight is \[out, in\] = "
                                r"\[384, 128\] but the file holds \[192, 64\]")


def test_dense_tensor_mismatch(tmp_path):
    serialization.save(rs_compile.convert(configs.gpt2("tiny")), tmp_path)
    other = configs.gpt2("tiny")
    other.transformer.wpe = torch.nn.Embedding(128, 64)  # fewer positions than saved
    assert_load_fails_untouched(other, tmp_path, r"shape mismatch .*transformer\.wpe\.weight: model \[128, 64\] vs file \[256, 64\]")


def test_already_converted_model(gpt2_saved):
    assert_load_fails_untouched(rs_compile.convert(configs.gpt2("tiny")), gpt2_saved[1], r"has a CompressedLinear there")


def test_version_and_missing_files(tmp_path):
    serialization.save(configs.gpt2("tiny"), tmp_path)
    meta_file = tmp_path / serialization.META_FILE
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "version": 99}))
    assert_load_fails_untouched(configs.gpt2("tiny"), tmp_path, r"version=99; this rs_compile reads format='rs_compile' version=1")
    with pytest.raises(FileNotFoundError, match=r"not an rs_compile folder: \['rs_compile.json', 'rs_compile.safetensors'\]"):
        serialization.load(configs.gpt2("tiny"), tmp_path / "absent")


@pytest.mark.slow
def test_converted_model_compiles_with_the_backend(gpt2_saved):
    converted, _ = gpt2_saved
    compiled = torch.compile(converted, backend="realitystone")
    with torch.no_grad():
        torch.testing.assert_close(compiled(IDS).logits, converted(IDS).logits, rtol=1e-4, atol=1e-4)
