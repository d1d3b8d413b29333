"""Find Linear patterns in a dynamo FX graph and rewrite them into ``rs::linear``.

Patterns (W is a parameter, possibly reached through a transpose):
  linear(x, W, b) / F.linear           W stored [out, in]
  addmm(b, x, W)                       HF GPT-2 Conv1D: W stored [in, out]
  mm(x, W) [+ b], matmul(x, W) [+ b]   either orientation
  call_module nn.Linear

Only tensors dynamo lifted from module parameters/buffers are compressed: a weight that is a
user input may change between calls, so compressing a snapshot of it would be silently wrong.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from rs_compile.codec.encode import encode_parameter
from rs_compile.config import CompileConfig, EncodingConfig
from rs_compile.modules import PACKED
from rs_compile.report import LinearRewrite, Report, module_name

LINEAR = {torch._C._nn.linear, F.linear}
ADDMM = {torch.addmm}
MATMUL = {torch.mm, torch.matmul, operator.matmul}
ADD = {operator.add, torch.add, operator.iadd}
TRANSPOSE_METHODS = {"t", "transpose", "permute", "T", "mT"}


@dataclasses.dataclass
class LinearMatch:
    node: fx.Node  # its value equals x @ W_linear.T (+ bias); replaced by the op
    x: fx.Node
    weight: fx.Node  # the placeholder / get_attr / module holding W
    stored_in_out: bool  # True when the stored tensor is [in, out] (Conv1D)
    bias: fx.Node | None
    pattern: str
    weight_tensor: torch.Tensor | None = None  # set for call_module matches


def _is_call(node, targets=(), methods=()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    return node.op == "call_method" and node.target in methods


def _is_swap_of_last_two(node: fx.Node) -> bool:
    """t(w), w.T, w.mT, transpose(w, 0, 1), permute(w, 1, 0) on a 2-D tensor."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("T", "mT")
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op not in ("call_method", "call_function") or name not in TRANSPOSE_METHODS:
        return False
    rest = [a for a in node.args[1:]]
    if name in ("t", "T", "mT"):
        return not rest
    dims = tuple(rest[0]) if name == "permute" and len(rest) == 1 else tuple(rest)
    return dims in ((0, 1), (1, 0), (-1, -2), (-2, -1))


def resolve_weight(node) -> tuple[fx.Node, bool] | None:
    """Follow transposes back to the stored tensor: (source node, transposed an odd number of times)."""
    flipped = False
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method"):
        if not _is_swap_of_last_two(node):
            return None
        node, flipped = node.args[0], not flipped
    if isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr"):
        return node, flipped
    return None


def _arg(node: fx.Node, i: int, name: str):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _fold_bias(mm: fx.Node, n_out: int, value_of) -> tuple[fx.Node, fx.Node | None]:
    """If ``mm``'s only user adds a 1-D parameter of size n_out, fold it in as the bias."""
    if len(mm.users) != 1:
        return mm, None
    (user,) = mm.users
    if not _is_call(user, ADD, ("add", "__add__")) or len(user.args) != 2 or user.kwargs:
        return mm, None
    other = user.args[1] if user.args[0] is mm else user.args[0]
    if isinstance(other, fx.Node) and other.op in ("placeholder", "get_attr"):
        t = value_of(other)
        if isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == n_out:
            return user, other
    return mm, None


def match_linear(node: fx.Node, value_of: Callable, root: torch.nn.Module) -> LinearMatch | None:
    if node.op == "call_module":
        mod = root.get_submodule(node.target)
        if type(mod) is torch.nn.Linear:
            return LinearMatch(node, node.args[0], node, False, None, "call_module",
                               weight_tensor=mod.weight)
        return None
    if _is_call(node, LINEAR):
        src = resolve_weight(_arg(node, 1, "weight"))
        if src is None:
            return None
        return LinearMatch(node, node.args[0], src[0], src[1], _arg(node, 2, "bias"), "linear")
    if _is_call(node, ADDMM, ("addmm",)):
        if any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")) or len(node.args) != 3:
            return None
        bias, x, w = node.args
        src = resolve_weight(w)
        if src is None or not isinstance(bias, fx.Node):
            return None
        return LinearMatch(node, x, src[0], not src[1], bias, "addmm")
    if _is_call(node, MATMUL, ("mm", "matmul", "__matmul__")) and len(node.args) == 2:
        x, w = node.args
        src = resolve_weight(w)
        if src is None:
            return None
        t = value_of(src[0])
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            return None
        stored_in_out = not src[1]
        n_out = t.shape[1] if stored_in_out else t.shape[0]
        out, bias = _fold_bias(node, n_out, value_of)
        kind = "mm" if _is_call(node, {torch.mm}, ("mm",)) else "matmul"
        return LinearMatch(out, x, src[0], stored_in_out, bias, kind + ("+add" if bias else ""))
    return None


MUTATING_METHODS = ("copy_", "add_", "mul_", "sub_", "div_", "zero_", "fill_", "set_", "__setitem__")


def is_mutated(node: fx.Node) -> bool:
    for user in node.users:
        name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
        if isinstance(name, str) and (name in MUTATING_METHODS or name.endswith("_") and not name.startswith("_")):
            return True
        if user.target is operator.setitem:
            return True
    return False


def readers_outside(source: fx.Node, consumers: set[fx.Node]) -> list[fx.Node]:
    """Nodes reading ``source`` (directly or through transposes) that are not matched linears."""
    outside, stack = [], list(source.users)
    while stack:
        user = stack.pop()
        if user in consumers:
            continue
        if user.op in ("call_function", "call_method") and _is_swap_of_last_two(user):
            stack.extend(user.users)
        else:
            outside.append(user)
    return outside


def input_tag(module: str) -> str:
    return re.sub(r"\W", "_", module)


FROZEN_REASON = ("weight requires grad and the graph is compiled with grad enabled (training): "
                 "compressing would freeze it and leave its .grad None - kept dense; for inference "
                 "compile under torch.no_grad()/inference_mode() or requires_grad_(False), or pass "
                 "frozen_weights=True to train adapters around frozen compressed weights")


def needs_grad(rw, w, consumers) -> bool:
    """True when autograd would compute a gradient for ``w`` through one of ``consumers``."""
    return (isinstance(w, torch.Tensor) and w.requires_grad
            and any(rw.grad_enabled(n) for n in consumers))


def skip_reason(w, encoding: EncodingConfig, compile_config: CompileConfig, outside: list[fx.Node],
                mutated: bool, trained: bool = False) -> str | None:
    """Why a matched weight stays dense, or None when it can be compressed. ``trained``: the
    weight receives a gradient in this graph (see :func:`needs_grad`)."""
    if not isinstance(w, torch.Tensor):
        return "weight value unknown at compile time"
    if not w.is_floating_point():
        return f"weight dtype {w.dtype} is not floating point"
    if w.dim() != 2:
        return f"weight is {w.dim()}-D, expected 2-D"
    if min(w.shape) < encoding.min_features:
        return f"weight {tuple(w.shape)} smaller than min_features={encoding.min_features}"
    if mutated:
        return "weight is mutated in the graph (compressing would freeze a stale copy)"
    if trained and not compile_config.frozen_weights:
        return FROZEN_REASON
    if outside and not encoding.compress_tied:
        names = sorted({n.name for n in outside})
        return (f"weight is also read by {names} (tied); compressing would keep a dense copy "
                "beside the codes - set compress_tied=True to compress it anyway")
    if not torch.isfinite(w).all():
        return "weight contains NaN/Inf values"
    return None


def reencoder(stored_in_out: bool, encoding: EncodingConfig) -> Callable:
    """Packed tensors of an edited weight (GraphRewrite.add_derived's ``rebuild``)."""
    return lambda ws: encode_parameter(ws[0], stored_in_out, encoding.format,
                                       encoding.curvatures).tensors()


def act_bits_kwargs(compile_config: CompileConfig) -> dict:
    """The op's ``act_bits`` keyword, left out at its default so graphs print as before."""
    return {"act_bits": compile_config.act_bits} if compile_config.act_bits else {}


def weight_owner(rw, node: fx.Node) -> str | None:
    """Module path owning the parameter behind ``node`` ("h.0.attn.qkv"), when dynamo says."""
    from rs_compile.report import _clean_path

    if node.op == "get_attr":
        path = node.target
    else:
        source = getattr(node.meta.get("grapharg"), "source", None)
        path = getattr(source, "name", None)
        path = path() if callable(path) else path
        if not isinstance(path, str):
            return None
        path = ("." + _clean_path(path)).replace("._modules.", ".")
    owner, sep, _ = path.rpartition("._parameters.")
    if not sep:
        owner = path.rpartition(".")[0]
    return owner.strip(".") or None


def rewrite_name(rw, m: LinearMatch) -> str:
    """The calling module, or the weight's own module when the caller is its parent: a Swin-style
    attention calling ``F.linear(x, self.qkv.weight)`` and ``F.linear(x, self.proj.weight)``
    reports ``attn.qkv`` and ``attn.proj`` rather than ``attn`` twice."""
    name = module_name(m.node)
    if m.pattern == "call_module":
        return name
    owner = weight_owner(rw, m.weight)
    if owner and (name.startswith("<") or owner.startswith(name + ".")):
        return owner
    return name


def compress_linears(rw, encoding: EncodingConfig, compile_config: CompileConfig,
                     report: Report) -> int:
    """Rewrite every matched linear of ``rw`` (a GraphRewrite); returns the number rewritten.

    A weight read by several calls (ALBERT's shared layers) is encoded once, its codes are one
    set of inputs shared by every call, and it is reported once (``calls`` counts the calls).
    """
    from rs_compile.ops.linear import linear  # noqa: F401  (registers rs::linear)

    graph = rw.gm.graph
    matches = [m for n in list(graph.nodes) if (m := match_linear(n, rw.value_of, rw.gm))]
    consumers_of: dict[fx.Node, set[fx.Node]] = {}
    for m in matches:
        consumers_of.setdefault(m.weight, set()).add(m.node)
        if m.pattern in ("mm+add", "matmul+add"):
            consumers_of[m.weight].update(m.node.all_input_nodes)
    # Matches are found up front, so a match's input may be an earlier match's node, replaced
    # and erased since (a linear feeding a linear: ALBERT's embedding projection into layer 0).
    replaced: dict[fx.Node, fx.Node] = {}

    def current(arg):
        while isinstance(arg, fx.Node) and arg in replaced:
            arg = replaced[arg]
        return arg

    encoded: dict[fx.Node, tuple] = {}
    count = 0
    for m in matches:
        name = rewrite_name(rw, m)
        if m.weight_tensor is None and not rw.is_parameter(m.weight):
            if m.weight not in encoded:  # reported once however many calls read it
                report.skip(name, "weight is a graph input, not a module parameter (would snapshot user data)")
                encoded[m.weight] = None
            continue
        w = m.weight_tensor if m.weight_tensor is not None else rw.value_of(m.weight)
        if m.weight not in encoded:
            outside = [] if m.pattern == "call_module" else readers_outside(m.weight, consumers_of[m.weight])
            reason = skip_reason(w, encoding, compile_config, outside,
                                 m.pattern != "call_module" and is_mutated(m.weight),
                                 needs_grad(rw, w, consumers_of[m.weight]))
            if reason:
                report.skip(name, reason)
                encoded[m.weight] = None
                continue
            enc = encode_parameter(w, m.stored_in_out, encoding.format, encoding.curvatures)
            nodes = tuple(rw.add_derived(  # re-encoded when the parameter is edited after compiling
                [f"{input_tag(name)}_{kind}" for kind in PACKED], enc.tensors(),
                [w if m.pattern == "call_module" else m.weight], reencoder(m.stored_in_out, encoding)))
            encoded[m.weight] = (enc, nodes, None)
        if encoded[m.weight] is None:
            continue
        enc, nodes, entry = encoded[m.weight]
        bias = current(m.bias)
        if m.pattern == "call_module" and rw.gm.get_submodule(m.node.target).bias is not None:
            bias = rw.add_input(input_tag(name) + "_bias", rw.gm.get_submodule(m.node.target).bias)
        with graph.inserting_before(m.node):
            new = graph.call_function(
                torch.ops.rs.linear.default,
                (current(m.x), *nodes, bias, enc.bits, enc.group_size, enc.in_features),
                act_bits_kwargs(compile_config),
            )
        new.meta.update({k: v for k, v in m.node.meta.items() if k != "example_value"})
        m.node.replace_all_uses_with(new)
        graph.erase_node(m.node)
        replaced[m.node] = new
        count += 1
        if entry is not None:
            entry.calls += 1
            continue
        entry = LinearRewrite(
            module=name, pattern=m.pattern, out_features=enc.out_features,
            in_features=enc.in_features, bits=enc.bits,
            dense_bytes=w.numel() * w.element_size(), compressed_bytes=enc.nbytes())
        report.linear_rewrites.append(entry)
        encoded[m.weight] = (enc, nodes, entry)
    return count
