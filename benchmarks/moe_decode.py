"""Decode speed of a converted mixture-of-experts model, and the expert bytes a token reads.

A random Mixtral-shaped model whose experts hold most of the bytes (default: hidden 512, 8
experts of intermediate 1024, top-2, 2 layers, vocab 2048). Measures greedy decode tokens/s of

* the original model in eager fp32 (transformers' default experts forward, grouped_mm),
* the converted model in eager mode (CompressedExperts: per selected expert, the rs::linear CPU
  kernel on that expert's slice of the stacked codes, no dispatcher),
* the converted model compiled with the realitystone backend (compile_for_generation),

and, on the converted eager model, decode tok/s and the expert bytes read per token with the
routers set to top-1, top-2 and all experts: bytes per token come from the expert ids each
expert product receives (it reads exactly the distinct experts it is given, which
tests/integration/test_moe.py checks by poisoning the others), times each expert's packed bytes.

    PYTHONPATH=$PWD python benchmarks/moe_decode.py [--layers 2] [--tokens 32]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import rs_compile
import rs_compile.experts as experts_impl
from rs_compile.experts import CompressedExperts
from rs_compile.generation import compile_for_generation


class ExpertReads:
    """Counts the packed expert bytes the experts' products read (distinct experts x bytes): wraps
    rs_compile.experts.expert_linear_into, through which the eager module and the op multiply,
    each expert on its own slice of the codes (used on the eager converted model)."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0

    def __enter__(self):
        self._inner = experts_impl.expert_linear_into

        def counting(out, x, expert_ids, codes, groups, scale, *rest):
            per_expert = sum(t[0].nbytes for t in (codes, groups, scale))
            self.bytes += int(torch.unique(expert_ids).numel()) * per_expert
            self.calls += 1
            return self._inner(out, x, expert_ids, codes, groups, scale, *rest)

        experts_impl.expert_linear_into = counting
        return self

    def __exit__(self, *exc):
        experts_impl.expert_linear_into = self._inner


def build(args):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                        num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                        max_position_embeddings=256)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).eval()


def set_top_k(model, k):
    for m in model.modules():
        if hasattr(m, "top_k") and hasattr(m, "weight") and m.weight.dim() == 2:  # the routers
            m.top_k = k


class StepTimes:
    """A generate stopping criterion that never stops, timestamping every generated token (wall
    clock and this process's CPU time)."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores, **kwargs):
        self.stamps.append((time.perf_counter(), time.process_time()))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def decode_rates(models, prompt, tokens, repeats=3):
    """Per model, decode (tokens/s, CPU ms per token): the median interval between consecutive
    generated tokens (prefill and the first token excluded) in wall time and in process CPU time,
    over ``repeats`` generations per model after a warm-up one (which compiles). The models take
    turns (A, B, C, A, B, C, ...) so that load from other processes hits all alike; the median
    keeps a shared CPU's stalls out of the wall figure, and CPU time (1 thread) does not count the
    time the process waits for a core at all."""
    from transformers import StoppingCriteriaList

    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=tokens)
    steps = [([], []) for _ in models]
    with torch.inference_mode():
        for model in models:
            model.generate(prompt, **kwargs)  # warm-up (compiles)
        for _ in range(repeats):
            for model, (wall, cpu) in zip(models, steps):
                times = StepTimes()
                model.generate(prompt, stopping_criteria=StoppingCriteriaList([times]), **kwargs)
                wall += [b[0] - a[0] for a, b in zip(times.stamps, times.stamps[1:])]
                cpu += [b[1] - a[1] for a, b in zip(times.stamps, times.stamps[1:])]
    return [(1.0 / statistics.median(w), 1e3 * statistics.median(c)) for w, c in steps]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (1 by default: on a shared, loaded CPU two threads measured "
                        "~200x slower decode steps, each waiting for a descheduled partner)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = build(args)
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    experts_bytes = sum(p.nbytes for n, p in model.named_parameters() if p.dim() == 3)
    total_bytes = sum(p.nbytes for p in model.parameters())
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {_load()}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; model: {args.layers} layers, "
          f"hidden {args.hidden}, {args.experts} experts x intermediate {args.intermediate}, "
          f"top-{args.top_k}; fp32 {total_bytes / 2**20:.1f} MiB of which experts "
          f"{experts_bytes / 2**20:.1f} MiB ({100 * experts_bytes / total_bytes:.0f}%)")

    t0 = time.perf_counter()
    converted = rs_compile.convert(copy.deepcopy(model))
    packed = sum(b.nbytes for m in converted.modules() if isinstance(m, CompressedExperts)
                 for b in m.buffers())
    print(f"convert: {time.perf_counter() - t0:.1f} s; experts {experts_bytes / 2**20:.1f} -> "
          f"{packed / 2**20:.2f} MiB ({experts_bytes / packed:.2f}x smaller)")

    named = [("eager fp32 (original)", model), ("converted, eager", converted)]
    if not args.no_compile:
        named.append(("converted, compiled (realitystone)", compile_for_generation(copy.deepcopy(converted))))
    rows = list(zip([n for n, _ in named], decode_rates([m for _, m in named], prompt, args.tokens)))
    (base, base_cpu) = rows[0][1]
    print(f"\n{'decode, top-' + str(args.top_k):<36} {'tok/s':>8} {'vs eager fp32':>14} "
          f"{'CPU ms/token':>13} {'vs eager fp32':>14}")
    for name, (rate, cpu) in rows:
        print(f"{name:<36} {rate:8.1f} {rate / base:13.2f}x {cpu:13.2f} {base_cpu / cpu:13.2f}x")

    per_expert = packed / (args.layers * args.experts)
    print(f"\n{'active experts (converted, eager)':<36} {'tok/s':>8} {'expert bytes/token':>19} "
          f"{'= k x':>6} {'fp32 eager tok/s':>17}")
    for k in sorted({1, args.top_k, args.experts}):
        set_top_k(converted, k)
        set_top_k(model, k)
        reads = ExpertReads()
        with reads, torch.inference_mode():  # one decode step after the prompt
            out = converted(prompt, use_cache=True)
            reads.bytes = reads.calls = 0
            converted(prompt[:, -1:], cache=out.past_key_values, use_cache=True)
        (rate, _), (dense_rate, _) = decode_rates([converted, model], prompt, args.tokens // 2,
                                                  repeats=2)
        print(f"top-{k:<32} {rate:8.1f} {reads.bytes:19,} {reads.bytes / per_expert / args.layers:6.1f} "
              f"{dense_rate:17.1f}")
    print(f"(one expert's packed gate_up + down: {per_expert:,.0f} bytes; {args.layers} layers)")
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {_load()}")


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


if __name__ == "__main__":
    main()
