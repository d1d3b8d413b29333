"""Run the Triton attention kernel under the interpreter and compare it with float64 SDPA.

Invoked by tests/unit/test_attention_op.py in a subprocess with TRITON_INTERPRET=1 (which must be
set before triton is imported, and would otherwise leak into the pytest process). Prints one line
per case and exits non-zero on the first mismatch.
"""

from __future__ import annotations

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from _attention_reference import sdpa64
from rs_compile.kernels.triton_attention import BLOCK_M, triton_attention

# (B, H, Hkv, T, S, D, dtype, mask kind, causal); T and S not multiples of the block included.
CASES = [
    (1, 2, 2, 37, 37, 64, torch.float32, None, True),
    (2, 4, 2, 45, 45, 32, torch.float32, "bool", False),
    (1, 4, 1, 5, 70, 32, torch.float32, "add", True),  # KV cache: bottom-right causal
    (1, 2, 2, 1, 40, 64, torch.float32, None, True),  # decoding: T = 1 sees every key
    (1, 2, 1, 40, 33, 32, torch.float32, "rows", True),  # T > S and fully masked rows
    (1, 2, 2, 33, 33, 64, torch.float16, "add", True),
]
assert any(c[3] % BLOCK_M for c in CASES)


def make_mask(kind, b, t, s):
    if kind == "bool":
        return torch.rand(b, 1, t, s) > 0.3
    if kind == "add":
        return torch.randn(1, 1, t, s)
    if kind == "rows":  # every key of rows 20 and 21 masked (rows 0-6 see no key: T - S = 7)
        m = torch.ones(t, s, dtype=torch.bool)
        m[20:22] = False
        return m
    return None


def main() -> int:
    torch.manual_seed(0)
    for b, h, hkv, t, s, d, dtype, kind, causal in CASES:
        q = torch.randn(b, h, t, d, dtype=dtype)
        k = torch.randn(b, hkv, s, d, dtype=dtype)
        v = torch.randn(b, hkv, s, d, dtype=dtype)
        mask = make_mask(kind, b, t, s)
        scale = d**-0.5
        out = triton_attention(q, k, v, mask, causal, scale)
        ref = sdpa64(q, k, v, mask, causal, scale)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        err = (out.double() - ref).abs().max().item()
        ok = out.dtype == dtype and out.is_contiguous() and err <= tol and not out.isnan().any()
        print(f"B={b} H={h} Hkv={hkv} T={t} S={s} D={d} {dtype} mask={kind} causal={causal}: "
              f"max err {err:.2e} (tol {tol:.0e}) {'ok' if ok else 'FAIL'}")
        if not ok:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
