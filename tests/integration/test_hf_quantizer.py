"""Deployment through transformers: from_pretrained(quantization_config=RealityStoneConfig(...))
compresses while loading, save_pretrained / from_pretrained restore the same codes, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import rs_compile
from rs_compile import RealityStoneConfig
from rs_compile.hf_quantizer import RealityStoneHfQuantizer
from rs_compile.models import configs
from rs_compile.modules import CompressedEmbedding, CompressedLinear

REPO = Path(__file__).resolve().parents[2]
IDS = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(1))
FAMILIES = ["gpt2", "llama"]


def build(family: str):
    return getattr(configs, family)("tiny", seed=0)


@pytest.fixture(scope="module", params=FAMILIES)
def dense_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "dense"
    build(request.param).save_pretrained(folder)
    return request.param, folder


@pytest.fixture(scope="module")
def loaded(dense_folder):
    family, folder = dense_folder
    return family, folder, AutoModelForCausalLM.from_pretrained(folder, quantization_config=RealityStoneConfig(bits=4))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def compressed(model):
    return {n: type(m).__name__ for n, m in model.named_modules()
            if isinstance(m, (CompressedLinear, CompressedEmbedding))}


def test_from_pretrained_compresses_like_convert(loaded):
    """The layers, the codes and so the outputs are those of rs_compile.convert on the same
    weights; GPT-2's tied lm_head reads the embedding's codes (no dense copy)."""
    family, _, model = loaded
    reference = rs_compile.convert(build(family))
    assert compressed(model) == compressed(reference) and len(compressed(model)) >= 9
    assert torch.equal(logits(model), logits(reference))
    assert sorted(r.module for r in model.rs_report.linear_rewrites) == \
        sorted(r.module for r in reference.rs_report.linear_rewrites)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    if family == "gpt2":
        assert model.lm_head.codes.data_ptr() == model.transformer.wte.codes.data_ptr()


def test_layers_are_compressed_as_their_weights_arrive(dense_folder, monkeypatch):
    """While loading, at most the arriving layer holds a dense weight: every earlier one is
    already compressed (the peak-memory figure in docs/user-guide.md rests on this)."""
    _, folder = dense_folder
    dense_at_each_step = []
    compress_layer = RealityStoneHfQuantizer.compress_layer

    def counting(self, model, weight_name, missing_keys):
        dense_at_each_step.append(sum(
            1 for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
            and not isinstance(m, CompressedEmbedding) and m.weight.device.type != "meta"))
        compress_layer(self, model, weight_name, missing_keys)

    monkeypatch.setattr(RealityStoneHfQuantizer, "compress_layer", counting)
    AutoModelForCausalLM.from_pretrained(folder, quantization_config=RealityStoneConfig())
    assert len(dense_at_each_step) >= 8 and max(dense_at_each_step) <= 1


def run_fresh(code: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


FRESH_LOAD = """
import sys, torch
import rs_compile  # before transformers: the quantizer registers when transformers loads
from transformers import AutoModelForCausalLM
folder, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder)
ids = torch.load(out + ".ids", weights_only=True)
with torch.no_grad():
    logits = model(ids).logits
generated = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
types = sorted({type(m).__name__ for m in model.modules()})
torch.save({"logits": logits, "generated": generated, "types": types}, out)
"""


def test_save_pretrained_round_trip_is_bit_identical_in_a_fresh_process(loaded, tmp_path):
    family, _, model = loaded
    model.save_pretrained(tmp_path / "rs")
    files = sorted(p.name for p in (tmp_path / "rs").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors"]  # no pickle
    assert json.loads((tmp_path / "rs" / "config.json").read_text())["quantization_config"]["quant_method"] \
        == "realitystone"
    torch.save(IDS, tmp_path / "out.ids")
    run_fresh(FRESH_LOAD, str(tmp_path / "rs"), str(tmp_path / "out"))
    fresh = torch.load(tmp_path / "out", weights_only=True)
    assert torch.equal(fresh["logits"], logits(model))
    assert torch.equal(fresh["generated"], model.generate(IDS[:1], max_new_tokens=4, do_sample=False))
    assert "CompressedLinear" in fresh["types"] and "Linear" not in fresh["types"]


def test_save_pretrained_of_converted_and_rs_loaded_models(tmp_path):
    """save_pretrained of a model from rs_compile.convert (or rs_compile.load) is no longer a
    checkpoint that loads as random weights: from_pretrained restores it exactly."""
    converted = rs_compile.convert(configs.gpt2("tiny", seed=3), bits=3)
    reloaded = rs_compile.load(configs.gpt2("tiny"), rs_compile.save(converted, tmp_path / "rs"))
    for i, model in enumerate((converted, reloaded)):
        model.save_pretrained(tmp_path / f"hf{i}")
        back = AutoModelForCausalLM.from_pretrained(tmp_path / f"hf{i}")
        assert compressed(back) == compressed(converted) and back.transformer.h[0].mlp.c_fc.bits == 3
        assert torch.equal(logits(back), logits(converted))


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "rs"
    rs_compile.convert(configs.gpt2("tiny", seed=0)).save_pretrained(folder)
    return folder


def test_without_import_rs_compile_loading_fails_instead_of_random_weights(saved_gpt2):
    done = run_fresh("import sys; from transformers import AutoModelForCausalLM; "
                     "AutoModelForCausalLM.from_pretrained(sys.argv[1])", str(saved_gpt2), check=False)
    assert done.returncode != 0
    assert "ignore_mismatched_sizes" in done.stderr and "lm_head.weight" in done.stderr


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_checkpoint_of_another_format_version_is_refused(saved_gpt2, tmp_path):
    folder = copy_folder(saved_gpt2, tmp_path / "v2")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"file format version 2; this rs_compile reads version 3"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_damaged_tensor_is_refused_by_its_checksum(saved_gpt2, tmp_path):
    folder = copy_folder(saved_gpt2, tmp_path / "damaged")
    file = folder / "model.safetensors"
    with safe_open(file, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["transformer.h.1.mlp.c_fc.codes"][0, 0] ^= 1
    save_file(tensors, file, metadata=metadata)
    with pytest.raises(ValueError, match=r"tensor 'transformer\.h\.1\.mlp\.c_fc\.codes' does not match the "
                                         r"checksum"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_invalid_options_fail_when_the_config_is_built():
    with pytest.raises(ValueError, match="bits=7"):
        RealityStoneConfig(bits=7)
    with pytest.raises(ValueError, match=r"unknown RealityStoneConfig option\(s\) \['gptq'\]"):
        RealityStoneConfig(gptq=True)


def test_compile_for_generation_on_a_from_pretrained_model(loaded):
    from rs_compile.generation import compile_for_generation

    family, folder, _ = loaded
    if family != "llama":
        pytest.skip("one family is enough for the compiled decode")
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=RealityStoneConfig())
    eager = model.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    compiled = compile_for_generation(model, max_cache_len=32)
    assert torch.equal(compiled.generate(IDS[:1], max_new_tokens=4, do_sample=False), eager)
