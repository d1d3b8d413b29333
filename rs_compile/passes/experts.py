"""Mixture-of-experts in the compile route.

transformers' 3-D expert parameters (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) reach a
dynamo graph in one of three forms, by ``config._experts_implementation``:

* ``grouped_mm`` (the default): with float32 weights under torch.compile transformers calls
  ``transformers::grouped_mm_fallback(x_sorted, W.transpose(-2, -1), offs=offsets)`` (rows sorted
  by expert, ``offsets`` the running row counts). :func:`compress_grouped_experts` rewrites it
  into ``rs::expert_linear(x_sorted, bucketize(arange(S), offsets, right=True), codes, ...)``:
  the row -> expert map recovered from the offsets, the weight encoded per expert at compile
  time (a snapshot, inference only, as for linears);
* ``batched_mm`` (``W[expert_ids]`` then ``bmm``), bf16 ``grouped_mm`` and the ``eager`` expert
  loop (graph breaks on its data-dependent loop): not rewritten.

Every module parameter of 3 or more dims a graph still reads after the rewrite is listed in the
report's skipped list with the reason (:func:`report_dense_experts`), so nothing is silently left
dense. ``rs_compile.convert(model)`` compresses every recognised experts module whatever its
implementation (rs_compile.experts.CompressedExperts); the converted model traces as
``rs::expert_linear`` nodes.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx
from torch.utils.weak import WeakIdKeyDictionary

from rs_compile.codec.encode import encode
from rs_compile.config import CompileConfig, EncodingConfig
from rs_compile.report import LinearRewrite, Report, _clean_path

REASON = ("{shape} expert/3-D parameter stays dense: the compile pass compresses expert tensors "
          "only in transformers' float32 grouped_mm form (experts_implementation='grouped_mm'); "
          "run rs_compile.convert(model) before torch.compile to compress them "
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


_cache = WeakIdKeyDictionary()


def _encode_experts(param: torch.Tensor, fmt, curvatures) -> tuple[torch.Tensor, ...]:
    """Stacked ``(codes, groups, row_scale)`` of ``param [E, out, in]``, cached across recompiles
    on the tensor object, its version counter and the codec settings (as encode_parameter)."""
    key = (param._version, fmt, curvatures)
    entry = _cache.setdefault(param, {})
    if key not in entry:
        encs = [encode(param[e].detach(), fmt, curvatures=curvatures) for e in range(param.shape[0])]
        entry.clear()
        entry[key] = tuple(torch.stack([enc.tensors()[i] for enc in encs]) for i in range(3))
    return entry[key]


def _grouped_mm_op():
    ns = getattr(torch.ops, "transformers", None)
    try:
        return getattr(ns, "grouped_mm_fallback") if ns is not None else None
    except (AttributeError, RuntimeError):
        return None


def _grouped_uses(param: fx.Node, op) -> list[tuple[fx.Node, fx.Node]] | None:
    """``[(transpose, grouped_mm_fallback call)]`` when every use of ``param`` is
    ``grouped_mm_fallback(x, param.transpose(-2, -1), offs=...)`` as the weight, else None."""
    uses = []
    for t in param.users:
        dims = tuple(t.args[1:]) if t.op == "call_method" else ()
        if t.target != "transpose" or dims not in ((-2, -1), (-1, -2), (1, 2), (2, 1)) or not t.users:
            return None
        for call in t.users:
            if (call.op != "call_function" or call.target not in (op, getattr(op, "default", None))
                    or len(call.args) != 2 or call.args[1] is not t or set(call.kwargs) != {"offs"}):
                return None
            uses.append((t, call))
    return uses or None


def compress_grouped_experts(rw, encoding: EncodingConfig, compile_config: CompileConfig,
                             report: Report) -> int:
    """Rewrite ``grouped_mm_fallback`` expert matmuls on 3-D parameters into ``rs::expert_linear``
    (module doc) with an EncodingConfig and a CompileConfig; returns how many parameters were
    compressed."""
    from rs_compile.experts import expert_linear  # noqa: F401  (registers rs::expert_linear)
    from rs_compile.passes.linear import input_tag

    op = _grouped_mm_op()
    if op is None:
        return 0
    graph = rw.gm.graph
    count = 0
    for node in list(rw.placeholders):
        w = rw.value_of(node)
        if (not isinstance(w, torch.Tensor) or w.dim() != 3 or not w.is_floating_point()
                or not rw.is_parameter(node)):
            continue
        uses = _grouped_uses(node, op)
        if uses is None:
            continue
        name = parameter_name(node)
        e, n_out, n_in = w.shape
        if min(n_out, n_in) < encoding.min_features:
            report.skip(name, f"expert matrices {(n_out, n_in)} smaller than "
                              f"min_features={encoding.min_features}")
            continue
        if not torch.isfinite(w).all():
            report.skip(name, "expert weights contain NaN/Inf values")
            continue
        fmt = encoding.format
        packed = _encode_experts(w, fmt, encoding.curvatures)
        inputs = [rw.add_input(f"{input_tag(name)}_{kind}", t)
                  for kind, t in zip(("codes", "groups", "row_scale"), packed)]
        for t, call in uses:
            x, offs = call.args[0], call.kwargs["offs"]
            with graph.inserting_before(call):
                rows = graph.call_function(torch.arange, (graph.call_method("size", (x, 0)),),
                                           {"dtype": torch.int32, "device": w.device})
                ids = graph.call_function(torch.bucketize, (rows, offs), {"right": True})
                new = graph.call_function(torch.ops.rs.expert_linear.default,
                                          (x, ids, *inputs, fmt.bits, fmt.group_size, n_in,
                                           compile_config.act_bits))
            new.meta.update({k: v for k, v in call.meta.items() if k != "example_value"})
            call.replace_all_uses_with(new)
            graph.erase_node(call)
            if not t.users:
                graph.erase_node(t)
        count += 1
        report.linear_rewrites.append(LinearRewrite(
            module=name, pattern="experts", out_features=e * n_out, in_features=n_in, bits=fmt.bits,
            dense_bytes=w.numel() * w.element_size(), compressed_bytes=sum(t.nbytes for t in packed)))
    return count
