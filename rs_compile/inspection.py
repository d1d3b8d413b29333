"""``inspect``: compile a model once with a recording backend and report what happened."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from rs_compile.backend import RealityStoneBackend
from rs_compile.config import split_options
from rs_compile.report import Report


def inspect(
    model: torch.nn.Module,
    *example_inputs: Any,
    example_kwargs: dict | None = None,
    **options: Any,
) -> Report:
    """Compile ``model`` with the realitystone backend, run it once, and report.

    The report lists linear/attention rewrites, skips with reasons, the graphs before and after
    (annotated with module names), and the largest difference between compiled and eager outputs.
    """
    backend = RealityStoneBackend(*split_options(options), record_graphs=True)
    kwargs = example_kwargs or {}
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        expected = model(*example_inputs, **kwargs)
        actual = compiled(*example_inputs, **kwargs)
    pairs = [(a, e) for a, e in zip(tree_leaves(actual), tree_leaves(expected))
             if isinstance(a, torch.Tensor) and a.is_floating_point()]
    report = backend.report
    _report_quantized(model, report)
    if pairs:
        report.max_abs_error = max(float((a - e).abs().max()) for a, e in pairs)
        report.max_rel_error = max(float((a - e).norm() / e.norm().clamp_min(1e-30)) for a, e in pairs)
    return report


def _report_quantized(model: torch.nn.Module, report: Report) -> None:
    """Skip entries for torch.ao quantized layers (quantize_dynamic's int8 Linear): dynamo breaks
    the graph at their packed-weight op, so the backend never sees them to say why."""
    from rs_compile.convert import _quantized_reason

    for name, module in model.named_modules():
        if (reason := _quantized_reason(module)) is not None:
            report.skip(name, reason)
