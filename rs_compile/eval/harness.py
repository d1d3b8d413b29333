"""Fidelity harness: any codec, given as a fake-quantizer, against the original model.

A quantizer is ``quantize(name, weight[out, in]) -> reconstruction[out, in]``; the harness puts the
reconstructions into a copy of the model and compares copy and original layer by layer (weight
error) and end to end (next-token KL / top-1 / greedy BLEU for causal LMs, embedding cosine for
encoders) on held-out data. Baselines and the project's codec plug in the same way.
"""

from __future__ import annotations

import copy
import math
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from rs_compile.eval import baselines
from rs_compile.eval.metrics import (
    batch_logits,
    bleu,
    embedding_cosine,
    greedy_continuations,
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
    ppl: float = math.nan  # perplexity of the held-out tokens under the quantized model


class HeldOutText(NamedTuple):
    """Token ids of held-out text for :func:`compare_causal_lm`, and what they are."""

    sequences: torch.Tensor  # [1, 1 + tokens]: BOS, then the text's first ``tokens`` tokens
    prompts: torch.Tensor  # [n_prompts, 1 + prompt_tokens]: BOS + slices of the same tokens
    description: str


def baseline_quantizers(group_size: int = 64, scale_search: bool = True) -> dict[str, Quantizer]:
    """The reference codecs of ``baselines`` as harness quantizers (they ignore the layer name).

    ``scale_search``: NF4 / RTN / int8 scales come from the per-group search and scale storage of
    rs_compile's own encoder (``baselines.searched_scales``), a fair fight; False: plain absmax
    scales, as bitsandbytes does. HQQ always runs its own zero-point search."""
    def by_weight(fn: Callable[..., torch.Tensor], **options) -> Quantizer:
        return lambda name, w: fn(w, group_size=group_size, **options)

    searched = {"scale_search": scale_search}
    return {"nf4": by_weight(baselines.nf4, **searched),
            "rtn_int4": by_weight(baselines.rtn_int4, **searched),
            "int8": by_weight(baselines.int8, **searched), "hqq4": by_weight(baselines.hqq)}


def calibrated_baseline(
    model: nn.Module, items: list, quantize: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Quantizer:
    """A calibrated reference codec as a harness quantizer: ``quantize(weight [out, in],
    X^T X / rows) -> reconstruction`` run on every quantizable layer of ``model`` in call order,
    each layer's inputs coming from the model with the earlier layers already quantized (the
    sequential mode rs_compile's own calibration uses, rs_compile.calibration); ``items`` are
    calibration inputs as for ``convert(calibration=...)``. The model is not changed."""
    from rs_compile.calibration import Layer, check_items, sequential_reconstructions

    layers = {name: Layer(module, _oriented(module), module.bias)
              for name, module in _quantizable(model).items()}

    def reconstruct(name: str, moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w_hat = quantize(layers[name].weight, moments)
        return w_hat, w_hat

    recon = sequential_reconstructions(model, layers, check_items(items), reconstruct)
    return lambda name, w: recon[name].to(w.dtype)


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


def compare_causal_lm(
    model: nn.Module,
    students: dict[str, Callable[[], nn.Module]],
    sequences: torch.Tensor,
    prompts: torch.Tensor,
    new_tokens: int,
    batch_size: int = 16,
    on_student: Callable[[str], None] | None = None,
    on_result: Callable[[str, CausalLMFidelity], None] | None = None,
) -> dict[str, CausalLMFidelity]:
    """Per student: teacher-forced KL / top-1 / perplexity on ``sequences`` and greedy BLEU of
    ``new_tokens``-token continuations of ``prompts``, against the original ``model``.

    The original's logits and continuations are computed once; each student is built by its
    callable only when its turn comes (``on_student(name)`` is called first) and dropped after,
    so one large model at a time sits beside the original; ``on_result(name, fidelity)`` reports
    each result (the original's first) as soon as it is measured. The ``"original"`` entry of the result
    scores the model against itself (KL 0, BLEU 100) and carries its own perplexity.
    """
    reference = batch_logits(model, sequences, batch_size)
    continuations = greedy_continuations(model, prompts, new_tokens)
    self_kl = next_token_kl_top1(reference, _Replay(reference), sequences, batch_size)
    results = {"original": CausalLMFidelity(self_kl.kl, self_kl.top1, 100.0, self_kl.ppl)}
    if on_result is not None:
        on_result("original", results["original"])
    for name, build in students.items():
        if on_student is not None:
            on_student(name)
        student = build()
        kl, top1, ppl = next_token_kl_top1(reference, student, sequences, batch_size)
        score = bleu(greedy_continuations(student, prompts, new_tokens), continuations)
        results[name] = CausalLMFidelity(kl, top1, score, ppl)
        if on_result is not None:
            on_result(name, results[name])
        del student
    return results


class _Replay(nn.Module):
    """Returns recorded logits batch by batch (the original scored against itself)."""

    def __init__(self, logits: list[torch.Tensor]):
        super().__init__()
        self._logits = iter(logits)

    def forward(self, ids: torch.Tensor) -> Any:
        return _Logits(next(self._logits))


class _Logits(NamedTuple):
    logits: torch.Tensor


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
    ``prompt_length`` tokens of the first ``bleu_prompts`` of them by ``new_tokens`` tokens.
    (For a model without a tokenizer; :func:`held_out_text` gives real text to models with one.)"""
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
    students = {name: partial(quantize_model_weights, model, q) for name, q in quantizers.items()}
    results = compare_causal_lm(model, students, sequences, prompts, new_tokens)
    del results["original"]
    return results


HELDOUT_FILE = Path(__file__).parent / "data" / "heldout.txt"
CALIBRATION_FILE = Path(__file__).parent / "data" / "calibration.txt"


def held_out_text(
    tokenizer: PreTrainedTokenizerBase,
    tokens: int = 1024,
    n_prompts: int = 32,
    prompt_tokens: int = 16,
    path: str | Path = HELDOUT_FILE,
) -> HeldOutText:
    """The evaluation tokens of a real LM: BOS then the first ``tokens`` tokens of ``path``
    (rs_compile/eval/data/heldout.txt, never used for calibration), and ``n_prompts`` BLEU prompts,
    each BOS + ``prompt_tokens`` tokens of the same text starting at evenly spaced offsets."""
    text = Path(path).read_text()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token; held_out_text starts every row with it")
    if len(ids) < tokens or tokens < prompt_tokens or n_prompts < 1:
        raise ValueError(f"{path} has {len(ids)} tokens; need tokens ({tokens}) <= that, "
                         f"prompt_tokens ({prompt_tokens}) <= tokens and n_prompts >= 1")
    ids = ids[:tokens]
    stride = max(1, (tokens - prompt_tokens) // n_prompts)
    offsets = [i * stride for i in range(n_prompts)]
    prompts = torch.tensor([[bos, *ids[o : o + prompt_tokens]] for o in offsets])
    description = (
        f"BOS + the first {tokens} tokens of {Path(path).name} ({len(ids) + 1} positions: KL and "
        f"top-1 over all of them, perplexity over the {tokens} tokens after BOS); BLEU of "
        f"greedy continuations of {n_prompts} prompts, each BOS + {prompt_tokens} tokens of the "
        f"same text at token offsets 0, {stride}, ..., {offsets[-1]}"
    )
    return HeldOutText(torch.tensor([[bos, *ids]]), prompts, description)


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
