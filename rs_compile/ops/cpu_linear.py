"""``rs::cpu_linear``: rs::linear's CPU kernel path as an op of its own.

Inductor's lowering of rs::linear (rs_compile.lowering.linear) emits it for float32 CPU
activations where the hand-written kernel applies. The Python wrapper calls the kernel directly
(``extern_kernels.rs_cpu_linear``); a C++ wrapper (AOTInductor, ``rs_compile.export``) calls this
op through the dispatcher, so it is defined with the other rs ops: a process that loads an
exported package needs only ``import rs_compile.ops`` (or ``import rs_compile``) to run it.
"""

from __future__ import annotations

import torch

from rs_compile.lowering import cpu_kernel
from rs_compile.ops.linear import check_inputs

_LIB = torch.library.Library("rs", "FRAGMENT")
_LIB.define("cpu_linear(Tensor x, Tensor codes, Tensor groups, Tensor row_scale, Tensor? bias, "
            "int bits, int group_size, int in_features, int act_bits) -> Tensor")


def cpu_linear(x, codes, groups, row_scale, bias, bits, group_size, in_features, act_bits):
    """Same numbers as rs::linear's CPU path, with its checks (the cheap test first: this runs
    once per layer and call in an AOTInductor package)."""
    if not cpu_kernel.fast_checks_pass(x, codes, groups, row_scale, bias, bits, group_size,
                                       in_features, act_bits):
        check_inputs(x, codes, groups, row_scale, bias, bits, group_size, in_features, act_bits)
    return cpu_kernel.linear_cpu(x, codes, groups, row_scale, bias, bits, group_size, in_features,
                                 act_bits)


_LIB.impl("cpu_linear", cpu_linear, "CPU")


@torch.library.register_fake("rs::cpu_linear")
def _(x, codes, groups, row_scale, bias, bits, group_size, in_features, act_bits):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))
