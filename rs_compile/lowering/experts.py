"""Inductor lowering of ``rs::expert_linear`` on CPU for decode-sized calls.

With few routed rows (``S <= MAX_GATHER_ROWS``, a static size: a one-token decode step with
top-k routing has ``S = k``), each row becomes one ``rs::linear`` on its expert's codes, indexed
by the (data-dependent) expert id: only the selected experts' bytes are read, and whatever
rs::linear lowers to (today decode-then-multiply fused by Inductor; a faster CPU kernel later)
does the work.
Larger or symbolic ``S`` (prefill) becomes ``rs::expert_linear_grouped``, a fallback kernel (the
same CPU implementation: rows grouped by expert, one ``rs::linear`` per expert).
"""

from __future__ import annotations

import torch

from rs_compile.experts import expert_linear  # noqa: F401  (defines torch.ops.rs.expert_linear)
from rs_compile.lowering.registry import register

MAX_GATHER_ROWS = 8


def expert_linear_decomposition(x, expert_ids, codes, groups, row_scale, bits, group_size,
                                in_features, act_bits=0):
    s = x.shape[0]
    if not isinstance(s, int) or s == 0 or s > MAX_GATHER_ROWS:
        # the CPU kernel (rows grouped by expert), under another name: Inductor refuses an op that
        # is both decomposed and a fallback
        return torch.ops.rs.expert_linear_grouped(x, expert_ids, codes, groups, row_scale, bits,
                                                  group_size, in_features, act_bits)
    # one rs::linear per routed row on that row's expert, gathered by index: only the selected
    # experts' codes are read, and rs::linear's own lowering (decode fused with the product, or
    # the CPU kernel that replaces it) does the multiply
    rows = []
    for i in range(s):
        e = expert_ids[i:i + 1].to(torch.long)
        c, g, r = (t.index_select(0, e).squeeze(0) for t in (codes, groups, row_scale))
        rows.append(torch.ops.rs.linear(x[i:i + 1], c, g, r, None, bits, group_size, in_features,
                                        act_bits))
    return torch.cat(rows)


def install() -> None:
    """Register the decomposition with Inductor (idempotent)."""
    register(torch.ops.rs.expert_linear.default, expert_linear_decomposition)
