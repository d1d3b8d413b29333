"""Load a llama2.c "version 0" checkpoint (e.g. TinyStories-260K) as a Hugging Face Llama model.

The only trained decoder LM available offline is llama2.c's ``stories260K.bin``, so the fidelity
harness needs it as an ordinary ``LlamaForCausalLM`` (whose Linear layers the backend rewrites).
llama2.c applies RoPE to interleaved pairs ``(2i, 2i+1)`` of each head while HF rotates halves
``(i, i + head_dim/2)``; permuting the rows of ``wq``/``wk`` per head makes the two agree.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

HEADER_FIELDS = (
    "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"
)
HEADER_BYTES = 4 * len(HEADER_FIELDS)


STORIES_ENV = "RS_COMPILE_STORIES"  # path of stories260K.bin, for checkouts without ../shared


def default_stories_path() -> Path | None:
    """``$RS_COMPILE_STORIES`` if set, else ``../shared/models/stories260K.bin`` next to the
    repository checkout (e.g. a git worktree elsewhere), if present."""
    if os.environ.get(STORIES_ENV):
        path = Path(os.environ[STORIES_ENV]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{STORIES_ENV}={os.environ[STORIES_ENV]} is not a file; point it "
                                    "at the llama2.c stories260K.bin")
        return path
    repo_root = Path(__file__).resolve().parents[2]
    path = repo_root.parent / "shared" / "models" / "stories260K.bin"
    return path if path.is_file() else None


def _read_header(raw: bytes, path: Path) -> dict[str, int]:
    if len(raw) < HEADER_BYTES:
        raise ValueError(
            f"{path} has {len(raw)} bytes, fewer than the {HEADER_BYTES}-byte llama2.c header; "
            "pass a llama2.c version-0 export (e.g. stories260K.bin)"
        )
    values = np.frombuffer(raw, dtype="<i4", count=len(HEADER_FIELDS)).tolist()
    header = dict(zip(HEADER_FIELDS, values))
    dims_ok = header["vocab_size"] != 0 and all(
        header[k] > 0 for k in HEADER_FIELDS if k != "vocab_size"
    )
    if (
        not dims_ok
        or header["dim"] % header["n_heads"]
        or header["n_heads"] % header["n_kv_heads"]
        or (header["dim"] // header["n_heads"]) % 2
    ):
        raise ValueError(
            f"{path} has an inconsistent llama2.c header {header}: dims must be positive, dim "
            "divisible by n_heads, n_heads by n_kv_heads, and head_dim even; is this a version-0 "
            "export (newer llama2.c versions start with a magic number instead)?"
        )
    return header


def _array_shapes(h: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """Arrays after the header in file order; the RoPE tables are read only to be skipped."""
    dim, hidden, layers, vocab = h["dim"], h["hidden_dim"], h["n_layers"], abs(h["vocab_size"])
    head_dim = dim // h["n_heads"]
    kv_dim = head_dim * h["n_kv_heads"]
    shapes = [
        ("tok_embeddings", (vocab, dim)),
        ("attention_norm", (layers, dim)),
        ("wq", (layers, dim, dim)),
        ("wk", (layers, kv_dim, dim)),
        ("wv", (layers, kv_dim, dim)),
        ("wo", (layers, dim, dim)),
        ("ffn_norm", (layers, dim)),
        ("w1", (layers, hidden, dim)),
        ("w2", (layers, dim, hidden)),
        ("w3", (layers, hidden, dim)),
        ("norm", (dim,)),
        ("freq_cis_real", (h["seq_len"], head_dim // 2)),
        ("freq_cis_imag", (h["seq_len"], head_dim // 2)),
    ]
    if h["vocab_size"] < 0:  # negative vocab_size: an unshared classifier follows the RoPE tables
        shapes.append(("wcls", (vocab, dim)))
    return shapes


def _rotate_half_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from interleaved pairs (2i, 2i+1) to halves (i, i + head_dim/2)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def load_llama2c(
    path: str | os.PathLike, attn_implementation: str = "sdpa"
) -> LlamaForCausalLM:
    """Load a llama2.c version-0 export as a float32 ``LlamaForCausalLM`` in eval mode."""
    path = Path(path)
    raw = path.read_bytes()
    h = _read_header(raw, path)
    shapes = _array_shapes(h)
    expected = HEADER_BYTES + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if len(raw) != expected:
        raise ValueError(
            f"{path} has {len(raw)} bytes but header {h} implies {expected} (float32 weights plus "
            "RoPE tables); the file is truncated or not a llama2.c version-0 export"
        )
    arrays, offset = {}, HEADER_BYTES
    for name, shape in shapes:
        count = int(np.prod(shape))
        values = np.frombuffer(raw, dtype="<f4", count=count, offset=offset)
        arrays[name] = torch.from_numpy(values.reshape(shape).copy())
        offset += 4 * count

    tied = h["vocab_size"] > 0
    config = LlamaConfig(
        vocab_size=abs(h["vocab_size"]),
        hidden_size=h["dim"],
        intermediate_size=h["hidden_dim"],
        num_hidden_layers=h["n_layers"],
        num_attention_heads=h["n_heads"],
        num_key_value_heads=h["n_kv_heads"],
        max_position_embeddings=h["seq_len"],
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM._from_config(
        config, attn_implementation=attn_implementation, dtype=torch.float32
    )

    state = {
        "model.embed_tokens.weight": arrays["tok_embeddings"],
        "model.norm.weight": arrays["norm"],
        "lm_head.weight": arrays["tok_embeddings"] if tied else arrays["wcls"],
    }
    for i in range(h["n_layers"]):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": arrays["attention_norm"][i],
            p + "self_attn.q_proj.weight": _rotate_half_rows(arrays["wq"][i], h["n_heads"]),
            p + "self_attn.k_proj.weight": _rotate_half_rows(arrays["wk"][i], h["n_kv_heads"]),
            p + "self_attn.v_proj.weight": arrays["wv"][i],
            p + "self_attn.o_proj.weight": arrays["wo"][i],
            p + "post_attention_layernorm.weight": arrays["ffn_norm"][i],
            p + "mlp.gate_proj.weight": arrays["w1"][i],
            p + "mlp.down_proj.weight": arrays["w2"][i],
            p + "mlp.up_proj.weight": arrays["w3"][i],
        }
    model.load_state_dict(state, strict=True)
    return model.eval()
