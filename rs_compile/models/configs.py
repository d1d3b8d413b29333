"""Random-weight transformers for coverage (every architecture the backend rewrites) and speed.

"tiny" shapes (2 layers, hidden 64-128, vocab 1024) compile in seconds; the real-size shapes match
published checkpoints so memory, timing and byte counts are representative without downloading
weights. Random weights say nothing about quality: use ``tinystories`` / ``minilm`` for that.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

GPT2_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=1024, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                 bos_token_id=1023, eos_token_id=1023),
    # GPT-2 small (124M)
    "small": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
}
# skt/kogpt2-base-v2
KOGPT2: dict[str, Any] = dict(vocab_size=51200, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
BERT_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=512, max_position_embeddings=256),
    # bert-base-uncased
    "base": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512),
}
LLAMA_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256),
    # SmolLM-135M
    "small": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                  tie_word_embeddings=True),
}


def _shape(sizes: dict[str, dict[str, Any]], size: str, family: str) -> dict[str, Any]:
    if size not in sizes:
        raise ValueError(f"{family} size={size!r} is unknown; choose one of {sorted(sizes)}")
    return sizes[size]


def _build(
    model_cls: type[PreTrainedModel],
    config: PretrainedConfig,
    seed: int,
    attn_implementation: str,
    **model_kwargs: Any,
) -> Any:
    """Seeded float32 eval-mode model; the caller's global RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls._from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32, **model_kwargs
        )
    return model.eval()


def gpt2(size: str = "tiny", seed: int = 0, attn_implementation: str = "sdpa") -> GPT2LMHeadModel:
    """GPT-2 LM (projections are transformers ``Conv1D``, stored [in, out]); "small" is 124M."""
    config = GPT2Config(**_shape(GPT2_SIZES, size, "gpt2"))
    return _build(GPT2LMHeadModel, config, seed, attn_implementation)


def kogpt2(seed: int = 0, attn_implementation: str = "sdpa") -> GPT2LMHeadModel:
    """KoGPT-2 base shape: GPT-2 with a 51200-token vocabulary, 768 wide, 12 layers, 12 heads."""
    return _build(GPT2LMHeadModel, GPT2Config(**KOGPT2), seed, attn_implementation)


def bert(size: str = "tiny", seed: int = 0, attn_implementation: str = "sdpa") -> BertModel:
    """BERT encoder without pooler, as sentence embeddings use it; "base" is bert-base-uncased."""
    config = BertConfig(**_shape(BERT_SIZES, size, "bert"))
    return _build(BertModel, config, seed, attn_implementation, add_pooling_layer=False)


def llama(size: str = "tiny", seed: int = 0, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """Llama LM with grouped-query attention (GQA); "small" is SmolLM-135M."""
    config = LlamaConfig(**_shape(LLAMA_SIZES, size, "llama"))
    return _build(LlamaForCausalLM, config, seed, attn_implementation)
