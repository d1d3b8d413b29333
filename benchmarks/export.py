"""Per-call cost of an rs_compile.export package (AOTInductor) against the same converted model
compiled by torch.compile (Inductor) and run eagerly.

    PYTHONPATH=$PWD python benchmarks/export.py [--models gpt2-tiny gpt2-small linear-3072x768]
                                                [--seq 1 32] [--calls 20] [--rounds 5] [--threads 1]

Models: random-weight GPT-2 LMs (``input_ids -> logits``, no KV cache, so a ``--seq 1`` call is
decode-shaped: every linear has one row) and one 3072x768 Linear (GPT-2 small's MLP), converted
with the defaults (4-bit linears, 5-bit tied embedding). Each is exported with a dynamic sequence
length (torch.export.Dim, 1..256), the package loaded in this process, and ``f(x)`` timed for the
eager model, ``torch.compile(model)`` and the package, interleaved over ``--rounds`` rounds of
``--calls`` calls each; the median call of each is reported, with the package's ratio to the
compiled model and, for those two, the median time per call spent in the linear layers' CPU
path (``cpu_kernel.linear_cpu``: the kernel, or decode + BLAS), so that the rest (graph code,
dispatch) is the difference. Outputs are compared (max |difference|) before timing.
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
from rs_compile.lowering import cpu_kernel
from rs_compile.models import configs


class Logits(torch.nn.Module):
    """``input_ids -> logits`` without a KV cache: one tensor in, one out, as export wants."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def per_call(fns: dict, ids: torch.Tensor, calls: int, rounds: int) -> dict[str, tuple]:
    """Median seconds per call of each function and median seconds of it spent in the rs linear
    CPU path (cpu_kernel.linear_cpu, which the compiled graph and the package both call; eager
    modules call it without the module attribute, so their share reads 0), rounds interleaved."""
    linear_cpu, spent = cpu_kernel.linear_cpu, [0.0]

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return linear_cpu(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    cpu_kernel.linear_cpu = timed
    try:
        with torch.no_grad():
            for _ in range(rounds):
                for name, fn in fns.items():
                    for _ in range(calls):
                        spent[0] = 0.0
                        t = time.perf_counter()
                        fn(ids)
                        times[name].append((time.perf_counter() - t, spent[0]))
    finally:
        cpu_kernel.linear_cpu = linear_cpu
    return {name: tuple(statistics.median(col) for col in zip(*ts)) for name, ts in times.items()}


def gpt2(size: str):
    """(model, inputs of n tokens) for a converted random-weight GPT-2 LM."""
    model = Logits(rs_compile.convert(configs.gpt2(size))).eval()
    vocab = model.lm.config.vocab_size
    return model, lambda n, gen: torch.randint(0, vocab, (1, n), generator=gen)


def layer(out_features: int, in_features: int):
    """(model, inputs of n rows) for one converted Linear: the per-op cost without the rest."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(in_features, out_features))
    model = rs_compile.convert(model).eval()
    return model, lambda n, gen: torch.randn(1, n, in_features, generator=gen)


MODELS = {"gpt2-tiny": lambda: gpt2("tiny"), "gpt2-small": lambda: gpt2("small"),
          "linear-3072x768": lambda: layer(3072, 768)}


def run(name: str, seqs: list[int], calls: int, rounds: int, folder: Path) -> None:
    model, inputs = MODELS[name]()
    gen = torch.Generator().manual_seed(0)
    example = inputs(8, gen)
    seq = torch.export.Dim("seq", min=1, max=256)
    path = folder / f"{name}.pt2"
    t = time.perf_counter()
    rs_compile.export(model, (example,), path, ({1: seq},))
    export_s = time.perf_counter() - t
    package = torch._inductor.aoti_load_package(str(path))
    compiled = torch.compile(model)
    print(f"{name}: package {path.stat().st_size / 2**20:.1f} MiB, export {export_s:.0f} s")
    for n in seqs:
        x = inputs(n, gen)
        with torch.no_grad():
            eager_out, compiled_out, package_out = model(x), compiled(x), package(x)
        diff = max((package_out - compiled_out).abs().max().item(),
                   (package_out - eager_out).abs().max().item())
        cost = per_call({"eager": model, "compiled": compiled, "package": package}, x, calls,
                        rounds)
        (eager, _), (comp, comp_k), (pack, pack_k) = (cost[k] for k in
                                                      ("eager", "compiled", "package"))
        print(f"  seq {n:3d}: eager {eager * 1e3:7.3f} ms, compiled {comp * 1e3:7.3f} ms "
              f"(linear kernel path {comp_k * 1e3:.3f}), package {pack * 1e3:7.3f} ms (linear "
              f"kernel path {pack_k * 1e3:.3f}); package / compiled {pack / comp:.2f}; max "
              f"|package - compiled or eager| {diff:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
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
        for name in args.models:
            run(name, args.seq, args.calls, args.rounds, Path(folder))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
