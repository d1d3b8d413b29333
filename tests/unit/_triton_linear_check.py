"""Run the Triton rs::linear kernel under TRITON_INTERPRET=1 against the CPU reference op.

Started by test_triton_linear.py in a subprocess so the interpreter flag never reaches the main
pytest process. Prints one JSON summary line; exits non-zero if any case is out of tolerance.

Tolerance, per output element, with S = |x| @ |W|^T (W decoded and rounded to x's dtype, float64)
and u the unit roundoff of x's dtype:

    2 * gamma_K * S  +  3 * u * (S + |bias|),      gamma_K = K * 2^-24 / (1 - K * 2^-24)

Both sides sum the same K products in fp32 in different orders, each within gamma_K * S of the
exact sum (Higham, Thm 3.1); the reference may round to x's dtype twice (matmul, then + bias) and
the kernel once. An unpacking or decode error moves outputs by about |scale| * |x|, far above this.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch

from rs_compile.codec import decode_weight, encode
from rs_compile.codec.format import Format
from rs_compile.kernels.triton_linear import DOT_MIN_ROWS, triton_linear
from rs_compile.ops.linear import linear

N = 40  # not a multiple of BLOCK_N: exercises masked output columns
K = 100  # not a multiple of any group size below: a partial last group
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _case(bits: int, group_size: int, x: torch.Tensor, with_bias: bool, seed: int,
          act_bits: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    k = x.shape[-1]
    enc = encode(torch.randn(N, k, generator=g) * 0.05, Format(bits, group_size))
    bias = torch.randn(N, generator=g) if with_bias else None
    out = triton_linear(x, *enc.tensors(), bias, **enc.meta(), act_bits=act_bits)
    ref = linear(x, *enc.tensors(), bias, **enc.meta(), act_bits=act_bits)

    w = decode_weight(*enc.tensors(), **enc.meta()).to(x.dtype).double()
    s = x.double().abs() @ w.abs().t()
    b = 0.0 if bias is None else bias.to(x.dtype).double().abs()
    gamma = k * 2.0**-24 / (1 - k * 2.0**-24)
    tol = 2 * gamma * s + 3 * UNIT_ROUNDOFF[x.dtype] * (s + b)
    err = (out.double() - ref.double()).abs()
    ok = out.shape == ref.shape and out.dtype == x.dtype and bool((err <= tol).all())
    return dict(bits=bits, group_size=group_size, shape=list(x.shape), dtype=str(x.dtype),
                bias=with_bias, act_bits=act_bits, ok=ok, err_over_tol=float((err / tol).max()))


def _cases():
    """(bits, group_size, x, bias[, act_bits]): every bits x group pair, then dtypes, layouts and
    int8 activations (both sides round x with the same function; |x_q| <= |x| (1 + 1/254) keeps
    the tolerance)."""
    g = torch.Generator().manual_seed(0)
    rows = (1, 3, 17)  # 1 and 3: broadcast-sum path; 17: tl.dot path with a partial row tile
    for (i, bits), (j, gs) in itertools.product(enumerate((2, 3, 4, 5, 8)), enumerate((32, 64, 128))):
        # Latin square: every bits and every group size meets every row count.
        yield bits, gs, torch.randn(rows[(i + j) % 3], K, generator=g), (i + j) % 2 == 0
    for bits, m in itertools.product((2, 3, 4, 5, 8), (1, 17)):  # each path with and without bias
        yield bits, 64, torch.randn(m, K, generator=g).half(), bits in (2, 4)
    # The interpreter's tl.dot multiplies bf16 bit patterns as integers, so bf16 runs only
    # below DOT_MIN_ROWS here (the GPU tl.dot handles bf16).
    for bits, m in itertools.product((3, 4), (1, 3)):
        assert m < DOT_MIN_ROWS
        yield bits, 64, torch.randn(m, K, generator=g).bfloat16(), True
    yield 4, 64, torch.randn(2, 9, 128, generator=g), True  # leading dims, K a group multiple
    yield 3, 32, torch.randn(20, 128, generator=g)[:, :K], False  # strided rows (non-contiguous)
    for m in (1, 17):
        yield 4, 64, torch.randn(m, K, generator=g), True, 8


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("run with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # tiny shapes: extra threads only contend on the shared cores
    results = [_case(*c[:4], seed=i, act_bits=c[4] if len(c) > 4 else 0)
               for i, c in enumerate(_cases())]
    failed = [r for r in results if not r["ok"]]
    print(json.dumps(dict(cases=len(results), failed=failed,
                          max_err_over_tol=max(r["err_over_tol"] for r in results))))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
