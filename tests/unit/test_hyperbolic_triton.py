"""Triton kernels of the rs_hyp ops against the PyTorch reference, run by Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton.jit`` decorates a kernel and changes how every
kernel in the process launches, so the kernels run in a child process (this file run as a script)
that reports errors as JSON; the parent keeps its own Triton state untouched and asserts per case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Worst error allowed, relative to each output row's norm (to each distance for dist), over rows
# whose norms span 1e-7 to the boundary. Kernels (compensated expm1/log1p) and reference (torch
# tanh/atanh) agree to a few ulps, except that artanh near 1 amplifies rounding for points near the
# boundary (dist, logmap0): measured up to 2e-6 (float32) and 3.3e-15 (float64) there.
TOL = {"float32": 1e-5, "float64": 1e-12}


def _measure() -> dict[str, float]:
    import torch

    from rs_compile.hyperbolic import PoincareBall, reference, triton_kernels as tk

    errors = {}
    for dtype in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(0)
        c = 0.7
        ball = PoincareBall(c)
        x = ball.random(3, 37, 24, max_fraction=0.99, generator=g, dtype=dtype)
        y = ball.random(37, 24, max_fraction=0.99, generator=g, dtype=dtype)
        v = (
            torch.randn(37, 24, generator=g, dtype=dtype)
            * torch.logspace(-6, 2, 37, dtype=dtype)[:, None]
        )
        w = torch.randn(19, 24, generator=g, dtype=dtype) / 4
        b = ball.random(19, generator=g, dtype=dtype)
        xt = ball.random(24, 37, generator=g, dtype=dtype).t()  # non-contiguous rows
        cases = {
            "mobius_add": (tk.mobius_add, reference.mobius_add, (x, y, c)),
            "mobius_add_noncontig": (tk.mobius_add, reference.mobius_add, (xt, y, c)),
            "dist": (tk.dist, reference.dist, (x, y, c)),
            "dist_noncontig": (tk.dist, reference.dist, (xt, y[:1], c)),
            "expmap0": (tk.expmap0, reference.expmap0, (v, c)),
            "logmap0": (tk.logmap0, reference.logmap0, (x, c)),
            "logmap0_tiny": (tk.logmap0, reference.logmap0, (x * 1e-6, c)),
            "poincare_linear": (tk.poincare_linear, reference.poincare_linear, (x, w, b, c)),
            "poincare_linear_nobias": (
                tk.poincare_linear,
                reference.poincare_linear,
                (xt, w, None, c),
            ),
            "empty": (tk.mobius_add, reference.mobius_add, (x[:, :0], y[:0], c)),
        }
        for name, (kernel, ref, args) in cases.items():
            got, want = kernel(*args), ref(*args)
            assert got.shape == want.shape and got.dtype == want.dtype, name
            if got.dim() < args[0].dim():  # dist: one number per row
                got, want = got.unsqueeze(-1), want.unsqueeze(-1)
            rel = (got - want).norm(dim=-1) / want.norm(dim=-1)
            errors[f"{name}-{str(dtype).removeprefix('torch.')}"] = (
                rel.max().item() if rel.numel() else 0.0
            )
    return errors


@pytest.fixture(scope="module")
def kernel_errors() -> dict[str, float]:
    pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CASES = [
    "mobius_add",
    "mobius_add_noncontig",
    "dist",
    "dist_noncontig",
    "expmap0",
    "logmap0",
    "logmap0_tiny",
    "poincare_linear",
    "poincare_linear_nobias",
    "empty",
]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("case", CASES)
def test_triton_kernel_matches_reference(kernel_errors, case, dtype):
    err = kernel_errors[f"{case}-{dtype}"]
    assert err <= TOL[dtype], f"{case} {dtype}: relative error {err:.3g} > {TOL[dtype]:.0e}"


def test_triton_interpret_did_not_leak_into_this_process(kernel_errors):
    assert "TRITON_INTERPRET" not in os.environ


def test_cuda_kernels_registered_only_with_a_live_driver():
    import torch

    from rs_compile.hyperbolic import ops  # noqa: F401 -- registers the rs_hyp ops

    try:
        import triton

        triton.runtime.driver.active  # noqa: B018
        live = True
    except (ImportError, RuntimeError):
        live = False
    for name in ("mobius_add", "dist", "expmap0", "logmap0", "poincare_linear"):
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"rs_hyp::{name}", "CUDA")
        assert has_cuda == live, name


if __name__ == "__main__":
    print(json.dumps(_measure()))
