"""GB/s of rs::linear's CPU kernel (GEMV, few rows) on Gemma-3-270M-sized layers against dense fp32.

    PYTHONPATH=$PWD python benchmarks/cpu_kernel.py [--bits 4 5 8] [--act-bits 0 8] [--rows 1]
    PYTHONPATH=$PWD python benchmarks/cpu_kernel.py --in-cache [--rows 1]   # ns/weight per path

For each layer shape (out x in) enough distinct copies are made that one pass over them streams
from memory (>= --stream-mb of packed bytes; the dense copies likewise), then the copies are
called in turn. Every configuration of one shape is timed interleaved in one process, best of
--repeats passes, every call timed and the best call kept (the machine is shared: the least
disturbed call is the closest to what the kernel can do). GB/s = bytes
of the weight as stored (codes + group bytes + row scales; fp32 for dense) / time per call;
"% bw" compares with the read bandwidth of ``torch.sum`` over a 1 GB buffer, measured in the same
process (best 64 MB slice). Rows > 1 report the same bytes / time (the weight is read once for all rows).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from rs_compile.codec.format import Format
from rs_compile.lowering import cpu_kernel

SHAPES = {"mlp.down 640x2048": (640, 2048), "mlp.gate/up 2048x640": (2048, 640),
          "attn.o 640x1024": (640, 1024), "attn.q 1024x640": (1024, 640),
          "lm_head 262144x640": (262144, 640)}


def random_packed(n, k, bits, group_size, seed):
    g = torch.Generator().manual_seed(seed)
    spec = Format(bits, group_size).packed_specs(n, k)
    codes = torch.randint(0, 256, spec["codes"][0], generator=g, dtype=torch.int32).to(torch.uint8)
    groups = torch.randint(0, 256, spec["groups"][0], generator=g, dtype=torch.int32).to(torch.uint8)
    row_scale = (torch.rand(n, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    return codes, groups, row_scale


def read_bandwidth(gb: float = 1.0, slice_mb: int = 64, repeats: int = 5) -> float:
    """``torch.sum`` over a ``gb`` buffer in slices of ``slice_mb``: the best slice's rate (on a
    shared machine the least disturbed slice is the closest to what the memory can do)."""
    x = torch.ones(int(gb * 2**30) // 4)
    step = slice_mb * 2**20 // 4
    best = float("inf")
    for _ in range(repeats):
        for i in range(0, x.numel(), step):
            t = time.perf_counter()
            x[i:i + step].sum()
            best = min(best, time.perf_counter() - t)
    return step * 4 / best / 1e9


def in_cache(rows: int, group_size: int, repeats: int = 300) -> None:
    """ns per weight of one 2048x640 layer whose codes stay in cache, 1 thread, per kernel path."""
    torch.set_num_threads(1)
    kern = cpu_kernel.kernel()
    n, k = 2048, 640
    x = torch.randn(rows, k)
    print(f"in cache, 1 thread, {n}x{k}, groups of {group_size}, {rows} row(s): ns per weight (best of "
          f"{repeats} calls)\n")
    print("| bits | float act. (default: int8 digits on VNNI) | float act. (float lookups) | int8 act. (VNNI) "
          "| int8 act. via floats | plain C++ (float act.) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for bits in (2, 3, 4, 5, 8):
        codes, groups, row_scale = random_packed(n, k, bits, group_size, 0)
        out = torch.empty(rows, n)
        cells = []
        for act_bits, flags in ((0, 0), (0, cpu_kernel.NO_VNNI), (8, 0), (8, cpu_kernel.NO_VNNI),
                                (0, cpu_kernel.FORCE_GENERIC)):
            best = float("inf")
            for _ in range(repeats if flags != cpu_kernel.FORCE_GENERIC else 20):
                t = time.perf_counter()
                cpu_kernel._call(kern, x, codes, groups, row_scale, None, out, rows, bits, group_size, k,
                                 act_bits, 0, flags)
                best = min(best, time.perf_counter() - t)
            cells.append(f"{best * 1e9 / (n * k):.3f}")
        print(f"| {bits} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 5, 8])
    p.add_argument("--act-bits", type=int, nargs="+", default=[0, 8])
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--stream-mb", type=float, default=96)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--in-cache", action="store_true",
                   help="instead: ns per weight of one layer held in cache, 1 thread, every kernel path")
    args = p.parse_args()
    if args.in_cache:
        return in_cache(args.rows, args.group_size)
    torch.set_num_threads(args.threads)
    st = cpu_kernel.status()
    print(f"kernel: {st}; threads {args.threads}; rows {args.rows}; groups of {args.group_size}")
    bw = read_bandwidth()
    print(f"read bandwidth (torch.sum over 1 GB, best 64 MB slice): {bw:.1f} GB/s\n")
    print("| layer (out x in) | config | us/call | GB/s | % bw | vs dense fp32 |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.shapes:
        n, k = SHAPES[name]
        x = torch.randn(args.rows, k)
        configs = {}
        dense_bytes = n * k * 4
        copies = max(1, int(args.stream_mb * 2**20 // dense_bytes) + 1)
        dense = [torch.randn(n, k) * 0.02 for _ in range(copies)]
        def timed(calls, best=None, key=None):
            for call in calls:
                t = time.perf_counter()
                call()
                if best is not None:
                    best[key] = min(best[key], time.perf_counter() - t)

        configs["dense fp32 F.linear"] = (
            lambda best=None, key=None, ws=dense: timed([lambda w=w: F.linear(x, w) for w in ws], best, key),
            dense_bytes, copies)
        for bits in args.bits:
            fmt = Format(bits, args.group_size)
            nbytes = fmt.nbytes(n, k)
            cps = max(1, int(args.stream_mb * 2**20 // nbytes) + 1)
            layers = [random_packed(n, k, bits, args.group_size, seed=i) for i in range(cps)]
            for act_bits in args.act_bits:
                def run(best=None, key=None, layers=layers, bits=bits, act_bits=act_bits):
                    timed([lambda c=c, g=g, r=r: cpu_kernel.linear_cpu(x, c, g, r, None, bits, args.group_size,
                                                                       k, act_bits)
                           for c, g, r in layers], best, key)
                configs[f"rs {bits}-bit a{act_bits or 'f32'}"] = (run, nbytes, cps)
        best = {c: float("inf") for c in configs}
        for fn, _, _ in configs.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for c, (fn, _, cps) in configs.items():
                fn(best, c)  # every call timed: the best call of the least disturbed pass
        for c, (_, nbytes, _) in configs.items():
            gbs = nbytes / best[c] / 1e9
            print(f"| {name} | {c} | {best[c] * 1e6:.1f} | {gbs:.1f} | {100 * gbs / bw:.0f}% | "
                  f"{best['dense fp32 F.linear'] / best[c]:.2f}x |")


if __name__ == "__main__":
    main()
