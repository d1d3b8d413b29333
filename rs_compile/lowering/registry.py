"""Registering decompositions with Inductor so that every later compile sees them."""

from __future__ import annotations

from typing import Callable

import torch
from torch._inductor import decomposition as inductor_decomp


def register(op, fn: Callable) -> None:
    """Make ``fn`` Inductor's decomposition of ``op``; idempotent.

    ``select_decomp_table()`` returns a ``functools.cache``d copy of the table
    (``fast_random_decomps``), so the cache is cleared: otherwise a compile that ran before
    registration would keep using the table without this entry, silently skipping the lowering.
    """
    if inductor_decomp.decompositions.get(op) is fn:
        return
    inductor_decomp.decompositions.pop(op, None)  # a reloaded module's older function
    inductor_decomp.register_decomposition(op)(fn)
    inductor_decomp.fast_random_decomps.cache_clear()


def register_extern_out(op, name: str, fn: Callable, tensors: int,
                        size: Callable[..., list]) -> None:
    """Lower ``op`` to a direct call from the compiled graph, ``extern_kernels.<name>(*tensor
    args, *other args, out=buf)`` into a contiguous float32 buffer of ``size(*op args)`` that
    Inductor allocates: no dispatcher, no custom-op wrapper (idempotent).

    The op's first ``tensors`` arguments are its tensors (contiguous when ``fn`` gets them); a
    missing optional one must be the last of them and is passed as None. Under Inductor's C++
    wrapper, which cannot call a Python function, the op stays a fallback call through the
    dispatcher."""
    from torch._inductor import ir, lowering
    from torch._inductor.select_algorithm import extern_kernels
    from torch._inductor.virtualized import V

    setattr(extern_kernels, name, fn)
    if op in lowering.lowerings:
        return
    through_dispatcher = lowering.fallback_handler(op, add_to_fallback_set=False)

    @lowering.register_lowering(op, type_promotion_kind=None)
    def _lower(*args):
        if V.graph.cpp_wrapper:
            return through_dispatcher(*args)
        out_size = size(*args)
        layout = ir.FixedLayout(args[0].get_device(), torch.float32, out_size,
                                ir.FlexibleLayout.contiguous_strides(out_size))
        present = [ir.ExternKernel.require_contiguous(ir.ExternKernel.realize_input(t))
                   for t in args[:tensors] if t is not None]
        # the other arguments follow the tensors: a missing optional tensor as None in its place
        constants = [None] * (tensors - len(present)) + list(args[tensors:])
        return ir.TensorBox.create(ir.ExternKernelOut(
            layout, present, constants, python_kernel_name=f"extern_kernels.{name}"))
