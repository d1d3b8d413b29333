"""Whole-model GPT-2 forward at a long sequence: realitystone's attention rewrite vs Inductor.

    python benchmarks/attention.py [--size small] [--seq 1024] [--repeats 5]
                                                [--configs abcd] [--all-logits]

  a  inductor      on the eager-attention model (matmul / softmax / matmul, as transformers has it)
  b  inductor      on the SDPA model (transformers' default attention)
  c  realitystone  on the eager-attention model, attention rewrite only (linears left dense)
  d  realitystone  on the eager-attention model, full (attention + compressed linears)

All fp32, batch 1, inference (no_grad), compiled in ONE process and timed interleaved (one
forward of each per round, median over rounds), so machine load hits all alike; "vs b" is the
median over rounds of each round's latency ratio to (b), which cancels load that drifts between
rounds. The forward is a prefill as ``generate`` runs it: ``logits_to_keep=1`` (logits of the
last position only). With ``--all-logits`` every position's logits are computed: 196 MiB of fp32
logits at T = 1024 and the largest matmul of the model, the same in every configuration, which
then sets the peak and hides the attention's share of it.

Peak memory is the largest amount of memory the forward allocates through PyTorch's CPU
allocator above what was live when it started, from the allocation / free events of
``torch.profiler`` (``profile_memory=True``) replayed in time order, measured on a separate
(warm) call so that profiling does not slow the timed ones. It counts every tensor the
compiled code and the ATen kernels it calls allocate (Inductor buffers, score matrices, the
flash kernel's per-thread blocks, the outputs: logits and KV cache) and nothing the process held
before (weights, codes). oneDNN/BLAS scratch outside PyTorch's allocator is not counted; the
same kernels run in every configuration.

Compile is the wall time of the first call (compile plus one forward). Inductor's on-disk FX
graph and AOT caches are disabled so no configuration is served from an earlier run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

import rs_compile
from rs_compile.models import configs
from rs_compile.report import Report

# Keeps every linear dense: min(weight.shape) is never this large.
DENSE = 2**31 - 1


@dataclasses.dataclass
class Run:
    name: str
    label: str
    fn: Callable[[torch.Tensor, int], torch.Tensor]
    report: Report | None = None
    compile_s: float = 0.0
    times_ms: list[float] = dataclasses.field(default_factory=list)
    peak_bytes: int = 0
    rel_error: float = 0.0


def peak_allocated(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by ``fn`` above the start, from the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def build_runs(size: str, chosen: str) -> tuple[list[Run], torch.nn.Module]:
    """The chosen configurations; a, c and d share one eager model (b's weights are the same)."""
    eager = configs.gpt2(size, attn_implementation="eager")
    sdpa = configs.gpt2(size, attn_implementation="sdpa")
    attention_only = rs_compile.backend(min_features=DENSE)
    full = rs_compile.backend()
    specs = {
        "a": ("inductor, eager attention", eager, "inductor", None),
        "b": ("inductor, SDPA", sdpa, "inductor", None),
        "c": ("realitystone, attention only", eager, attention_only, attention_only.report),
        "d": ("realitystone, attention + linears", eager, full, full.report),
    }
    runs = []
    for name in chosen:
        label, model, backend, report = specs[name]
        compiled = torch.compile(model, backend=backend)

        def forward(ids: torch.Tensor, keep: int, m=compiled) -> torch.Tensor:
            return m(ids, logits_to_keep=keep).logits

        runs.append(Run(name, label, forward, report))
    return runs, eager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(configs.GPT2_SIZES), default="small")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", default="abcd", help="subset of abcd, in timing order")
    parser.add_argument("--all-logits", action="store_true", help="logits of every position")
    args = parser.parse_args()
    if not set(args.configs) <= set("abcd"):
        parser.error("--configs takes letters from abcd")

    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch._dynamo.config.recompile_limit = 16  # a, c, d compile the same forward code
    runs, eager = build_runs(args.size, args.configs)
    ids = torch.randint(0, eager.config.vocab_size, (1, args.seq),
                        generator=torch.Generator().manual_seed(0))
    keep = 0 if args.all_logits else 1
    start = time.perf_counter()
    with torch.no_grad():
        expected = eager(ids, logits_to_keep=keep).logits
        eager_s = time.perf_counter() - start
        for run in runs:
            start = time.perf_counter()
            logits = run.fn(ids, keep)
            run.compile_s = time.perf_counter() - start
            run.rel_error = float((logits - expected).norm() / expected.norm())
            del logits
        for _ in range(args.repeats):
            for run in runs:
                start = time.perf_counter()
                run.fn(ids, keep)
                run.times_ms.append((time.perf_counter() - start) * 1e3)
        for run in runs:
            run.peak_bytes = peak_allocated(lambda: run.fn(ids, keep))
    logits_bytes = expected.numel() * expected.element_size()

    mib = 2**20
    load = os.getloadavg()
    print(f"GPT-2 {args.size}, batch 1, seq {args.seq}, fp32, no_grad, logits_to_keep={keep}; "
          f"torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"eager (uncompiled, eager attention) one forward: {eager_s * 1e3:.0f} ms; "
          f"logits {logits_bytes / mib:.1f} MiB")
    print(f"median of {args.repeats} interleaved rounds\n")
    print("| config | latency ms (median) | min-max ms | vs b | peak MiB | compile + 1st call s | "
          "attention rewrites | linear rewrites | rel. error vs eager |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = next((run for run in runs if run.name == "b"), None)
    for run in runs:
        med = statistics.median(run.times_ms)
        counts = ("-", "-") if run.report is None else (
            len(run.report.attention_rewrites), len(run.report.linear_rewrites))
        ratio = "-" if base is None else "{:.3f}".format(statistics.median(
            t / b for t, b in zip(run.times_ms, base.times_ms)))
        print(f"| ({run.name}) {run.label} | {med:.0f} | {min(run.times_ms):.0f}-"
              f"{max(run.times_ms):.0f} | {ratio} | {run.peak_bytes / mib:.1f} | "
              f"{run.compile_s:.1f} | {counts[0]} | {counts[1]} | {run.rel_error:.2e} |")
    for run in runs:
        if run.report is None:
            continue
        print(f"\n({run.name}) attention rewrites (the report rs_compile.inspect returns):")
        kinds = sorted({f"{a.pattern}: {a.detail}" for a in run.report.attention_rewrites})
        for kind in kinds:
            n = sum(f"{a.pattern}: {a.detail}" == kind for a in run.report.attention_rewrites)
            print(f"  {n} x {kind}")
        for reason in sorted({s.reason for s in run.report.skipped if "attention" in s.reason}):
            print(f"  near miss: {reason}")

if __name__ == "__main__":
    main()
