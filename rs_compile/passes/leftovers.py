"""Weights a user would expect compressed that the passes leave dense: report them with a reason.

Runs after the rewriting passes, changes nothing in the graph. Two cases have no other entry:

* a fused PyTorch kernel reads the weights whole: ``nn.TransformerEncoderLayer``'s fast path
  (``torch._transformer_encoder_layer_fwd``, taken in eval mode without grad),
  ``nn.MultiheadAttention``'s (``torch._native_multi_head_attention``) and its functional forward,
  which dynamo keeps as one call;
* a linear call whose weight is computed from parameters at run time (``F.linear(x, self.a.weight
  + 0)``, ``F.linear(x, torch.cat([self.q.weight, self.k.weight]))``): only a stored parameter,
  possibly transposed, is compressed.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from rs_compile.config import CompileConfig, EncodingConfig
from rs_compile.passes.linear import ADDMM, LINEAR, MATMUL, _arg, _is_call, resolve_weight
from rs_compile.report import Report, _clean_path, module_name

FUSED = {  # op: (what it is, how to avoid it)
    torch._transformer_encoder_layer_fwd: (
        "nn.TransformerEncoderLayer's fused fast path, taken in eval mode without grad",
        "train mode or grad enabled avoids it"),
    torch._native_multi_head_attention: (
        "nn.MultiheadAttention's fused fast path, taken in eval mode without grad",
        "train mode or grad enabled avoids it"),
    F.multi_head_attention_forward: (
        "nn.MultiheadAttention's functional forward, which dynamo keeps as one call", ""),
}


def parameter_label(node: fx.Node) -> str:
    """A parameter placeholder as users name it: "linear1" for a Linear's weight,
    "self_attn.in_proj_weight" for a bare Parameter (convert's skip entries use the same)."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    path = getattr(source, "name", None)
    path = path() if callable(path) else path
    if node.op == "get_attr":
        path = node.target
    if not isinstance(path, str):
        return f"<{node.name}>"
    path = ("." + _clean_path(path)).replace("._modules.", ".").replace("._parameters.", ".")
    path = path.strip(".")
    return path[: -len(".weight")] if path.endswith(".weight") else path


def _is_weight(rw, node, encoding: EncodingConfig) -> bool:
    """A 2-D floating-point parameter at least ``min_features`` on each side."""
    if not isinstance(node, fx.Node) or not rw.is_parameter(node):
        return False
    t = rw.value_of(node)
    return (isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_floating_point()
            and min(t.shape) >= encoding.min_features)


def _parameter_sources(rw, node: fx.Node, limit: int = 12) -> list[fx.Node] | None:
    """The parameters ``node`` is computed from when it depends on nothing else (no user input,
    within ``limit`` nodes), else None."""
    params, frontier, seen = [], [node], set()
    while frontier:
        cur = frontier.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if len(seen) > limit:
            return None
        if cur.op in ("placeholder", "get_attr"):
            if not rw.is_parameter(cur):
                return None
            params.append(cur)
        elif cur.op in ("call_function", "call_method"):
            frontier.extend(cur.all_input_nodes)
        else:
            return None
    return params or None


def report_dense_weights(rw, encoding: EncodingConfig, compile_config: CompileConfig,
                         report: Report) -> int:
    """Skip entries for the weights described in the module docstring; returns how many
    (``compile_config``: unused, the passes' common signature)."""
    reported: set[fx.Node] = set()
    count = 0
    for node in rw.gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in FUSED:
            name = getattr(node.target, "__name__", str(node.target))
            for arg in node.all_input_nodes:
                if arg in reported or not _is_weight(rw, arg, encoding):
                    continue
                reported.add(arg)
                count += 1
                what, avoid = FUSED[node.target]
                report.skip(parameter_label(arg),
                            f"read whole by torch.{name} ({what}); rs_compile does not rewrite "
                            "inside it" + (f" ({avoid})" if avoid else "") + "; rs_compile.convert "
                            "compresses the Linear layers and decodes their weights for the call")
            continue
        if _is_call(node, LINEAR):
            weight = _arg(node, 1, "weight")
        elif _is_call(node, ADDMM) and len(node.args) == 3:
            weight = node.args[2]
        elif _is_call(node, MATMUL) and len(node.args) == 2:
            weight = node.args[1]
        else:
            continue
        if not isinstance(weight, fx.Node) or resolve_weight(weight) is not None:
            continue  # a stored tensor: compress_linears rewrote it or reported why not
        params = _parameter_sources(rw, weight)
        if not params or not any(_is_weight(rw, p, encoding) for p in params):
            continue
        count += 1
        names = sorted({parameter_label(p) for p in params})
        ops = weight.target if weight.op == "call_method" else getattr(weight.target, "__name__", "?")
        report.skip(module_name(node),
                    f"linear weight is computed from {names} at run time (by {ops}); only a "
                    "stored parameter, possibly transposed, is compressed")
    return count
