"""rs_compile.save / load: bit-exact round trips (also into meta-device models) and clear errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import rs_compile
from rs_compile import serialization
from rs_compile.codec.format import Format
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
    assert loaded.lm_head.codes is loaded.transformer.wte.codes  # the compressed tie survives
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
    with pytest.raises(ValueError, match=message) as raised:
        serialization.load(model, path)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    return raised


def test_missing_module_names(gpt2_saved):
    one_layer = configs.gpt2("tiny")
    one_layer.transformer.h = one_layer.transformer.h[:1]
    assert_load_fails_untouched(one_layer, gpt2_saved[1],
                                r"rs_compile.json compresses layer 'transformer\.h\.1\.attn\.c_attn' but the model has no such module")


def test_shape_mismatch(gpt2_saved):
    from transformers import GPT2Config, GPT2LMHeadModel

    wider = GPT2LMHeadModel(GPT2Config(**{**configs.GPT2_SIZES["tiny"], "n_embd": 128}))
    assert_load_fails_untouched(wider, gpt2_saved[1],
                                r"layer 'transformer\.wte': the model's weight is \[1024, 128\] but the file "
                                r"holds \[1024, 64\]: the model config differs from the one saved")


def test_dense_tensor_mismatch(tmp_path):
    serialization.save(rs_compile.convert(configs.gpt2("tiny"), embeddings=False), tmp_path)
    other = configs.gpt2("tiny")
    other.transformer.wpe = torch.nn.Embedding(128, 64)  # fewer positions than saved
    assert_load_fails_untouched(other, tmp_path, r"shape mismatch .*transformer\.wpe\.weight: model \[128, 64\] vs file \[256, 64\]")


def test_already_converted_model(gpt2_saved):
    assert_load_fails_untouched(rs_compile.convert(configs.gpt2("tiny")), gpt2_saved[1], r"has a CompressedEmbedding there \(expected nn\.Embedding\)")


def test_old_version_and_missing_files(tmp_path):
    serialization.save(configs.gpt2("tiny"), tmp_path)
    meta_file = tmp_path / serialization.META_FILE
    meta_file.write_text(json.dumps({"format": "rs_compile", "version": 1, "modules": {}, "aliases": {}}))
    assert_load_fails_untouched(configs.gpt2("tiny"), tmp_path,
                                r"rs_compile.json has format version 1; this rs_compile reads version 3 "
                                r"only .* convert the original model with this rs_compile and save it again")
    with pytest.raises(FileNotFoundError, match=r"not an rs_compile folder: \['rs_compile.json', 'rs_compile.safetensors'\]"):
        serialization.load(configs.gpt2("tiny"), tmp_path / "absent")


def test_load_leaves_the_model_in_eval_mode(gpt2_saved):
    """The user guide's snippet: a freshly built transformers model is in training mode."""
    from transformers import GPT2LMHeadModel

    converted, path = gpt2_saved
    assert converted.config.resid_pdrop > 0  # dropout would change every output in training mode
    with torch.device("meta"):
        fresh = GPT2LMHeadModel(converted.config)
    assert fresh.training
    loaded = rs_compile.load(fresh, path)
    assert not any(m.training for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, converted(IDS).logits)


# --- damaged and mismatched files: each check names the file and the tensor, the model stays as it was


def tensor_span(path, name):
    """Byte range of tensor ``name``'s data in a safetensors file (u64 header length, JSON header)."""
    raw = (path / serialization.TENSORS_FILE).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8 : 8 + header_len])[name]["data_offsets"]
    return 8 + header_len + begin, 8 + header_len + end


def rewrite(path, tensors=None, modules=None):
    """Re-save ``path`` with replaced tensors and module entries and checksums recomputed as the
    format specifies (sha256 of each tensor's bytes, sha256 of the sorted-key JSON without its own
    "sha256"): a hand-made file that passes the checksums, to reach the checks behind them."""
    import hashlib

    data = {**load_file(path / serialization.TENSORS_FILE), **(tensors or {})}
    meta = json.loads((path / serialization.META_FILE).read_text())
    meta["modules"].update(modules or {})
    meta["tensors"] = {n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                           "sha256": hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()}
                       for n, t in data.items()}
    del meta["sha256"]
    meta["sha256"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    save_file(data, path / serialization.TENSORS_FILE)
    (path / serialization.META_FILE).write_text(json.dumps(meta))


@pytest.fixture()
def saved_copy(gpt2_saved, tmp_path):
    import shutil

    return shutil.copytree(gpt2_saved[1], tmp_path / "copy")


def assert_load_error(path, message):
    """A ValueError (not a JSON or safetensors error) naming the folder; the model unchanged."""
    raised = assert_load_fails_untouched(configs.gpt2("tiny", seed=5), path, message)
    assert raised.type is ValueError and str(path) in str(raised.value)


def test_flipped_payload_byte_is_caught_by_the_checksum(saved_copy):
    name = "transformer.h.0.attn.c_attn.codes"
    begin, end = tensor_span(saved_copy, name)
    raw = bytearray((saved_copy / serialization.TENSORS_FILE).read_bytes())
    raw[(begin + end) // 2] ^= 0x10  # one code of one weight
    (saved_copy / serialization.TENSORS_FILE).write_bytes(bytes(raw))
    assert_load_error(saved_copy, rf"tensor '{name}' does not match the checksum recorded when it was saved")


def test_edited_metadata_field_is_caught_by_the_checksum(saved_copy):
    meta_file = saved_copy / serialization.META_FILE
    meta = json.loads(meta_file.read_text())
    meta["modules"]["transformer.h.0.mlp.c_fc"]["act_bits"] = 8  # valid, and changes the outputs
    meta_file.write_text(json.dumps(meta))
    assert_load_error(saved_copy, r"rs_compile.json: the metadata does not match the checksum")


def test_damaged_files_raise_value_errors_naming_the_file(saved_copy):
    tensors_file = saved_copy / serialization.TENSORS_FILE
    tensors_file.write_bytes(tensors_file.read_bytes()[:1000])  # truncated
    assert_load_error(saved_copy, r"rs_compile.safetensors is not a readable safetensors file")
    meta_file = saved_copy / serialization.META_FILE
    meta_file.write_text(meta_file.read_text()[:-10])
    assert_load_error(saved_copy, r"rs_compile.json is not valid JSON")


@pytest.mark.parametrize("field,value,tensor,expected", [
    ("bits", 8, "codes", r"uint8 \[192, 64\]"),  # [out, 2 groups * 32 bytes] at 8 bits
    ("group_size", 64, "groups", r"uint8 \[192, 1\]"),  # one group byte per 64 inputs
    ("in_features", 56, "codes", r"uint8 \[192, 32\]"),  # 56 inputs: still two groups of 32, 32 bytes
])
def test_metadata_that_disagrees_with_the_tensors_fails_before_loading(saved_copy, field, value, tensor,
                                                                       expected):
    layer = "transformer.h.0.attn.c_attn"
    meta = json.loads((saved_copy / serialization.META_FILE).read_text())["modules"][layer]
    rewrite(saved_copy, modules={layer: {**meta, field: value}})
    if field == "in_features":  # the packed tensors fit; the model's layer does not
        assert_load_error(saved_copy, r"the model's weight is \[192, 64\] but the file holds \[192, 56\]")
        return
    assert_load_error(saved_copy, rf"tensor {layer}\.{tensor} is .* but layer '{layer}' \({value if field == 'bits' else 4}"
                                  rf"-bit codes .* stores {expected}")


def test_tensor_of_the_wrong_dtype_fails_before_loading(saved_copy):
    layer = "transformer.h.1.mlp.c_proj"
    m = json.loads((saved_copy / serialization.META_FILE).read_text())["modules"][layer]
    specs = Format(m["bits"], m["group_size"]).packed_specs(m["out_features"], m["in_features"])
    key, (shape, dtype) = next((k, s) for k, s in specs.items() if s[1].is_floating_point)
    name = f"{layer}.{key}"
    t = load_file(saved_copy / serialization.TENSORS_FILE)[name]
    rewrite(saved_copy, tensors={name: t.to(torch.float64)})
    stored = f"{str(dtype).removeprefix('torch.')} {list(shape)}"
    assert_load_error(saved_copy, rf"tensor {re.escape(name)} is float64 {re.escape(str(list(shape)))}, but "
                                  rf"layer .* stores {re.escape(stored)}")


def test_invalid_module_option_fails_before_loading(saved_copy):
    layer = "transformer.h.0.mlp.c_fc"
    meta = json.loads((saved_copy / serialization.META_FILE).read_text())["modules"][layer]
    rewrite(saved_copy, modules={layer: {**meta, "act_bits": 4}})
    assert_load_error(saved_copy, rf"compressed layer '{layer}': act_bits=4 is invalid")


def test_save_refuses_a_model_whose_compressed_buffers_were_cast(tmp_path):
    model = rs_compile.convert(configs.gpt2("tiny"))
    model.double()  # casts the packed floating-point buffers too
    with pytest.raises(ValueError, match=r"cannot save to .*: tensor transformer\.\S+\.row_scale is float64 "
                                         r"\[\d+\], but layer .* stores bfloat16"):
        serialization.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_converted_model_compiles_with_the_backend(gpt2_saved):
    converted, _ = gpt2_saved
    compiled = torch.compile(converted, backend="realitystone")
    with torch.no_grad():
        torch.testing.assert_close(compiled(IDS).logits, converted(IDS).logits, rtol=1e-4, atol=1e-4)
