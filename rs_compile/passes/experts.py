"""Mixture-of-experts in the compile route: report the expert tensors that stay dense.

The compile pass does not compress transformers' 3-D expert parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``) that it finds in a dynamo graph: they reach the graph through
``grouped_mm`` / ``transformers::grouped_mm_fallback``, a ``bmm`` of indexed weights or a
data-dependent expert loop (graph breaks), and are left as they are. So that nothing is silently
left dense, every module parameter of 3 or more dims the graph reads is listed in the report's
skipped list with the reason. ``rs_compile.convert(model)`` first compresses them
(rs_compile.experts.CompressedExperts); the converted model then traces as ``rs::expert_linear``
nodes, and no dense expert parameter is left to report.
"""

from __future__ import annotations

import re

import torch

from rs_compile.report import Report, _clean_path

REASON = ("{shape} expert/3-D parameter stays dense: the compile pass does not compress expert "
          "tensors; run rs_compile.convert(model) before torch.compile to compress them "
          "(CompressedExperts, rs::expert_linear)")


def parameter_name(node: torch.fx.Node) -> str:
    """Dotted name of a lifted parameter from its dynamo source, e.g. ``model.layers.0.mlp.experts.gate_up_proj``."""
    grapharg = node.meta.get("grapharg")
    source = getattr(getattr(grapharg, "source", None), "name", "")
    source = source() if callable(source) else source
    if not source:
        return f"<{node.name}>"
    name = re.sub(r"(^|\.)_(modules|parameters|buffers)\.", r"\1", _clean_path(str(source)))
    return name or f"<{node.name}>"


def report_dense_experts(rw, report: Report) -> int:
    """Skip entries for the ``>= 3``-D float module parameters ``rw``'s graph reads; returns how many."""
    count = 0
    for node in rw.placeholders:
        value = rw.value_of(node)
        if (not isinstance(value, torch.Tensor) or value.dim() < 3 or not value.is_floating_point()
                or not node.users or not rw.is_parameter(node)):
            continue
        report.skip(parameter_name(node), REASON.format(shape=list(value.shape)))
        count += 1
    return count
