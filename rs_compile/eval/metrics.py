"""Standard fidelity measures between an original (teacher) model and a quantized (student) copy.

Every measure compares the two models on held-out inputs; none mixes the teacher into the student's
decoding. Causal-LM measures take token-id tensors, so they need no tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable, NamedTuple

import sacrebleu
import torch
from torch import nn


class NextTokenAgreement(NamedTuple):
    kl: float  # mean KL(teacher || student) of next-token distributions, nats
    top1: float  # fraction of positions where both models' most likely next token agree
    ppl: float = math.nan  # student perplexity of the sequences' own next tokens


def weight_rel_mse(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Relative weight error: sum of squared errors / sum of squares of ``w`` (float64)."""
    if w.shape != w_hat.shape:
        raise ValueError(
            f"shapes differ: weight {tuple(w.shape)} vs reconstruction {tuple(w_hat.shape)}"
        )
    w, w_hat = w.detach().double(), w_hat.detach().double()
    energy = w.square().sum()
    if energy == 0:
        raise ValueError("the reference weight is all zeros, so a relative error is undefined")
    return float((w - w_hat).square().sum() / energy)


POSITION_ELEMENTS = 1 << 23  # logits compared at once in float64: 64 MB per tensor


@torch.no_grad()
def batch_logits(model: nn.Module, sequences: torch.Tensor, batch_size: int = 16) -> list[torch.Tensor]:
    """float32 logits ``[b, length, vocab]`` of ``model`` on each batch of ``batch_size`` rows of
    ``sequences``: a teacher's outputs computed once and compared with many students."""
    _check_sequences(sequences)
    return [model(batch).logits.float() for batch in sequences.split(batch_size)]


def _check_sequences(sequences: torch.Tensor) -> None:
    if sequences.dim() != 2 or sequences.numel() == 0:
        raise ValueError(
            "sequences must be a non-empty [n, length] token tensor, "
            f"got shape {tuple(sequences.shape)}"
        )


@torch.no_grad()
def next_token_kl_top1(
    teacher: nn.Module | Sequence[torch.Tensor], student: nn.Module, sequences: torch.Tensor,
    batch_size: int = 16,
) -> NextTokenAgreement:
    """Teacher-forced comparison over every position of ``sequences`` ``[n, length]``.

    Both models read the same tokens; at each position the next-token distributions are compared
    (KL in float64, averaged over all n x length positions) together with their argmax. ``ppl`` is
    the student's perplexity of the tokens that follow (``exp`` of the mean negative log-likelihood
    over the n x (length - 1) positions that have a next token). ``teacher`` is a model or its
    :func:`batch_logits` on the same ``sequences`` and ``batch_size``. Logits are compared a slice
    of positions at a time, so a 262k vocabulary needs no float64 copy of the whole output.
    """
    _check_sequences(sequences)
    batches = sequences.split(batch_size)
    if isinstance(teacher, nn.Module):
        teacher_logits = (teacher(batch).logits for batch in batches)
    else:
        teacher_logits = iter(teacher)
        if len(teacher) != len(batches):
            raise ValueError(f"{len(teacher)} batches of teacher logits for {len(batches)} batches "
                             f"of {batch_size} sequences; compute them with the same batch_size")
    kl_sum, nll_sum, agree, positions = 0.0, 0.0, 0, 0
    for batch in batches:
        p_logits, q_logits = next(teacher_logits), student(batch).logits
        if p_logits.shape != q_logits.shape:
            raise ValueError(f"teacher logits {tuple(p_logits.shape)} and student logits "
                             f"{tuple(q_logits.shape)} differ in shape (vocabulary?)")
        n, length, vocab = q_logits.shape
        step = max(1, POSITION_ELEMENTS // (n * vocab))
        for i in range(0, length, step):
            log_p = torch.log_softmax(p_logits[:, i : i + step].double(), -1)
            log_q = torch.log_softmax(q_logits[:, i : i + step].double(), -1)
            kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
            agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
            following = batch[:, i + 1 : i + step + 1]  # the next token of each position, if any
            nll_sum -= float(log_q[:, : following.shape[1]].gather(-1, following.unsqueeze(-1)).sum())
        positions += batch.numel()
    predicted = sequences.shape[0] * (sequences.shape[1] - 1)
    ppl = math.exp(nll_sum / predicted) if predicted else math.nan
    return NextTokenAgreement(kl=kl_sum / positions, top1=agree / positions, ppl=ppl)


@torch.no_grad()
def _extend(
    model: nn.Module,
    ids: torch.Tensor,
    new_tokens: int,
    pick: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Append ``new_tokens`` tokens, each ``pick(logits[n, vocab]) -> [n, 1]``, via the KV cache."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and ids.shape[1] + new_tokens > limit:
        raise ValueError(
            f"{ids.shape[1]} + {new_tokens} tokens exceed the model's {limit} positions; "
            "shorten the request"
        )
    out = model(ids, use_cache=True)
    for step in range(new_tokens):
        token = pick(out.logits[:, -1])
        ids = torch.cat([ids, token], 1)
        if step + 1 < new_tokens:
            out = model(token, cache=out.cache, use_cache=True)
    return ids


def sample_sequences(
    model: nn.Module, n: int, length: int, seed: int, prompt_token: int = 1
) -> torch.Tensor:
    """``[n, length]`` ids: ``prompt_token``, then samples at temperature 1 (no top-k / top-p).

    Text the original model would write, to be used as teacher-forcing input; the seed fully
    determines it, so held-out and calibration text differ by seed.
    """
    if n <= 0 or length < 2:
        raise ValueError(
            f"need n >= 1 and length >= 2 (prompt plus samples), got n={n}, length={length}"
        )
    generator = torch.Generator().manual_seed(seed)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(torch.softmax(logits.double(), -1), 1, generator=generator)

    prompt = torch.full((n, 1), prompt_token, dtype=torch.long)
    return _extend(model, prompt, length - 1, sample)


def greedy_continuations(model: nn.Module, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``[n, new_tokens]``: each prompt row extended greedily (argmax; no stopping at EOS)."""
    def greedy(logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1, keepdim=True)

    return _extend(model, prompts, new_tokens, greedy)[:, prompts.shape[1]:]


def bleu(candidates: torch.Tensor, references: torch.Tensor) -> float:
    """Corpus BLEU (0-100) of token-id rows ``candidates`` against ``references`` (same shape),
    rendered as space-joined ids, sacrebleu's defaults (4-grams, exp smoothing), ``tokenize="none"``."""
    if candidates.shape != references.shape:
        raise ValueError(f"candidates {tuple(candidates.shape)} and references "
                         f"{tuple(references.shape)} differ in shape")

    def render(rows: torch.Tensor) -> list[str]:
        return [" ".join(map(str, row.tolist())) for row in rows]

    return sacrebleu.corpus_bleu(render(candidates), [render(references)], tokenize="none").score


def greedy_bleu(
    teacher: nn.Module, student: nn.Module, prompts: torch.Tensor, new_tokens: int
) -> float:
    """Corpus BLEU (0-100) of the student's greedy continuations against the teacher's.

    Protocol: both models extend each prompt row by ``new_tokens`` greedy tokens (no stopping at
    EOS); only the continuations are scored (:func:`bleu`).
    """
    return bleu(greedy_continuations(student, prompts, new_tokens),
                greedy_continuations(teacher, prompts, new_tokens))


def embedding_cosine(emb_a: torch.Tensor, emb_b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity ``[n]`` of two ``[n, d]`` embedding batches (float64)."""
    if emb_a.shape != emb_b.shape or emb_a.dim() != 2:
        raise ValueError(
            f"need two [n, d] batches of one shape, got {tuple(emb_a.shape)} and "
            f"{tuple(emb_b.shape)}"
        )
    return torch.nn.functional.cosine_similarity(emb_a.double(), emb_b.double(), dim=-1)
