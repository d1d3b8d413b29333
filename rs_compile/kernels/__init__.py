"""Triton kernels for the rs ops, registered for CUDA only where a GPU driver is live."""

from rs_compile.kernels.registration import register_cuda_kernel, triton_driver_active


def register_triton_kernels() -> bool:
    """Make the Triton kernels the CUDA implementations of the rs ops (idempotent).

    Returns False, registering nothing, without a live Triton GPU driver: the CPU reference and
    Inductor decomposition then serve every device. The Triton modules are imported only here,
    so importing rs_compile never needs Triton.
    """
    if not triton_driver_active():
        return False
    from rs_compile.kernels.triton_attention import triton_attention
    from rs_compile.kernels.triton_linear import triton_linear

    register_cuda_kernel("rs::linear", triton_linear)
    register_cuda_kernel("rs::attention", triton_attention)
    return True


__all__ = ["register_triton_kernels", "triton_driver_active"]
