"""Compile time and fidelity of backend="realitystone" vs plain Inductor on a real-size model.

    python benchmarks/compile_time.py [--model gpt2-small|kogpt2] [--seq 32]

Both compiles run in one process on a cold dynamo cache (torch._dynamo.reset between them);
Inductor's on-disk caches are disabled so neither side is served from disk.
"""

from __future__ import annotations

import argparse
import time

import torch

import rs_compile
from rs_compile.models import configs

BUILDERS = {"gpt2-small": lambda: configs.gpt2("small"), "kogpt2": configs.kogpt2}


def first_call_seconds(model, ids, backend) -> tuple[float, torch.Tensor]:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    start = time.perf_counter()
    with torch.no_grad():
        logits = compiled(ids).logits
    return time.perf_counter() - start, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(BUILDERS), default="gpt2-small")
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()
    model = BUILDERS[args.model]()
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(ids).logits
    backend = rs_compile.backend()
    with torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False):
        t_inductor, _ = first_call_seconds(model, ids, "inductor")
        t_rs, logits = first_call_seconds(model, ids, backend)
    report = backend.report
    dense = sum(r.dense_bytes for r in report.linear_rewrites)
    packed = sum(r.compressed_bytes for r in report.linear_rewrites)
    rel = float((logits - eager).norm() / eager.norm())
    print(f"model {args.model}, seq {args.seq}: {len(report.linear_rewrites)} linear rewrites, "
          f"{len(report.attention_rewrites)} attention rewrites, {len(report.skipped)} skipped")
    print(f"linear weights {dense:,} -> {packed:,} bytes ({dense / packed:.2f}x smaller)")
    print(f"compile + first call: inductor {t_inductor:.1f} s, realitystone {t_rs:.1f} s "
          f"({t_rs / t_inductor:.2f}x)")
    print(f"logits vs eager fp32: relative L2 error {rel:.4f}, max abs {float((logits - eager).abs().max()):.4f}")


if __name__ == "__main__":
    main()
