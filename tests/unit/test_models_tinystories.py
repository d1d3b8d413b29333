"""The HF Llama from load_llama2c must match a forward written from the llama2.c format facts."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from rs_compile.models.tinystories import default_stories_path, load_llama2c

STORIES = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K.bin"
STORIES_SHA256 = "9414d5a285453a7eab631713d171753232c978f6f97654211469aff8be93c8d6"
needs_stories = pytest.mark.skipif(
    not STORIES.is_file(), reason=f"{STORIES} not present (shared model folder)"
)


def _reference_weights(path: Path) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Parse the file with numpy in float64, following the README's array order."""
    raw = path.read_bytes()
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = np.frombuffer(raw, "<i4", 7).tolist()
    kv_dim = dim // heads * kv_heads
    floats = np.frombuffer(raw, "<f4", offset=28).astype(np.float64)
    w, pos = {}, 0
    for name, shape in [
        ("emb", (vocab, dim)), ("att_norm", (layers, dim)), ("wq", (layers, dim, dim)),
        ("wk", (layers, kv_dim, dim)), ("wv", (layers, kv_dim, dim)), ("wo", (layers, dim, dim)),
        ("ffn_norm", (layers, dim)), ("w1", (layers, hidden, dim)), ("w2", (layers, dim, hidden)),
        ("w3", (layers, hidden, dim)), ("norm", (dim,)),
    ]:
        n = int(np.prod(shape))
        w[name] = floats[pos : pos + n].reshape(shape)
        pos += n
    return dict(dim=dim, layers=layers, heads=heads, kv_heads=kv_heads), w


def _reference_logits(
    cfg: dict[str, int], w: dict[str, np.ndarray], tokens: list[int]
) -> np.ndarray:
    """llama2.c forward: interleaved RoPE on (2i, 2i+1), GQA, RMSNorm 1e-5, SwiGLU, tied logits."""
    dim, heads, kv_heads = cfg["dim"], cfg["heads"], cfg["kv_heads"]
    hd, t = dim // heads, len(tokens)

    def rmsnorm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g

    def rope(x):  # x: (t, n_heads, hd)
        freqs = 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)
        ang = np.arange(t)[:, None] * freqs[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    x = w["emb"][tokens]
    causal = np.triu(np.full((t, t), -np.inf), 1)
    for l in range(cfg["layers"]):
        a = rmsnorm(x, w["att_norm"][l])
        q = rope((a @ w["wq"][l].T).reshape(t, heads, hd))
        k = rope((a @ w["wk"][l].T).reshape(t, kv_heads, hd))
        v = (a @ w["wv"][l].T).reshape(t, kv_heads, hd)
        out = np.empty((t, heads, hd))
        for h in range(heads):
            kvh = h // (heads // kv_heads)
            s = q[:, h] @ k[:, kvh].T / np.sqrt(hd) + causal
            p = np.exp(s - s.max(-1, keepdims=True))
            out[:, h] = (p / p.sum(-1, keepdims=True)) @ v[:, kvh]
        x = x + out.reshape(t, dim) @ w["wo"][l].T
        f = rmsnorm(x, w["ffn_norm"][l])
        g = f @ w["w1"][l].T
        x = x + ((g / (1 + np.exp(-g))) * (f @ w["w3"][l].T)) @ w["w2"][l].T
    return rmsnorm(x, w["norm"]) @ w["emb"].T


@needs_stories
def test_file_is_the_published_checkpoint():
    assert hashlib.sha256(STORIES.read_bytes()).hexdigest() == STORIES_SHA256
    assert default_stories_path() == STORIES


@needs_stories
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_hf_logits_match_reference_forward(attn_implementation):
    model = load_llama2c(STORIES, attn_implementation=attn_implementation)
    assert not model.training and model.dtype == torch.float32
    assert model.config._attn_implementation == attn_implementation
    cfg, w = _reference_weights(STORIES)
    rng = np.random.default_rng(7)
    sequences = [[1], [1, 300, 45, 12], [1] + rng.integers(3, 512, size=40).tolist()]
    for tokens in sequences:
        with torch.no_grad():
            got = model(torch.tensor([tokens])).logits[0].double().numpy()
        want = _reference_logits(cfg, w, tokens)
        # float32 HF vs float64 reference through 5 layers: rounding is ~1e-6 of the logit scale,
        # a wrong RoPE pairing or GQA mapping moves logits by O(1); 1e-4 of the scale separates.
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


@needs_stories
def test_rope_pairing_matters():
    """The reference tells the interleaved layout from HF's: unpermuted wq/wk give other logits."""
    cfg, w = _reference_weights(STORIES)
    tokens = [1, 300, 45, 12, 99, 7]
    model = load_llama2c(STORIES)
    with torch.no_grad():
        for layer in model.model.layers:  # undo the loader's permutation: rows back to file order
            attn = layer.self_attn
            for proj, n in ((attn.q_proj, cfg["heads"]), (attn.k_proj, cfg["kv_heads"])):
                rows, cols = proj.weight.shape
                halves = proj.weight.view(n, 2, rows // n // 2, cols)
                proj.weight.copy_(halves.transpose(1, 2).reshape(rows, cols))
        got = model(torch.tensor([tokens])).logits[0].double().numpy()
    want = _reference_logits(cfg, w, tokens)
    assert np.abs(got - want).max() > 1e-2 * np.abs(want).max()


def test_rejects_truncated_file(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(np.array([64, 172, 5, 8, 4, 512, 512], "<i4").tobytes() + b"\0" * 100)
    with pytest.raises(ValueError, match="truncated"):
        load_llama2c(path)


def test_rejects_bad_header(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(np.array([64, 172, 5, 7, 4, 512, 512], "<i4").tobytes())
    with pytest.raises(ValueError, match="inconsistent"):
        load_llama2c(path)
    path.write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="header"):
        load_llama2c(path)
