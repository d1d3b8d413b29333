"""What a compile or conversion did: rewrites, skips with reasons, graphs before and after."""

from __future__ import annotations

import dataclasses
import re

import torch.fx


@dataclasses.dataclass
class LinearRewrite:
    module: str
    pattern: str  # linear | addmm | mm+add | matmul | call_module | fused_qkv | experts
    out_features: int
    in_features: int
    bits: int
    dense_bytes: int
    compressed_bytes: int
    calls: int = 1  # calls sharing these codes (ALBERT's layers share one set of weights)


@dataclasses.dataclass
class AttentionRewrite:
    module: str
    pattern: str  # sdpa | eager
    detail: str = ""


@dataclasses.dataclass
class Skip:
    module: str
    reason: str

    def __iter__(self):  # unpacks as (module, reason)
        return iter((self.module, self.reason))


@dataclasses.dataclass
class Report:
    """Accumulates over every graph dynamo hands the backend (graph breaks make several)."""

    linear_rewrites: list[LinearRewrite] = dataclasses.field(default_factory=list)
    attention_rewrites: list[AttentionRewrite] = dataclasses.field(default_factory=list)
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    graphs_before: list[str] = dataclasses.field(default_factory=list)
    graphs_after: list[str] = dataclasses.field(default_factory=list)
    fused_qkv: int = 0
    max_abs_error: float | None = None
    max_rel_error: float | None = None

    @property
    def graph_before(self) -> str:
        return "\n\n".join(self.graphs_before)

    @property
    def graph_after(self) -> str:
        return "\n\n".join(self.graphs_after)

    def skip(self, module: str, reason: str) -> None:
        self.skipped.append(Skip(module, reason))

    def extend(self, other: "Report") -> None:
        for f in ("linear_rewrites", "attention_rewrites", "skipped", "graphs_before",
                  "graphs_after"):
            getattr(self, f).extend(getattr(other, f))
        self.fused_qkv += other.fused_qkv

    def __str__(self) -> str:
        def pattern(r):
            return r.pattern + (f" x{r.calls}" if r.calls > 1 else "")

        width = max([12, *(len(pattern(r)) for r in self.linear_rewrites)])
        rows = [f"{'module':<44} {'pattern':<{width}} {'shape':>12} {'bits':>4} {'bytes':>19}"]
        for r in self.linear_rewrites:
            shape = f"{r.out_features}x{r.in_features}"
            size = f"{r.dense_bytes:,}->{r.compressed_bytes:,}"
            rows.append(f"{r.module:<44} {pattern(r):<{width}} {shape:>12} {r.bits:>4} {size:>19}")
        dense = sum(r.dense_bytes for r in self.linear_rewrites)
        packed = sum(r.compressed_bytes for r in self.linear_rewrites)
        ratio = f" ({dense / packed:.2f}x smaller)" if packed else ""
        tables = sum(r.pattern == "embedding" for r in self.linear_rewrites)
        tied = sum(r.pattern.startswith("tied:") for r in self.linear_rewrites)
        experts = sum(r.pattern == "experts" for r in self.linear_rewrites)
        linears = len(self.linear_rewrites) - tables - tied - experts
        extra = "".join(f"{n} {what}, " for n, what in ((tables, "embedding rewrites"),
                                                        (tied, "tied heads"),
                                                        (experts, "expert tensors")) if n)
        lines = [f"rs_compile: {linears} linear rewrites, {extra}"
                 f"{len(self.attention_rewrites)} attention rewrites, "
                 f"{len(self.skipped)} skipped; weights {dense:,} -> {packed:,} bytes{ratio}"]
        if self.linear_rewrites:
            lines += rows
        for a in self.attention_rewrites:
            lines.append(f"attention  {a.module:<44} {a.pattern} {a.detail}".rstrip())
        for s in self.skipped:
            lines.append(f"skipped    {s.module:<44} {s.reason}")
        if self.max_abs_error is not None:
            lines.append(f"max |compiled - eager| = {self.max_abs_error:.3e} "
                         f"(relative {self.max_rel_error:.3e})")
        return "\n".join(lines)


_INDEX = re.compile(r"\[(\d+)\]")
_KEY = re.compile(r"\[['\"]([^'\"]+)['\"]\]")


def _clean_path(path: str) -> str:
    """Dynamo source expressions to module names: "L['self'].h[0].attn" -> "h.0.attn".

The root may also be a wrapped forward's first argument, "L['args'][0]"."""
    path = re.sub(r"^L\[['\"]\w+['\"]\](\[\d+\])?\.?", "", path)
    path = _INDEX.sub(r".\1", path)
    path = _KEY.sub(r".\1", path)
    return path.replace("._modules.", ".").strip(".")


def module_name(node: torch.fx.Node) -> str:
    """Name of the innermost nn.Module that produced ``node`` (from dynamo's nn_module_stack)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, _ = list(stack.values())[-1]
        return _clean_path(str(path)) or "<root>"
    return f"<{node.name}>"


def readable_graph(gm: torch.fx.GraphModule) -> str:
    """The graph as Python code, each call annotated with the module it came from."""
    lines = []
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            owner = f"  # {module_name(node)}" if node.meta.get("nn_module_stack") else ""
            lines.append(node.format_node() + owner)
        elif node.op in ("placeholder", "output"):
            lines.append(node.format_node())
    return "\n".join(lines)
