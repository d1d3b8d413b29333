"""Fidelity measures against hand formulas, torch/sacrebleu references and cache-free decoding."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import sacrebleu
import torch
from torch import nn

from rs_compile.eval.metrics import (
    embedding_cosine,
    greedy_bleu,
    next_token_kl_top1,
    sample_sequences,
    weight_rel_mse,
)
from rs_compile.models import configs


class BigramLM(nn.Module):
    """Next-token logits depend only on the current token, ``table[token]``: no cache needed."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table
        self.config = SimpleNamespace(max_position_embeddings=1000)

    def forward(self, ids, cache=None, use_cache=None):
        return SimpleNamespace(logits=self.table[ids], cache=None)


def _cycle(vocab: int, shift: int = 1, sharpness: float = 10.0) -> torch.Tensor:
    successor = (torch.arange(vocab) + shift) % vocab
    return sharpness * torch.nn.functional.one_hot(successor, vocab).float()


def test_weight_rel_mse_hand_formula():
    w = torch.tensor([[3.0, -4.0], [0.0, 0.0]])
    assert weight_rel_mse(w, torch.tensor([[3.0, -3.0], [0.0, 1.0]])) == pytest.approx(2 / 25)
    with pytest.raises(ValueError, match="all zeros"):
        weight_rel_mse(torch.zeros(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="shapes differ"):
        weight_rel_mse(w, w.T[:1])


def test_kl_and_top1_match_torch_reference():
    g = torch.Generator().manual_seed(0)
    teacher = BigramLM(torch.randn(11, 11, generator=g) * 3)
    student = BigramLM(torch.randn(11, 11, generator=g) * 3)
    seqs = torch.randint(0, 11, (5, 9), generator=g)
    got = next_token_kl_top1(teacher, student, seqs, batch_size=2)
    lp, lq = (torch.log_softmax(m.table[seqs].double(), -1).flatten(0, 1)
              for m in (teacher, student))
    want_kl = torch.nn.functional.kl_div(lq, lp, reduction="batchmean", log_target=True)
    assert got.kl == pytest.approx(float(want_kl), rel=1e-9)
    assert got.top1 == pytest.approx(float((lp.argmax(-1) == lq.argmax(-1)).double().mean()))
    same = next_token_kl_top1(teacher, teacher, seqs)
    assert same.kl == pytest.approx(0.0, abs=1e-12) and same.top1 == 1.0


def test_samples_follow_the_model_distribution():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    model = BigramLM(probs.log())
    seqs = sample_sequences(model, n=400, length=21, seed=3, prompt_token=1)
    assert seqs.shape == (400, 21) and (seqs[:, 0] == 1).all()
    assert torch.equal(seqs, sample_sequences(model, 400, 21, seed=3))
    assert not torch.equal(seqs, sample_sequences(model, 400, 21, seed=4))
    pairs = torch.stack([seqs[:, :-1].reshape(-1), seqs[:, 1:].reshape(-1)], 1)
    for a in range(3):
        nxt = pairs[pairs[:, 0] == a, 1]
        freq = torch.bincount(nxt, minlength=3).double() / len(nxt)
        # >= 1500 transitions per state: binomial s.d. <= 0.013, so 0.05 is ~4 s.d.
        assert len(nxt) > 1500
        torch.testing.assert_close(freq, probs[a].double(), atol=0.05, rtol=0)


@pytest.mark.parametrize("build", [configs.llama, configs.gpt2])
def test_cached_sampling_equals_full_recompute(build):
    model = build()
    seqs = sample_sequences(model, n=3, length=12, seed=9, prompt_token=1)
    g = torch.Generator().manual_seed(9)
    ids = torch.ones(3, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(11):  # no KV cache: re-run the whole prefix every step
            p = torch.softmax(model(ids).logits[:, -1].double(), -1)
            ids = torch.cat([ids, torch.multinomial(p, 1, generator=g)], 1)
    assert torch.equal(seqs, ids)


def test_greedy_bleu_protocol():
    vocab = 50
    teacher, student = BigramLM(_cycle(vocab)), BigramLM(_cycle(vocab))
    prompts = torch.tensor([[1, 5], [2, 30]])
    assert greedy_bleu(teacher, student, prompts, new_tokens=12) == pytest.approx(100.0)
    student.table = _cycle(vocab).clone()
    student.table[10] = _cycle(vocab, shift=2)[10]  # after token 10 the student skips a number
    # Greedy continuations written out by hand from the prompts' last tokens (5 and 30):
    ref = [" ".join(map(str, range(6, 18))), " ".join(map(str, range(31, 43)))]
    hyp = [" ".join(map(str, [6, 7, 8, 9, 10] + list(range(12, 19)))), ref[1]]
    want = sacrebleu.corpus_bleu(hyp, [ref], tokenize="none").score
    assert greedy_bleu(teacher, student, prompts, new_tokens=12) == pytest.approx(want)
    assert want < 100


def test_decoding_respects_position_limit():
    model = BigramLM(_cycle(5))
    model.config.max_position_embeddings = 10
    with pytest.raises(ValueError, match="exceed"):
        sample_sequences(model, n=1, length=11, seed=0)


def test_embedding_cosine_hand_formula():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0], [-3.0, -4.0]])
    want = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    got = embedding_cosine(torch.tensor(a), torch.tensor(b))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    with pytest.raises(ValueError):
        embedding_cosine(torch.zeros(3, 2), torch.zeros(2, 2))
