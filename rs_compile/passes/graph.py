"""Plumbing shared by the passes: a private copy of dynamo's graph plus new tensor inputs.

Dynamo's own GraphModule must not be mutated (adding placeholders or buffers to it breaks
dynamo), so the passes work on a copy and hand extra tensors (compressed weights) back as new
trailing placeholders; the backend appends their values to every call.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

log = logging.getLogger("rs_compile")
_VERSION = operator.attrgetter("_version")


class GraphRewrite:
    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        graph = fx.Graph()
        out = graph.graph_copy(gm.graph, {}, return_output_node=True)
        value, old_output = out
        graph.output(value, type_expr=getattr(old_output, "type", None))
        self.gm = fx.GraphModule(gm, graph)
        self.placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self._values = dict(zip(self.placeholders, example_inputs))
        self._arg_index = {n: i for i, n in enumerate(self.placeholders)}
        self.extra_inputs: list[torch.Tensor] = []
        self.derived: list[Derived] = []
        self._grad_mode: dict[fx.Node, bool] | None = None

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

    def add_derived(self, names: Sequence[str], values: Sequence[torch.Tensor],
                    sources: Sequence[fx.Node | torch.Tensor],
                    rebuild: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]]) -> list[fx.Node]:
        """New trailing inputs ``values`` computed from module tensors ``sources`` (placeholders,
        get_attr nodes or tensors) by ``rebuild``: at every call the backend checks the sources'
        version counters and storages (:class:`SourceGuard`) and rebuilds the values after an edit
        (``with torch.no_grad(): w.mul_(2)``, an optimizer step, ``load_state_dict``, ``w.data = t``)."""
        slots = tuple(range(len(self.extra_inputs), len(self.extra_inputs) + len(values)))
        nodes = [self.add_input(n, v) for n, v in zip(names, values)]
        refs, stamp = [], []
        for s in sources:
            t = self.value_of(s) if isinstance(s, fx.Node) else s
            # a placeholder is read from each call's arguments; a get_attr node or a module's
            # tensor is held by the graph module anyway
            refs.append(self._arg_index[s] if isinstance(s, fx.Node) and s in self._arg_index else t)
            stamp.append((t._version, t.data_ptr()))
        self.derived.append(Derived(tuple(refs), rebuild, slots, tuple(stamp)))
        return nodes

    def grad_enabled(self, node: fx.Node) -> bool:
        """Whether autograd records ``node``: the grad mode the graph is compiled under, changed by
        the ``torch._C._set_grad_enabled`` calls dynamo leaves for ``no_grad`` / ``enable_grad``
        blocks inside the traced code."""
        if self._grad_mode is None:
            mode, self._grad_mode = torch.is_grad_enabled(), {}
            for n in self.gm.graph.nodes:
                if n.op == "call_function" and n.target is torch._C._set_grad_enabled:
                    mode = bool(n.args[0])
                self._grad_mode[n] = mode
        return self._grad_mode.get(node, torch.is_grad_enabled())

    def guard(self) -> "SourceGuard | None":
        """The call-time check of the tensors the derived inputs were computed from."""
        return SourceGuard(self.derived, self.extra_inputs) if self.derived else None

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



@dataclasses.dataclass
class Derived:
    """Extra inputs at ``slots`` of the extra-input list, computed by ``rebuild`` from ``sources``
    (an int: that argument of each call; a tensor: a module tensor the graph module holds) when
    those had the ``stamp`` ``((_version, data_ptr), ...)``."""

    sources: tuple
    rebuild: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]]
    slots: tuple[int, ...]
    stamp: tuple


class SourceGuard:
    """Keeps compressed inputs in step with the module tensors they were encoded from.

    Each call compares every source tensor's version counter and storage pointer with the values
    its codes were built from; a difference (an in-place edit under ``no_grad``, an optimizer step,
    ``load_state_dict``, ``param.data = t``) re-encodes the affected weights before the graph
    runs. When nothing changed the check is two tuples of ints (about 0.3 us per source tensor,
    30-40 us for 100 weights on this CPU: under 0.5% of a 10 ms decode step).
    An in-place edit through ``param.data`` (``w.data.mul_(2)``) bumps no version counter and keeps
    the storage: it cannot be seen without reading the whole weight, and needs
    ``torch.compiler.reset()`` (the encode cache is keyed on content, so the recompile re-encodes).
    """

    def __init__(self, derived: list[Derived], extras: list[torch.Tensor]):
        self.derived = derived
        self.extras = extras  # the list the backend appends to every call: updated in place
        refs = [r for d in derived for r in d.sources]
        if len(refs) > 1 and all(isinstance(r, int) for r in refs):
            self._sources = operator.itemgetter(*refs)  # the common case, ~1.5x a comprehension
        else:
            self._sources = lambda args: [args[r] if isinstance(r, int) else r for r in refs]
        self.versions = tuple(v for d in derived for v, _ in d.stamp)
        self.ptrs = tuple(p for d in derived for _, p in d.stamp)

    def check(self, args: Sequence[Any]) -> None:
        """Re-encode whatever changed since the codes were built (cheap when nothing did)."""
        ts = self._sources(args)
        versions = tuple(map(_VERSION, ts))
        ptrs = tuple(map(torch.Tensor.data_ptr, ts))
        if versions == self.versions and ptrs == self.ptrs:
            return
        start = 0
        for d in self.derived:
            end = start + len(d.sources)
            stamp = tuple(zip(versions[start:end], ptrs[start:end]))
            if stamp != d.stamp:
                self._rebuild(d, ts[start:end], stamp)
            start = end
        self.versions, self.ptrs = versions, ptrs

    def _rebuild(self, d: Derived, sources: list[torch.Tensor], stamp: tuple) -> None:
        with torch.no_grad():
            values = d.rebuild(sources)
        for slot, new in zip(d.slots, values, strict=True):
            old = self.extras[slot]
            if new.shape != old.shape or new.dtype != old.dtype:
                raise RuntimeError(
                    f"rs_compile: a weight changed after compilation and its codes no longer fit "
                    f"the compiled graph ({tuple(old.shape)} {old.dtype} -> {tuple(new.shape)} "
                    f"{new.dtype}); call torch.compiler.reset() and compile again")
            self.extras[slot] = new
        d.stamp = stamp
        log.info("re-encoded %d weight tensor(s) changed since compilation", len(sources))
