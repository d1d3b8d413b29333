"""Plumbing shared by the passes: a private copy of dynamo's graph plus new tensor inputs.

Dynamo's own GraphModule must not be mutated (adding placeholders or buffers to it breaks
dynamo), so the passes work on a copy and hand extra tensors (compressed weights) back as new
trailing placeholders; the backend appends their values to every call.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx


class GraphRewrite:
    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        graph = fx.Graph()
        out = graph.graph_copy(gm.graph, {}, return_output_node=True)
        value, old_output = out
        graph.output(value, type_expr=getattr(old_output, "type", None))
        self.gm = fx.GraphModule(gm, graph)
        self.placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self._values = dict(zip(self.placeholders, example_inputs))
        self.extra_inputs: list[torch.Tensor] = []

    def value_of(self, node: fx.Node) -> Any:
        """Real tensor behind a placeholder or get_attr node (None when unknown)."""
        if node.op == "placeholder":
            return self._values.get(node)
        if node.op == "get_attr":
            obj = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        return None

    def is_parameter(self, node: fx.Node) -> bool:
        """True when the node holds a module parameter/buffer lifted by dynamo (not user data)."""
        if node.op == "get_attr":
            return isinstance(self.value_of(node), torch.Tensor)
        if node.op != "placeholder":
            return False
        if isinstance(self._values.get(node), torch.nn.Parameter):
            return True
        grapharg = node.meta.get("grapharg")
        source = getattr(getattr(grapharg, "source", None), "name", "")
        source = source() if callable(source) else source
        return "_parameters[" in source or "_buffers[" in source

    def add_input(self, name: str, value: torch.Tensor) -> fx.Node:
        """A new trailing placeholder whose value the backend appends to every call."""
        last = self.placeholders[-1] if self.placeholders else None
        ctx = self.gm.graph.inserting_after(last) if last else self.gm.graph.inserting_before()
        with ctx:
            node = self.gm.graph.placeholder(f"rs_{name}")
        # The graph uniquifies the node's name but not its target, and a placeholder's target is
        # the argument name in the generated code: two weights read in one module (two F.linear
        # calls in a Swin attention) would otherwise both be ``rs_<module>_codes``.
        node.target = node.name
        node.meta["example_value"] = value
        self.placeholders.append(node)
        self._values[node] = value
        self.extra_inputs.append(value)
        return node

    def finish(self) -> fx.GraphModule:
        self.gm.graph.eliminate_dead_code(is_impure_node=_has_side_effects)
        self.gm.graph.lint()
        self.gm.recompile()
        return self.gm


def _has_side_effects(node: fx.Node) -> bool:
    """FX's purity test plus in-place Tensor methods and functions (``x.index_copy_(...)``,
    ``torch.Tensor.add_``), which it calls pure: dropping them loses a static KV cache's writes."""
    if node.is_impure():
        return True
    if node.op not in ("call_method", "call_function"):
        return False
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")
