"""Per-call cost of an rs_compile.export package (AOTInductor) against the same converted model
compiled by torch.compile (Inductor) and run eagerly, on random-weight GPT-2 LMs.

    PYTHONPATH=$PWD python benchmarks/export.py [--sizes tiny small] [--seq 1 32] [--calls 20]
                                                [--rounds 5] [--threads 1]

For each size: convert (4-bit linears, 5-bit tied embedding), export with a dynamic sequence
length (torch.export.Dim, 1..256), load the package in this process, and time ``logits =
f(input_ids)`` (no KV cache: a ``--seq 1`` call is decode-shaped, every linear has one row) for
the eager model, ``torch.compile(model)`` and the package, interleaved over ``--rounds`` rounds
of ``--calls`` calls each; the median call of each is reported, and the package's ratio to the
compiled model. Outputs are compared (max |difference| of the logits) before timing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import rs_compile
from rs_compile.models import configs


class Logits(torch.nn.Module):
    """``input_ids -> logits`` without a KV cache: one tensor in, one out, as export wants."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def per_call(fns: dict, ids: torch.Tensor, calls: int, rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, rounds interleaved (a shared machine)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in fns.items():
                for _ in range(calls):
                    t = time.perf_counter()
                    fn(ids)
                    times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(size: str, seqs: list[int], calls: int, rounds: int, folder: Path) -> None:
    model = Logits(rs_compile.convert(configs.gpt2(size))).eval()
    vocab = model.lm.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    example = torch.randint(0, vocab, (1, 8), generator=gen)
    seq = torch.export.Dim("seq", min=1, max=256)
    path = folder / f"gpt2-{size}.pt2"
    t = time.perf_counter()
    rs_compile.export(model, (example,), path, {"input_ids": {1: seq}})
    export_s = time.perf_counter() - t
    package = torch._inductor.aoti_load_package(str(path))
    compiled = torch.compile(model)
    print(f"gpt2-{size}: package {path.stat().st_size / 2**20:.1f} MiB, export {export_s:.0f} s")
    for n in seqs:
        ids = torch.randint(0, vocab, (1, n), generator=gen)
        with torch.no_grad():
            eager_out, compiled_out, package_out = model(ids), compiled(ids), package(ids)
        diff = max((package_out - compiled_out).abs().max().item(),
                   (package_out - eager_out).abs().max().item())
        cost = per_call({"eager": model, "compiled": compiled, "package": package}, ids, calls,
                        rounds)
        print(f"  seq {n:3d}: eager {cost['eager'] * 1e3:7.2f} ms, compiled "
              f"{cost['compiled'] * 1e3:7.2f} ms, package {cost['package'] * 1e3:7.2f} ms "
              f"(package / compiled {cost['package'] / cost['compiled']:.2f}); max |package - "
              f"compiled or eager| {diff:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(configs.GPT2_SIZES))
    ap.add_argument("--seq", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a loaded machine a preempted OpenMP thread stalls "
                         "every parallel region of the others)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{start}, load average {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            run(size, args.seq, args.calls, args.rounds, Path(folder))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
