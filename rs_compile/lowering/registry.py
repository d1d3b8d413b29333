"""Registering decompositions with Inductor so that every later compile sees them."""

from __future__ import annotations

from typing import Callable

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
