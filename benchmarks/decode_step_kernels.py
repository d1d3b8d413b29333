"""The CPU kernel alone on one Gemma-3-270M-shaped decode step, weights out of cache.

    PYTHONPATH=$PWD python benchmarks/decode_step_kernels.py [--threads 2] [--act-bits 0 8] [--head-bits 5]

18 layers of q, k, v, o, gate, up, down (4-bit, groups of 32, random codes: the kernel's time does
not depend on their values) and the 262144 x 640 tied head, each a distinct tensor so that a step
reads ~160 MB from memory as the model's does. Prints ms per step for the linears and the head,
and the GB/s of code + group + row-scale bytes each reaches (compare with the read bandwidth
printed first: a torch sum over 512 MB). Median of --repeats steps after two warm-up steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rs_compile.bench import load_note, read_bandwidth_gb_s
from rs_compile.codec.format import Format
from rs_compile.lowering import cpu_kernel

SHAPES = [(1024, 640), (256, 640), (256, 640), (640, 1024), (2048, 640), (2048, 640), (640, 2048)]
LAYERS, VOCAB, HIDDEN, GROUP = 18, 262144, 640, 32


def random_layer(n: int, k: int, bits: int) -> tuple:
    spec = Format(bits, GROUP).packed_specs(n, k)
    codes = torch.randint(0, 256, spec["codes"][0], dtype=torch.uint8)
    groups = torch.randint(0, 256, spec["groups"][0], dtype=torch.uint8)
    row_scale = (torch.rand(n) * 0.01 + 0.001).to(torch.bfloat16)
    return codes, groups, row_scale, bits


def nbytes(layer: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in layer[:3])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--act-bits", type=int, nargs="+", default=[0, 8])
    p.add_argument("--head-bits", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if cpu_kernel.kernel() is None:
        raise SystemExit(f"the CPU kernel is unavailable: {cpu_kernel.status()}")
    torch.manual_seed(0)
    layers = [random_layer(n, k, 4) for _ in range(LAYERS) for n, k in SHAPES]
    head = random_layer(VOCAB, HIDDEN, args.head_bits)
    print(f"read bandwidth {read_bandwidth_gb_s():.1f} GB/s, {args.threads} threads; {load_note()}")

    def run(layer, act_bits) -> float:
        codes, groups, row_scale, bits = layer
        n, k = codes.shape[0], groups.shape[1] * GROUP
        x, out = torch.randn(1, k), torch.empty(1, n)
        t = time.perf_counter()
        cpu_kernel.linear_cpu(x, codes, groups, row_scale, None, bits, GROUP, k, act_bits, out=out)
        return time.perf_counter() - t

    lin_bytes, head_bytes = sum(map(nbytes, layers)), nbytes(head)
    for act_bits in args.act_bits:
        steps = [(sum(run(layer, act_bits) for layer in layers), run(head, act_bits))
                 for _ in range(args.repeats + 2)][2:]
        lin, hd = (statistics.median(s[i] for s in steps) for i in (0, 1))
        print(f"act_bits={act_bits}: linears {lin * 1e3:.2f} ms ({lin_bytes / lin / 1e9:.1f} GB/s), "
              f"{args.head_bits}-bit head {hd * 1e3:.2f} ms ({head_bytes / hd / 1e9:.1f} GB/s), "
              f"step {(lin + hd) * 1e3:.2f} ms; {load_note()}")


if __name__ == "__main__":
    main()
