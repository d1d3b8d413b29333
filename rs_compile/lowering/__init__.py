"""Inductor lowerings of the rs ops (CPU: decompositions Inductor fuses into C++).

Installed on first use rather than at import, so that ``import rs_compile`` neither loads Inductor
nor changes it: by the realitystone backend before it compiles a graph, and by the fake kernels of
the rs ops, which run whenever dynamo traces a graph holding them (a converted model, with any
backend), before Inductor picks its decompositions.
"""

from __future__ import annotations

import functools


@functools.cache
def _register() -> None:
    from rs_compile.lowering import attention, experts, linear

    linear.install()
    attention.install()
    experts.install()


def install_lowerings() -> None:
    """Register every rs decomposition with Inductor and put rs_compile's sources into the key
    of Inductor compiles that do not go through the backend (idempotent, cheap after the first)."""
    from rs_compile.lowering.cache import key_global_post_grad_pass

    _register()
    key_global_post_grad_pass()
