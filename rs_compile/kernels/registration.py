"""When to hand CUDA tensors to Triton kernels.

Triton kernels serve the CUDA dispatch key only where Triton has a live GPU driver. On a CPU-only
host ``triton.runtime.driver.active`` raises "0 active drivers"; registering anyway would route
CUDA calls to kernels that cannot launch, so callers check first and keep the reference instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GPU_BACKENDS = ("cuda", "hip")
_registered: set[str] = set()


def triton_driver_active() -> bool:
    """True only if Triton imports and its active driver targets a GPU; never raises."""
    if not torch.cuda.is_available():  # no GPU for Triton to drive; skips importing Triton (~0.2 s)
        return False
    try:
        import triton

        return triton.runtime.driver.active.get_current_target().backend in GPU_BACKENDS
    except Exception:  # no triton, no driver, or a broken install: all mean "no GPU kernels"
        return False


def register_cuda_kernel(op: str, fn: Callable) -> None:
    """Register ``fn`` as the CUDA kernel of ``op`` ("ns::name"), once per op.

    Call only when :func:`triton_driver_active` is True.
    """
    if op not in _registered:
        torch.library.register_kernel(op, "cuda", fn)
        _registered.add(op)
