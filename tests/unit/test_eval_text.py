"""Held-out-text evaluation of a causal LM (``rs-compile eval --model gemma3-270m``) on tiny models:
perplexity and chunked KL against float64 re-derivations, searched-scale baselines, per-part
storage of every method against hand counts, and GGUF sizes from a file written here."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BatchEncoding

import rs_compile
from rs_compile.codec.format import Format
from rs_compile.eval import baselines, harness, methods, metrics
from rs_compile.models import configs


class CharTokenizer:
    """A tiny stand-in for a tokenizer: one id per character (2 + code point mod 1000), BOS 1."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = ([self.bos_token_id] if add_special_tokens else []) + [2 + ord(c) % 1000 for c in text]
        return BatchEncoding({"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids})

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i - 2) for i in ids.tolist() if i >= 2)


def tied_llama():
    model = configs.llama("tiny")
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def test_perplexity_and_kl_match_a_float64_rederivation(monkeypatch):
    teacher, student = configs.llama("tiny", seed=0), configs.llama("tiny", seed=1)
    ids = torch.randint(0, 1024, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp = torch.log_softmax(teacher(ids).logits.double(), -1)
        lq = torch.log_softmax(student(ids).logits.double(), -1)
    want_kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    want_ppl = math.exp(float(-lq[:, :-1].gather(-1, ids[:, 1:, None]).mean()))
    monkeypatch.setattr(metrics, "POSITION_ELEMENTS", 3 * 1024)  # 1 position per slice (x 3 rows)
    for reference in (teacher, metrics.batch_logits(teacher, ids, batch_size=2)):
        got = metrics.next_token_kl_top1(reference, student, ids, batch_size=2)
        assert got.kl == pytest.approx(want_kl, rel=1e-5)
        assert got.ppl == pytest.approx(want_ppl, rel=1e-5)
        assert got.top1 == pytest.approx(float((lp.argmax(-1) == lq.argmax(-1)).double().mean()))
    same = metrics.next_token_kl_top1(teacher, teacher, ids)
    assert same.kl == pytest.approx(0, abs=1e-12) and same.top1 == 1
    assert same.ppl == pytest.approx(math.exp(float(-lp[:, :-1].gather(-1, ids[:, 1:, None]).mean())))


def test_held_out_text_tokens_and_prompts(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("abcdefghijklmnopqrstuvwxyz" * 4)
    text = harness.held_out_text(CharTokenizer(), tokens=40, n_prompts=4, prompt_tokens=5, path=path)
    chars = [2 + ord(c) for c in path.read_text()]
    assert text.sequences.tolist() == [[1, *chars[:40]]]
    stride = (40 - 5) // 4
    assert text.prompts.tolist() == [[1, *chars[o : o + 5]] for o in range(0, 4 * stride, stride)]
    assert "BOS + the first 40 tokens of text.txt" in text.description
    with pytest.raises(ValueError, match="has 104 tokens"):
        harness.held_out_text(CharTokenizer(), tokens=200, path=path)


def test_the_original_against_itself_and_a_lossless_student():
    model = configs.llama("tiny")
    ids = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(1))
    results = harness.compare_causal_lm(
        model, {"identity": lambda: model, "rtn": lambda: harness.quantize_model_weights(
            model, harness.baseline_quantizers(32)["rtn_int4"])}, ids, ids[:, :4], new_tokens=6)
    original, identity = results["original"], results["identity"]
    assert original.kl == pytest.approx(0, abs=1e-12) and original.bleu == 100
    assert identity == pytest.approx(original)
    assert original.ppl == pytest.approx(metrics.next_token_kl_top1(model, model, ids).ppl)
    assert results["rtn"].kl > 1e-6


@pytest.mark.parametrize("fn,levels", [(baselines.nf4, baselines.NF4_LEVELS),
                                       (baselines.rtn_int4, tuple(range(-7, 8)))])
def test_searched_scales_sit_on_the_stored_grid_and_beat_absmax(fn, levels):
    w = torch.randn(24, 100, generator=torch.Generator().manual_seed(2)) ** 3  # heavy tails
    searched, absmax = fn(w, 32, scale_search=True), fn(w, 32)
    assert ((searched - w) ** 2).sum() < ((absmax - w) ** 2).sum()
    groups = torch.nn.functional.pad(searched, (0, 28)).view(-1, 32).double()
    table = torch.tensor(levels, dtype=torch.float64)
    for vals in groups[groups.abs().sum(-1) > 0]:
        # some scale s puts every value of the group on the level grid: s = |top| / |level|
        on_grid = [((vals / s).unsqueeze(-1) - table).abs().min(-1).values.max() < 1e-4
                   for s in (vals.abs().max() / table[table != 0].abs())]
        on_grid += [((-vals / s).unsqueeze(-1) - table).abs().min(-1).values.max() < 1e-4
                    for s in (vals.abs().max() / table[table != 0].abs())]
        assert any(on_grid)


def test_fake_quantized_storage_is_the_hand_count():
    model = tied_llama()
    student = methods.fake_quantized(harness.baseline_quantizers(32)["nf4"],
                                     methods.group_storage(4, 32, 8, 16))(model)
    shapes = [(m.out_features, m.in_features) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    bits = sum(o * (-(-i // 32) * (32 * 4 + 8) + 16) for o, i in shapes)
    assert student.linear_bits == pytest.approx(bits / sum(o * i for o, i in shapes))
    assert student.embedding_bits == 32
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n) * 4
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert student.nbytes == math.ceil(bits / 8) + 1024 * 64 * 4 + norms + buffers


@pytest.mark.parametrize("embeddings", [True, False])
def test_ours_student_computes_what_the_converted_model_computes(embeddings):
    model = tied_llama()
    ids = torch.randint(0, 1024, (2, 9), generator=torch.Generator().manual_seed(3))
    student = methods.ours({"embeddings": embeddings})(model)
    converted = rs_compile.convert(tied_llama(), embeddings=embeddings)
    with torch.no_grad():
        torch.testing.assert_close(student.model(ids).logits, converted(ids).logits,
                                   rtol=1e-4, atol=1e-4)
    shapes = [(m.out_features, m.in_features) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    linear_bytes = sum(Format(4, 32).nbytes(o, i) for o, i in shapes)
    assert student.linear_bits == pytest.approx(8 * linear_bytes / sum(o * i for o, i in shapes))
    table_bytes = Format(5, 32).nbytes(1024, 64) if embeddings else 1024 * 64 * 4
    assert student.embedding_bits == pytest.approx(8 * table_bytes / (1024 * 64))
    rest = sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    rest += sum(b.numel() * b.element_size() for b in model.buffers())
    assert student.nbytes == linear_bytes + table_bytes + rest
    if embeddings:
        from rs_compile.demo import model_bytes

        assert student.nbytes == model_bytes(converted)  # every byte the converted model holds


def test_gguf_sizes_from_the_tensor_table(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    rng = torch.Generator().manual_seed(4)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, shape in (("blk.0.attn_q.weight", (64, 64)), ("blk.0.ffn_down.weight", (64, 128))):
        data = gguf.quants.quantize(torch.randn(shape, generator=rng).numpy(), q8)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=q8)
    writer.add_tensor("token_embd.weight", torch.randn(100, 64, generator=rng).numpy())
    writer.add_tensor("blk.0.attn_norm.weight", torch.ones(64).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    linear_bits, table_bits, nbytes = methods.gguf_sizes(path)
    assert linear_bits == pytest.approx(8.5)  # Q8_0: 32 int8 codes + one fp16 scale per block
    assert table_bits == 32
    assert nbytes == (64 * 64 + 64 * 128) * 34 // 32 + 100 * 64 * 4 + 64 * 4
