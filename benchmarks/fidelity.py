"""Issue 3 acceptance table: the Poincare codec against NF4 / RTN / HQQ on real trained weights,
and the encoder's speed on a 125M GPT-2.

    python benchmarks/fidelity.py                       # every part (about 5 min on 2 idle cores)
    python benchmarks/fidelity.py --parts speed         # only the GPT-2 encode timing
    python benchmarks/fidelity.py --parts weights minilm stories calibrated eightbit
    python benchmarks/fidelity.py --parts activations   # W4A8: int8 activations on top of 4-bit

Data: held-out sentences / sequences sampled with ``HELDOUT_SEED`` (64 x 128 tokens by default);
calibration uses the disjoint ``CALIBRATION_SENTENCES`` / ``CALIBRATION_SEED`` (docs/fidelity.md).
Every baseline is the harness's own implementation (rs_compile.eval.baselines). NF4, RTN and
int8 get rs_compile's own per-group scale search and scale storage (``searched_scales``) in
groups of 32 like ours, so they store exactly as many bits as ours and only the level sets
differ; NF4 with bitsandbytes' plain absmax scales and HQQ run in groups of 64 as references.
Every codec's all-in bits/weight (codes + per-group bytes + per-row scales, over the quantized
linears) is printed beside it.
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import rs_compile
from rs_compile.config import EncodingConfig
from rs_compile.demo import quantizer
from rs_compile.codec.format import Format
from rs_compile.eval import baselines
from rs_compile.eval.harness import (
    Quantizer,
    baseline_quantizers,
    calibrated_baseline,
    linear_weights,
    evaluate_causal_lm,
    evaluate_encoder,
    layer_weight_errors,
)
from rs_compile.eval.methods import StorageBits, group_storage
from rs_compile.eval.metrics import embedding_cosine, next_token_kl_top1, sample_sequences
from rs_compile.eval.splits import HELDOUT_SEED, HELDOUT_SENTENCES
from rs_compile.eval.splits import CALIBRATION_SEED, CALIBRATION_SENTENCES

PARTS = ("weights", "minilm", "stories", "calibrated", "eightbit", "activations", "speed")
Check = tuple[str, str, "bool | None"]  # (criterion, measured figure, met; None: report only)


GROUP = 32  # rs_compile's default group size; the searched baselines use it too
RTN4_LEVELS = tuple(range(-7, 8))


def ours(bits: int = 4, curvatures: int = 4) -> Quantizer:
    return quantizer(EncodingConfig(bits=bits, curvatures=curvatures))


def ours_storage(bits: int) -> StorageBits:
    """What convert stores for one weight: codes, one byte per group, one bf16 scale per row."""
    return lambda out, k: 8 * Format(bits, GROUP).nbytes(out, k)


# all-in storage of each codec: codes + per-group bytes + per-row scales (bits of one [out, in])
STORAGE: dict[str, StorageBits] = {
    "ours4": ours_storage(4),
    "ours4 curvatures=1": ours_storage(4),  # the curvature bits are still stored, at equal bits
    "nf4": group_storage(4, GROUP, 8, 16),  # searched: a signed step byte per group, bf16 per row
    "rtn_int4": group_storage(4, GROUP, 8, 16),
    "nf4 absmax g64": group_storage(4, 64, 32),  # bitsandbytes without double quant: fp32 absmax
    "hqq4 g64": group_storage(4, 64, 32),  # counted as fp16 scale + fp16 zero (harness: float32)
    "ours8": ours_storage(8),
    "int8": group_storage(8, GROUP, 8, 16),
    "gptq4": ours_storage(4),
    "gptq4 curvatures=1": ours_storage(4),
    "gptq rtn_int4": group_storage(4, GROUP, 8, 16),
}


def codecs() -> dict[str, Quantizer]:
    searched = baseline_quantizers(GROUP, scale_search=True)
    absmax = baseline_quantizers(64, scale_search=False)
    return {"ours4": ours(4), "ours4 curvatures=1": ours(4, curvatures=1), "nf4": searched["nf4"],
            "rtn_int4": searched["rtn_int4"], "nf4 absmax g64": absmax["nf4"],
            "hqq4 g64": absmax["hqq4"]}


def codec_bits(model: nn.Module, name: str) -> float:
    """All-in bits / weight of codec ``name`` over the linears the harness quantizes."""
    shapes = [tuple(w.shape) for w in linear_weights(model).values()]
    return sum(STORAGE[name](o, k) for o, k in shapes) / sum(o * k for o, k in shapes)


def all_in_bits(model: nn.Module, **options) -> float:
    """Bits per weight of what convert stores (codes, scales, curvatures), over the converted linears."""
    report = rs_compile.convert(copy.deepcopy(model), embeddings=False, **options).rs_report
    stored = sum(r.compressed_bytes for r in report.linear_rewrites)
    return 8 * stored / sum(r.out_features * r.in_features for r in report.linear_rewrites)


def calibrated_quantizer(model: nn.Module, calibration: list, label: str, **options) -> Quantizer:
    """The reconstructions convert(calibration=...) stores, as a harness quantizer (prints their size).
    Embeddings stay dense, as in the harness's students, so the layers calibrate on the inputs the
    evaluated model gives them (and on the same ones as the GPTQ baseline)."""
    converted = rs_compile.convert(copy.deepcopy(model), calibration=calibration, embeddings=False,
                                   **options)
    modules = {n: m for n, m in converted.named_modules() if isinstance(m, rs_compile.CompressedLinear)}
    rewrites = converted.rs_report.linear_rewrites
    bpw = 8 * sum(r.compressed_bytes for r in rewrites) / sum(r.out_features * r.in_features for r in rewrites)
    widths = sorted({m.bits for m in modules.values()})
    print(f"{label} calibrated {options or ''}: {len(modules)} linears, code widths {widths}, "
          f"all-in {bpw:.3f} bits/weight")
    recon = {n: m.dequantize() for n, m in modules.items()}
    return lambda name, w: recon[name]


def load_models() -> dict[str, tuple[nn.Module, object]]:
    from rs_compile.models.minilm import load_minilm
    from rs_compile.models.tinystories import default_stories_path, load_llama2c

    return {"minilm": load_minilm(), "stories": (load_llama2c(default_stories_path()), None)}


def part_weights(models) -> list[Check]:
    checks = []
    for label, (model, _) in models.items():
        table = layer_weight_errors(model, codecs())
        ratios = [row["ours4"] / row["nf4"] for row in table.values()]
        means = {q: statistics.mean(row[q] for row in table.values()) for q in next(iter(table.values()))}
        bpw = all_in_bits(model)
        print(f"\n{label}: {len(table)} linears, relative weight MSE (mean over layers) at all-in bits/weight")
        for q, v in means.items():
            print(f"  {q:<22} {v:.5f}  {codec_bits(model, q):.3f} bits")
        worst = max(table, key=lambda n: table[n]["ours4"] / table[n]["nf4"])
        print(f"  ours/NF4 (searched scales, equal bits) per layer: median {statistics.median(ratios):.3f}, "
              f"max {max(ratios):.3f} ({worst}); convert stores {bpw:.3f} bits/weight")
        checks += [
            (f"{label} weight MSE median <= 0.92x NF4 (equal bits)", f"{statistics.median(ratios):.3f}x",
             statistics.median(ratios) <= 0.92),
            (f"{label} weight MSE max <= 1.0x NF4 (equal bits)", f"{max(ratios):.3f}x", max(ratios) <= 1.0),
            (f"{label} all-in bits/weight <= 4.5", f"{bpw:.3f}", bpw <= 4.5),
        ]
    return checks


def part_minilm(models, extra: dict[str, Quantizer] | None = None) -> dict[str, float]:
    model, tokenizer = models["minilm"]
    drift = evaluate_encoder(model, tokenizer, {**codecs(), **(extra or {})})
    print("\nminilm: mean 1 - cos of pooled embeddings, 40 held-out sentences")
    for name, d in drift.items():
        print(f"  {name:<22} 1-cos {d:.5f}  (mean cos {1 - d:.5f})  {_bits(model, name)}")
    return drift


def part_stories(models, sequences: int, extra: dict[str, Quantizer] | None = None) -> dict:
    model, _ = models["stories"]
    results = evaluate_causal_lm(model, {**codecs(), **(extra or {})}, n_sequences=sequences,
                                 bleu_prompts=min(32, sequences))
    print(f"\nstories: teacher-forced next-token KL / top-1 on {sequences} x 128 held-out tokens, greedy BLEU")
    for name, r in results.items():
        print(f"  {name:<22} KL {r.kl:.4f}  top-1 {r.top1:.2%}  BLEU {r.bleu:.1f}  {_bits(model, name)}")
    return results


def _bits(model: nn.Module, name: str) -> str:
    return f"{codec_bits(model, name):.3f} bits" if name in STORAGE else "(bits: see above)"


def minilm_calibration(models) -> list[dict]:
    _, tokenizer = models["minilm"]
    return [dict(tokenizer(s, return_tensors="pt")) for s in CALIBRATION_SENTENCES]


def stories_calibration(models) -> list[tuple]:
    return [(sample_sequences(models["stories"][0], 16, 64, CALIBRATION_SEED),)]


def calibrated_variants(models, label: str, calibration: list) -> dict[str, Quantizer]:
    """Ours calibrated (GPTQ; with one curvature; with bit_budget=4.5) and GPTQ on the RTN int4
    grid through the same calibrated pipeline (baselines.gptq), all on the same items."""
    model = models[label][0]
    rtn = calibrated_baseline(model, calibration, lambda w, h: baselines.gptq(
        w, h, RTN4_LEVELS, GROUP, damp=EncodingConfig().gptq_damp))
    return {"gptq4": calibrated_quantizer(model, calibration, label),
            "gptq4 curvatures=1": calibrated_quantizer(model, calibration, label, curvatures=1),
            "gptq rtn_int4": rtn,
            "gptq budget 4.5": calibrated_quantizer(model, calibration, label, bit_budget=4.5)}


def part_activations(models, sequences: int) -> list[Check]:
    """The converted models (calibration-free 4-bit, eager) with float vs int8 activations
    (``act_bits=8``, what the W4A8 decode kernel computes), against the original."""
    from rs_compile.models.minilm import sentence_embeddings

    minilm, tokenizer = models["minilm"]
    stories, _ = models["stories"]
    embed = lambda m: sentence_embeddings(m, tokenizer, list(HELDOUT_SENTENCES))  # noqa: E731
    reference = embed(minilm)
    held_out = sample_sequences(stories, sequences, 128, HELDOUT_SEED)
    figures = {}
    print(f"\nW4A8: convert(bits=4) eager, MiniLM 1-cos on 40 sentences, TinyStories KL / top-1 on "
          f"{sequences} x 128 tokens")
    for act_bits in (0, 8):
        cos = embedding_cosine(reference, embed(rs_compile.convert(copy.deepcopy(minilm),
                                                                    act_bits=act_bits)))
        kl, top1, _ = next_token_kl_top1(stories, rs_compile.convert(copy.deepcopy(stories),
                                                                  act_bits=act_bits), held_out)
        figures[act_bits] = (float(1 - cos.mean()), kl, top1)
        print(f"  act_bits={act_bits}: minilm 1-cos {figures[act_bits][0]:.5f}, "
              f"stories KL {kl:.4f} top-1 {top1:.2%}")
    (c0, k0, _), (c8, k8, t8) = figures[0], figures[8]
    return [("W4A8 minilm 1-cos (report)", f"{c8:.5f} (W4 {c0:.5f}, {c8 / c0:.3f}x)", None),
            ("W4A8 stories KL / top-1 (report)", f"{k8:.4f} / {t8:.2%} (W4 KL {k0:.4f}, "
             f"{k8 / k0:.3f}x)", None)]


def part_speed(layers_to_recheck: int = 4) -> list[Check]:
    """Wall and process-CPU time of convert() on a random-weight GPT-2 small (48 linears; lm_head is
    tied to the embedding and skipped), peak resident memory above the loaded model, and a
    bit-for-bit re-encode of one layer of each shape."""
    from rs_compile.codec.encode import encode
    from rs_compile.convert import linear_weight
    from rs_compile.models import configs

    model = configs.gpt2("small")
    dense = {n: linear_weight(m)[0].detach().clone() for n, m in model.named_modules()
             if linear_weight(m) is not None and not n.endswith("lm_head")}
    rss = _rss_kb()
    _reset_peak_rss()
    wall, cpu = time.perf_counter(), time.process_time()
    rs_compile.convert(model)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak_extra_mb = (_peak_rss_kb() - rss) / 1024
    load = Path("/proc/loadavg").read_text().split()[:3]
    converted = dict(model.named_modules())
    by_shape = {}
    for n, w in dense.items():
        by_shape.setdefault(tuple(w.shape), n)
    same = all(torch.equal(a, b) for n in list(by_shape.values())[:layers_to_recheck]
               for a, b in zip(encode(dense[n]).tensors(),
                               (converted[n].codes, converted[n].scales, converted[n].curv)))
    rewrites = model.rs_report.linear_rewrites
    print(f"\nspeed: convert(gpt2-small), {len(rewrites)} linears, "
          f"{sum(r.out_features * r.in_features for r in rewrites) / 1e6:.1f}M weights, "
          f"{torch.get_num_threads()} threads: wall {wall:.2f} s, process CPU {cpu:.2f} s, "
          f"peak RSS +{peak_extra_mb:.0f} MB over the loaded model; load average {' '.join(load)}")
    return [("gpt2-small convert wall <= 10 s", f"{wall:.2f} s (CPU {cpu:.2f} s, load {load[0]})", wall <= 10),
            ("gpt2-small peak extra memory (report)", f"{peak_extra_mb:.0f} MB", None),
            ("re-encode is bit-identical", "same codes" if same else "DIFFERENT codes", same)]


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _rss_kb() -> int:
    return _status_kb("VmRSS")


def _peak_rss_kb() -> int:
    return _status_kb("VmHWM")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--sequences", type=int, default=64, help="held-out TinyStories sequences")
    args = parser.parse_args()
    parts = set(args.parts)
    checks: list[Check] = []
    models = load_models() if parts - {"speed"} else {}
    if "weights" in parts:
        checks += part_weights(models)
    extra_minilm: dict[str, Quantizer] = {}
    extra_stories: dict[str, Quantizer] = {}
    if "calibrated" in parts:
        extra_minilm.update(calibrated_variants(models, "minilm", minilm_calibration(models)))
        extra_stories.update(calibrated_variants(models, "stories", stories_calibration(models)))
    if "eightbit" in parts:
        eight = {"ours8": ours(8), "int8": baseline_quantizers(GROUP)["int8"]}
        extra_minilm.update(eight)
        extra_stories.update(eight)
    if parts & {"minilm", "calibrated", "eightbit"}:
        drift = part_minilm(models, extra_minilm)
        ratio = f"{drift['ours4'] / drift['nf4']:.3f}x ({drift['ours4']:.4f} vs {drift['nf4']:.4f})"
        checks += [("minilm 1-cos <= 0.9x NF4 (equal bits)", ratio, drift["ours4"] <= 0.9 * drift["nf4"])]
        checks += [(f"minilm calibrated ({k}) mean cos >= 0.99", f"{1 - drift[k]:.4f}", 1 - drift[k] >= 0.99)
                   for k in ("gptq4", "gptq budget 4.5") if k in drift]
        if "ours8" in drift:
            checks.append(("minilm 8-bit 1-cos (report)", f"{drift['ours8']:.2e} (int8 {drift['int8']:.2e})", None))
    if parts & {"stories", "calibrated", "eightbit"}:
        res = part_stories(models, args.sequences, extra_stories)
        kl = {k: r.kl for k, r in res.items()}
        ratio = f"{kl['ours4'] / kl['nf4']:.3f}x ({kl['ours4']:.3f} vs {kl['nf4']:.3f})"
        checks += [("stories KL <= 0.9x NF4 (equal bits)", ratio, kl["ours4"] <= 0.9 * kl["nf4"]),
                   ("stories KL < RTN (equal bits)", f"{kl['ours4']:.3f} vs {kl['rtn_int4']:.3f}", kl["ours4"] < kl["rtn_int4"])]
        checks += [(f"stories calibrated ({k}) KL <= 0.5x NF4", f"{kl[k] / kl['nf4']:.3f}x ({kl[k]:.3f})",
                    kl[k] <= 0.5 * kl["nf4"]) for k in ("gptq4", "gptq budget 4.5") if k in kl]
        if "ours8" in res:
            r8 = res["ours8"]
            figure = f"{r8.kl:.4f} / {r8.top1:.2%} (int8 {res['int8'].kl:.4f} / {res['int8'].top1:.2%})"
            checks.append(("stories 8-bit KL / top-1 (report)", figure, None))
    if "activations" in parts:
        checks += part_activations(models, args.sequences)
    if "speed" in parts:
        checks += part_speed()
    print("\nacceptance")
    width = max(len(c) for c, _, _ in checks)
    for criterion, figure, met in checks:
        print(f"  {criterion:<{width}}  {figure:<40} {'report' if met is None else 'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
