"""Inductor lowerings of the rs ops (CPU: decompositions Inductor fuses into C++)."""

from rs_compile.lowering import attention, linear


def install_lowerings() -> None:
    """Register every rs decomposition with Inductor (idempotent)."""
    linear.install()
    attention.install()
