"""Fidelity harness: any codec, given as a fake-quantizer, against the original model.

A quantizer is ``quantize(name, weight[out, in]) -> reconstruction[out, in]``; the harness puts the
reconstructions into a copy of the model and compares copy and original layer by layer (weight
error) and end to end (next-token KL / top-1 / greedy BLEU for causal LMs, embedding cosine for
encoders) on held-out data. Baselines and the project's codec plug in the same way.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Callable, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from rs_compile.eval import baselines
from rs_compile.eval.metrics import (
    embedding_cosine,
    greedy_bleu,
    next_token_kl_top1,
    sample_sequences,
    weight_rel_mse,
)
from rs_compile.eval.splits import CALIBRATION_SEED, HELDOUT_SEED, HELDOUT_SENTENCES
from rs_compile.models.minilm import sentence_embeddings

Quantizer = Callable[[str, torch.Tensor], torch.Tensor]


class CausalLMFidelity(NamedTuple):
    kl: float  # mean next-token KL(original || quantized), nats, teacher-forced held-out samples
    top1: float  # next-token argmax agreement
    bleu: float  # corpus BLEU of greedy continuations, quantized vs original (0-100)


def baseline_quantizers(group_size: int = 64) -> dict[str, Quantizer]:
    """The reference codecs of ``baselines`` as harness quantizers (they ignore the layer name)."""
    def by_weight(fn: Callable[..., torch.Tensor]) -> Quantizer:
        return lambda name, w: fn(w, group_size=group_size)

    codecs = {"nf4": baselines.nf4, "rtn_int4": baselines.rtn_int4, "int8": baselines.int8,
              "hqq4": baselines.hqq}
    return {name: by_weight(fn) for name, fn in codecs.items()}


def _quantizable(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear and transformers Conv1D, except those sharing their weight with an embedding.

    A tied classifier *is* the token embedding: quantizing it would either change the embedding
    too or untie the two (storing both), and the backend rewrites only Linear layers' own weights.
    """
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and id(module.weight) not in embedding_weights
    }


def _oriented(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (Conv1D stores [in, out])."""
    return module.weight.detach().T if isinstance(module, Conv1D) else module.weight.detach()


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Views ``[out, in]`` of the weights the harness quantizes, by module name."""
    return {name: _oriented(module) for name, module in _quantizable(model).items()}


def quantize_model_weights(model: nn.Module, quantize: Quantizer) -> nn.Module:
    """A deep copy of ``model`` with every quantizable weight replaced by its reconstruction."""
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in _quantizable(quantized).items():
            weight = _oriented(module)
            w_hat = quantize(name, weight.clone())
            if not isinstance(w_hat, torch.Tensor) or w_hat.shape != weight.shape:
                got = tuple(w_hat.shape) if isinstance(w_hat, torch.Tensor) else type(w_hat)
                raise ValueError(
                    f"quantizer returned {got} for layer {name!r} of shape {tuple(weight.shape)}; "
                    "it must return a tensor shaped like its [out, in] input"
                )
            if not torch.isfinite(w_hat).all():
                raise ValueError(
                    f"quantizer returned non-finite values for layer {name!r}; "
                    "fix the codec, not the output"
                )
            weight.copy_(w_hat)
    return quantized


def layer_weight_errors(
    model: nn.Module, quantizers: dict[str, Quantizer]
) -> dict[str, dict[str, float]]:
    """``{layer: {quantizer: relative weight MSE}}`` over quantizable layers, in module order."""
    return {
        name: {q: weight_rel_mse(weight, fn(name, weight.clone())) for q, fn in quantizers.items()}
        for name, weight in linear_weights(model).items()
    }


def mean_layer_errors(table: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over layers of each quantizer's relative weight MSE."""
    names = next(iter(table.values()), {})
    return {q: sum(row[q] for row in table.values()) / len(table) for q in names}


def evaluate_causal_lm(
    model: nn.Module,
    quantizers: dict[str, Quantizer],
    n_sequences: int = 64,
    length: int = 128,
    seed: int = HELDOUT_SEED,
    bleu_prompts: int = 32,
    prompt_length: int = 8,
    new_tokens: int = 64,
    prompt_token: int = 1,
) -> dict[str, CausalLMFidelity]:
    """Per quantizer: teacher-forced KL / top-1 on ``n_sequences`` samples of the original model
    (``length`` tokens each, from ``prompt_token``), and greedy BLEU continuing the first
    ``prompt_length`` tokens of the first ``bleu_prompts`` of them by ``new_tokens`` tokens."""
    if seed == CALIBRATION_SEED:
        raise ValueError(
            f"seed {seed} is the calibration seed; evaluate on held-out text (e.g. HELDOUT_SEED)"
        )
    if not 0 < bleu_prompts <= n_sequences or not 0 < prompt_length <= length:
        raise ValueError(
            "BLEU prompts are prefixes of the sampled sequences: need 0 < bleu_prompts <= "
            f"n_sequences ({bleu_prompts}, {n_sequences}) and 0 < prompt_length <= length "
            f"({prompt_length}, {length})"
        )
    sequences = sample_sequences(model, n_sequences, length, seed, prompt_token)
    prompts = sequences[:bleu_prompts, :prompt_length]
    results = {}
    for name, quantize in quantizers.items():
        student = quantize_model_weights(model, quantize)
        kl, top1 = next_token_kl_top1(model, student, sequences)
        results[name] = CausalLMFidelity(kl, top1, greedy_bleu(model, student, prompts, new_tokens))
    return results


def evaluate_encoder(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    quantizers: dict[str, Quantizer],
    sentences: tuple[str, ...] | list[str] = HELDOUT_SENTENCES,
) -> dict[str, float]:
    """Mean ``1 - cos`` between original and quantized pooled sentence embeddings, per quantizer."""
    embed = partial(sentence_embeddings, tokenizer=tokenizer, sentences=list(sentences))
    reference = embed(model)
    drift = {}
    for name, quantize in quantizers.items():
        cos = embedding_cosine(reference, embed(quantize_model_weights(model, quantize)))
        drift[name] = float(1 - cos.mean())
    return drift
