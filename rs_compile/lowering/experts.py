"""Inductor lowering of ``rs::expert_linear``.

On CPU where the rs::linear kernel applies (float32, kernel built), the op becomes
``rs::cpu_expert_linear``, which a lowering turns into a direct call from the compiled graph
(``extern_kernels.rs_cpu_expert_linear(..., out=buf)``, no dispatcher): per expert present, the
kernel multiplies that expert's rows on ``codes[e]``, a view of the stacked buffers (nothing
copied; a decode step reads exactly the k selected experts' bytes), for any number of rows
(rs_compile.experts.expert_linear_into).

Elsewhere, decode-sized calls (``S <= MAX_GATHER_ROWS``, a static size) become one ``rs::linear``
per routed row on its expert's codes picked by ``index_select`` (a copy of that expert's codes,
then whatever rs::linear lowers to); larger or symbolic ``S`` (prefill) becomes
``rs::expert_linear_grouped``, a fallback kernel (the op's own implementation, rows grouped by
expert).
"""

from __future__ import annotations

import torch

from rs_compile.experts import _grouped, expert_linear_into  # noqa: F401  (defines the rs ops)
from rs_compile.lowering import cpu_kernel
from rs_compile.lowering.registry import register, register_extern_out

MAX_GATHER_ROWS = 8

_LIB = torch.library.Library("rs", "FRAGMENT")
_LIB.define("cpu_expert_linear(Tensor x, Tensor expert_ids, Tensor codes, Tensor groups, "
            "Tensor row_scale, int bits, int group_size, int in_features, int act_bits) -> Tensor")
_LIB.impl("cpu_expert_linear", _grouped, "CPU")


@torch.library.register_fake("rs::cpu_expert_linear")
def _(x, expert_ids, codes, groups, row_scale, bits, group_size, in_features, act_bits):
    return x.new_empty((x.shape[0], codes.shape[1]))


def cpu_expert_linear_out(x, expert_ids, codes, groups, row_scale, bits, group_size, in_features,
                          act_bits, *, out):
    """The compiled graph's call into ``out`` (inputs contiguous, checked when traced)."""
    return expert_linear_into(out, x, expert_ids, codes, groups, row_scale, bits, group_size,
                              in_features, act_bits)


def expert_linear_decomposition(x, expert_ids, codes, groups, row_scale, bits, group_size,
                                in_features, act_bits=0):
    if (x.device.type == "cpu" and cpu_kernel.supports(x, bits, group_size)
            and cpu_kernel.kernel() is not None):
        return torch.ops.rs.cpu_expert_linear(x, expert_ids, codes, groups, row_scale, bits,
                                              group_size, in_features, act_bits)
    s = x.shape[0]
    if not isinstance(s, int) or s == 0 or s > MAX_GATHER_ROWS:
        # the op's implementation under another name: Inductor refuses an op that is both
        # decomposed and a fallback
        return torch.ops.rs.expert_linear_grouped(x, expert_ids, codes, groups, row_scale, bits,
                                                  group_size, in_features, act_bits)
    rows = []
    for i in range(s):
        e = expert_ids[i:i + 1].to(torch.long)
        c, g, r = (t.index_select(0, e).squeeze(0) for t in (codes, groups, row_scale))
        rows.append(torch.ops.rs.linear(x[i:i + 1], c, g, r, None, bits, group_size, in_features,
                                        act_bits))
    return torch.cat(rows)


def install() -> None:
    """Register the decomposition and the kernel call with Inductor (idempotent)."""
    register(torch.ops.rs.expert_linear.default, expert_linear_decomposition)
    register_extern_out(torch.ops.rs.cpu_expert_linear.default, "rs_cpu_expert_linear",
                        cpu_expert_linear_out, 5,
                        lambda x, ids, codes, *_: [x.get_size()[0], codes.get_size()[1]])
