"""Fuse the q, k, v projections of one attention into a single ``rs::linear``.

BERT and Llama project the same hidden state three times; one op over the concatenated codes
reads the activations once and launches one GEMM/GEMV instead of three. The fused output is
split back into the three original results, so everything downstream is untouched.

The codec encodes each output row independently, so the codes of the concatenated weight are the
row-wise concatenation of each weight's codes: encoding them one by one is bit-identical to
encoding the concatenation and reuses ``encode_parameter``'s cache across recompiles.

Runs before ``compress_linears``, which then finds no linears left there.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx

from rs_compile.codec.encode import encode_parameter
from rs_compile.config import CompileConfig, EncodingConfig
from rs_compile.modules import PACKED
from rs_compile.passes.linear import (
    act_bits_kwargs,
    LinearMatch,
    is_mutated,
    readers_outside,
    input_tag,
    match_linear,
    needs_grad,
    skip_reason,
)
from rs_compile.report import LinearRewrite, Report, module_name


def _parent(node: fx.Node) -> str:
    return module_name(node).rpartition(".")[0]


def projection_groups(rw) -> list[list[LinearMatch]]:
    """Exactly three ``linear`` calls on one input inside one module (q/k/v), in graph order."""
    groups: dict[tuple, list[LinearMatch]] = defaultdict(list)
    for node in rw.gm.graph.nodes:
        m = match_linear(node, rw.value_of, rw.gm)
        if m is not None and m.pattern == "linear":
            groups[(m.x, _parent(node))].append(m)
    return [g for g in groups.values() if len(g) == 3]


def _skip_reason(rw, encoding: EncodingConfig, compile_config: CompileConfig, m: LinearMatch,
                 consumers: set[fx.Node]) -> str | None:
    """Why one projection cannot join the fused op (the same rules as compress_linears).
    ``consumers``: the projections fused with these weights (several when layers share them)."""
    if not rw.is_parameter(m.weight):
        return "weight is a graph input, not a module parameter (would snapshot user data)"
    if m.bias is not None and not (isinstance(m.bias, fx.Node) and rw.is_parameter(m.bias)):
        return "bias is not a module parameter"
    if m.bias is not None and needs_grad(rw, rw.value_of(m.bias), consumers):
        return "bias requires grad: the fused op's bias is a concatenated copy that gets no gradient"
    outside = readers_outside(m.weight, consumers)
    w = rw.value_of(m.weight)
    return skip_reason(w, encoding, compile_config, outside, is_mutated(m.weight),
                       needs_grad(rw, w, consumers))


def _pack(layout: tuple, encoding: EncodingConfig, weights, biases) -> tuple[list, list, torch.Tensor | None]:
    """(encodings, concatenated packed tensors, concatenated bias or None) of projections with
    ``weights`` and ``biases`` (one per projection that has one); ``layout`` holds each one's
    (stored_in_out, has_bias)."""
    encs = [encode_parameter(w, stored_in_out, encoding.format, encoding.curvatures)
            for (stored_in_out, _), w in zip(layout, weights)]
    packed = [torch.cat(ts) for ts in zip(*(e.tensors() for e in encs))]
    if not biases:
        return encs, packed, None
    values = iter(biases)
    values = [next(values).detach() if has_bias else None for _, has_bias in layout]
    dtype = next(v.dtype for v in values if v is not None)
    bias = torch.cat([v.to(dtype) if v is not None else torch.zeros(e.out_features, dtype=dtype)
                      for v, e in zip(values, encs)])
    return encs, packed, bias


def _fused_inputs(rw, encoding: EncodingConfig, group: list[LinearMatch]):
    """Encoded weights, output sizes, and the new inputs (codes..., bias) of one fused op; the
    inputs are re-encoded when the weights or biases are edited after compiling."""
    biases = [m.bias for m in group if m.bias is not None]
    sources = [m.weight for m in group] + biases
    layout = tuple((m.stored_in_out, m.bias is not None) for m in group)
    encs, packed, bias_value = _pack(layout, encoding, [rw.value_of(m.weight) for m in group],
                                     [rw.value_of(b) for b in biases])
    tag = "_".join(filter(None, (input_tag(_parent(group[0].node)), "qkv")))
    names = [f"{tag}_{kind}" for kind in PACKED] + ([f"{tag}_bias"] if biases else [])

    def rebuild(ts):
        _, packed, bias = _pack(layout, encoding, ts[:len(layout)], ts[len(layout):])
        return [*packed, *([bias] if bias is not None else [])]

    nodes = rw.add_derived(names, [*packed, *([bias_value] if biases else [])], sources, rebuild)
    bias = nodes[len(PACKED)] if biases else None
    return encs, [e.out_features for e in encs], nodes[:len(PACKED)], bias


def _fuse(rw, compile_config: CompileConfig, group: list[LinearMatch], inputs, report: Report,
          entries: list | None) -> list:
    """Replace ``group`` by one op over ``inputs``; ``entries`` are the report rows of an earlier
    group sharing these weights (their ``calls`` grow), None for the first."""
    graph = rw.gm.graph
    encs, sizes, nodes, bias = inputs
    e = encs[0]
    first = group[0].node
    with graph.inserting_before(first):
        fused = graph.call_function(
            torch.ops.rs.linear.default,
            (group[0].x, *nodes, bias, e.bits, e.group_size, e.in_features),
            act_bits_kwargs(compile_config))
        parts = graph.call_function(torch.split, (fused, sizes), {"dim": -1})
        outs = [graph.call_method("contiguous", (graph.call_function(operator.getitem, (parts, i)),))
                for i in range(len(group))]
    meta = {k: v for k, v in first.meta.items() if k != "example_value"}
    stack = meta.get("nn_module_stack")
    if stack:  # the fused op belongs to the attention module, not to q_proj
        meta["nn_module_stack"] = dict(list(stack.items())[:-1])
    fused.meta.update(meta)
    parts.meta.update(meta)
    new_entries = []
    for i, (m, out, enc) in enumerate(zip(group, outs, encs)):
        out.meta.update({k: v for k, v in m.node.meta.items() if k != "example_value"})
        out.args[0].meta.update(out.meta)
        m.node.replace_all_uses_with(out)
        graph.erase_node(m.node)
        if entries is not None:
            entries[i].calls += 1
            continue
        w = rw.value_of(m.weight)
        new_entries.append(LinearRewrite(
            module=module_name(out), pattern="fused_qkv", out_features=enc.out_features,
            in_features=enc.in_features, bits=enc.bits,
            dense_bytes=w.numel() * w.element_size(), compressed_bytes=enc.nbytes()))
    report.linear_rewrites.extend(new_entries)
    return entries if entries is not None else new_entries


def fuse_qkv_projections(rw, encoding: EncodingConfig, compile_config: CompileConfig,
                         report: Report) -> int:
    """Fuse every q/k/v projection triple of ``rw`` (a GraphRewrite); returns the number fused.

    Triples reading the same three weights (ALBERT calls one layer's modules in every layer) share
    one set of fused codes, encoded once and reported once."""
    if not compile_config.fuse_qkv:
        return 0
    from rs_compile.ops.linear import linear  # noqa: F401  (registers rs::linear)

    by_weights: dict[tuple, list[list[LinearMatch]]] = defaultdict(list)
    for group in projection_groups(rw):
        by_weights[tuple(m.weight for m in group)].append(group)
    count = 0
    for groups in by_weights.values():
        consumers = {m.node for group in groups for m in group}
        group = groups[0]
        reasons = [(module_name(m.node), r) for m in group
                   if (r := _skip_reason(rw, encoding, compile_config, m, consumers))]
        if reasons:
            name, reason = reasons[0]
            report.skip(_parent(group[0].node), f"q/k/v projections not fused: {name}: {reason}")
            continue
        inputs, entries = _fused_inputs(rw, encoding, group), None
        for group in groups:
            entries = _fuse(rw, compile_config, group, inputs, report, entries)
            count += 1
    report.fused_qkv += count
    return count
