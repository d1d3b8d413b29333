"""Find attention in a dynamo FX graph and rewrite it into ``rs::attention``.

Matched forms (the dynamo-level graph: call_function and call_method spellings are folded
together, so the matchers survive the dynamic-shape recompile, unlike aten-level patterns):

  sdpa   scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=0, is_causal, scale, enable_gqa)
  eager  matmul(q, k.transpose(-1, -2) | k.transpose(2, 3) | k.permute(0, 1, 3, 2))
           [* c | / c]... [+ mask] [masked_fill(cond, c) | where(cond, s, c)]...
           -> softmax(dim=-1) [-> .to/.type/.float(dtype)] [-> dropout(p=0 or training=False)]
           -> matmul(., v)

Scales are constants multiplied in before the mask (1.0 when absent). Masks are summed into one
additive mask: masked_fill/where on the scores become ``where(cond, c, 0)``, SDPA's bool mask is
passed as is. SDPA's ``is_causal`` is top-left aligned and rs::attention's bottom-right; they agree
when T == S is provable, otherwise the top-left rule is passed as a ``[T, S]`` bool mask.

A mask that is nothing but a causal rule built from indices, as transformers builds it
(``kv_idx <= q_idx`` on ``arange`` positions, expanded, then ``where(cond, 0, finfo.min)`` for
eager attention or passed as SDPA's bool mask), becomes ``causal=True`` with no mask: the kernels
then skip the blocks above the diagonal and no ``[T, S]`` mask is built or read. That is exact
only when no row is fully masked (S >= T) and the masked value underflows the softmax to 0
(-inf, or at most the dtype's most negative finite value); otherwise the mask is kept.

k and v may come through repeat_kv (``x[:, :, None].expand(...).reshape(...)``) or
``repeat_interleave(n, dim=1)``; both are stripped because the op does grouped-query attention
itself. A candidate that looks like attention but cannot be rewritten exactly is left alone and
recorded in ``report.skipped`` with the reason (a near miss), never approximated.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from rs_compile.config import CompileConfig, EncodingConfig
from rs_compile.report import AttentionRewrite, Report, module_name

SDPA = torch._C._nn.scaled_dot_product_attention  # F.scaled_dot_product_attention is this object

_FUNCTIONS = {
    SDPA: "sdpa",
    torch.matmul: "matmul", operator.matmul: "matmul",
    torch.transpose: "transpose", torch.permute: "permute",
    F.softmax: "softmax", torch.softmax: "softmax",
    F.dropout: "dropout", torch.dropout: "dropout",
    operator.mul: "mul", torch.mul: "mul",
    operator.truediv: "div", torch.div: "div",
    operator.add: "add", torch.add: "add",
    torch.where: "where", torch.masked_fill: "masked_fill",
    torch.repeat_interleave: "repeat_interleave",
    torch.reshape: "reshape", torch.unsqueeze: "unsqueeze",
    operator.getitem: "getitem",
    torch.arange: "arange", torch.zeros: "zeros",
    operator.le: "le", torch.le: "le", operator.ge: "ge", torch.ge: "ge",
}
_METHODS = {"__matmul__": "matmul", "__mul__": "mul", "__rmul__": "mul", "__truediv__": "div",
            "__add__": "add", "__radd__": "add", "view": "reshape", "__le__": "le", "__ge__": "ge"}
_CASTS = {"float", "double", "half", "bfloat16"}


class NearMiss(Exception):
    """An attention candidate that cannot be rewritten exactly; the message is the reason."""


def op_name(node) -> str | None:
    """Canonical name of a call node, the same for ``torch.f(x)``, ``F.f(x)`` and ``x.f()``."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _METHODS.get(node.target, node.target)
    return None


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _val(node):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def _same(a, b) -> bool:
    """Sizes equal without adding a guard (symbolic sizes must be provably equal)."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def is_float_cast(node) -> bool:
    """``x.float()``, ``x.to(dtype)``, ``x.type(dtype)``, ``x.type_as(y)`` to a floating dtype.

    Such casts around the softmax only change its precision; rs::attention computes in q's dtype
    (float32 for float16/bfloat16), so they are dropped (as is softmax's ``dtype=`` argument).
    """
    if not isinstance(node, fx.Node) or node.op != "call_method":
        return False
    if node.target in _CASTS:
        return len(node.args) == 1 and not node.kwargs
    if node.target == "type_as":
        return getattr(_val(node.args[1]), "is_floating_point", lambda: False)()
    if node.target not in ("to", "type"):
        return False
    dtypes = [*node.args[1:], *node.kwargs.values()]
    return (len(dtypes) == 1 and set(node.kwargs) <= {"dtype"}
            and isinstance(dtypes[0], torch.dtype) and dtypes[0].is_floating_point)


def swapped_last_two(node) -> fx.Node | None:
    """The tensor whose last two dims ``node`` swaps (transpose(-1, -2), (2, 3), permute), or None."""
    name = op_name(node)
    if name not in ("transpose", "permute"):
        return None
    src, ndim = node.args[0], getattr(_val(node.args[0]), "ndim", None)
    if ndim is None or ndim < 2:
        return None
    if name == "transpose":
        dims = [_arg(node, 1, "dim0"), _arg(node, 2, "dim1")]
    else:
        dims = list(node.args[1:]) or list(node.kwargs.get("dims", ()))
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = list(dims[0])
    if not all(isinstance(d, int) for d in dims):
        return None
    dims = [d % ndim for d in dims]
    if name == "transpose":
        return src if sorted(dims) == [ndim - 2, ndim - 1] else None
    return src if dims == [*range(ndim - 2), ndim - 1, ndim - 2] else None


def _full_slices(index, none_at: int) -> bool:
    """``x[:, :, None, :, :]`` / ``x[:, :, None]`` / ``x[:, :, None, ...]``."""
    if not isinstance(index, tuple) or len(index) <= none_at or index[none_at] is not None:
        return False
    rest = [i for k, i in enumerate(index) if k != none_at]
    return all(i == slice(None) or i is Ellipsis for i in rest)


def strip_repeat_kv(node: fx.Node) -> fx.Node:
    """The kv-head tensor behind repeat_kv / repeat_interleave(dim=1); ``node`` itself otherwise.

    Both repeat head ``j`` into heads ``j * n .. j * n + n - 1``: query head ``h`` reads kv head
    ``h // n``, which is the op's grouped-query order.
    """
    name = op_name(node)
    if name == "repeat_interleave":
        src, dim, out = node.args[0], _arg(node, 2, "dim"), _val(node)
        if isinstance(_arg(node, 1, "repeats"), int) and out is not None and isinstance(dim, int) \
                and out.ndim == 4 and dim % 4 == 1:
            return src
        return node
    if name != "reshape" or op_name(node.args[0]) != "expand":
        return node
    expand = node.args[0]
    unsq = expand.args[0]
    unsqueezed = (op_name(unsq) == "getitem" and _full_slices(unsq.args[1], 2)
                  or op_name(unsq) == "unsqueeze" and _arg(unsq, 1, "dim") == 2)
    if not unsqueezed:
        return node
    src = unsq.args[0]
    x, e, out = _val(src), _val(expand), _val(node)
    if x is None or e is None or out is None or x.ndim != 4 or e.ndim != 5:
        return node
    b, hkv, s, d = x.shape
    if _same(e.shape, (b, hkv, e.shape[2], s, d)) and _same(out.shape, (b, hkv * e.shape[2], s, d)):
        return src
    return node


@dataclasses.dataclass
class AttentionMatch:
    output: fx.Node  # its value equals the attention output [B, H, T, D]; replaced by the op
    q: fx.Node
    k: fx.Node  # kv heads (repeat_kv stripped)
    v: fx.Node
    # Mask terms, summed: a mask node (additive, or SDPA's bool); ("fill" | "keep", cond, value)
    # for masked_fill / where on the scores; ("top_left", q, k) for SDPA's causal rule when T != S.
    masks: list
    causal: bool
    scale: float
    pattern: str  # sdpa | eager


def _number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _default_scale(q: fx.Node) -> float:
    d = _val(q).shape[-1]
    if not isinstance(d, int):
        raise NearMiss("head_dim is symbolic, so the default scale 1/sqrt(head_dim) is unknown")
    return 1.0 / math.sqrt(d)


def match_sdpa(node: fx.Node) -> AttentionMatch:
    q, k, v = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    if _val(q) is None or _val(k) is None:
        raise NearMiss("q/k shapes unknown at compile time")
    mask = _arg(node, 3, "attn_mask")
    dropout_p = _arg(node, 4, "dropout_p", 0.0)
    causal = _arg(node, 5, "is_causal", False)
    scale = _arg(node, 6, "scale")
    if not (_number(dropout_p) and dropout_p == 0):
        raise NearMiss(f"dropout_p={dropout_p} (rs::attention has no dropout)")
    if not isinstance(causal, bool):
        raise NearMiss(f"is_causal is {causal!r}, not a constant bool")
    if scale is not None and not _number(scale):
        raise NearMiss(f"scale {scale!r} is not a constant")
    scale = _default_scale(q) if scale is None else float(scale)
    masks = [] if mask is None else [mask]
    if causal and not statically_known_true(_val(q).shape[-2] == _val(k).shape[-2]):
        # SDPA aligns is_causal top-left, rs::attention bottom-right: equal only when T == S
        masks, causal = [("top_left", q, k)], False
    return AttentionMatch(node, q, strip_repeat_kv(k), strip_repeat_kv(v), masks, causal, scale,
                          "sdpa")


def _check_dropout(node: fx.Node) -> None:
    """NearMiss unless the dropout is the identity (p == 0 or not training)."""
    if node.target is torch.dropout:
        p, training = _arg(node, 1, "p"), _arg(node, 2, "train")
    else:
        p, training = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", True)
    if not _number(p) or not isinstance(training, bool):
        raise NearMiss(f"dropout p={p!r}, training={training!r} not constant")
    if p != 0 and training:
        raise NearMiss(f"dropout p={p} in training")


def _readers(node: fx.Node) -> list[fx.Node]:
    """Users of ``node``'s values (``y.type_as(node)`` reads only its dtype)."""
    return [u for u in node.users
            if not (u.op == "call_method" and u.target == "type_as" and u.args[0] is not node)]


def _only_user(node: fx.Node, role: str) -> fx.Node:
    """The single reader of ``node``; a NearMiss naming the extra readers when there are several."""
    users = _readers(node)
    if len(users) == 1:
        return users[0]
    if any(u.op == "output" for u in users):
        raise NearMiss(f"attention {role} are returned to the caller (output_attentions)")
    raise NearMiss(f"attention {role} are also read by {sorted(u.name for u in users)}")


def _probs_to_pv(softmax: fx.Node) -> fx.Node | None:
    """Follow softmax -> casts -> dropouts to ``matmul(probs, v)``; None if it goes elsewhere."""
    node = softmax
    while True:
        users = _readers(node)
        step = next((u for u in users if is_float_cast(u) or op_name(u) == "dropout"
                     or op_name(u) == "matmul" and u.args[0] is node), None)
        if step is None:
            return None
        if len(users) > 1:
            _only_user(node, "weights")
        if op_name(step) == "matmul":
            return step
        if op_name(step) == "dropout":
            _check_dropout(step)
        node = step


_SCORE_OPS = {"matmul", "mul", "div", "add", "where", "masked_fill"}


def _find_qk(start: fx.Node, limit: int = 8) -> fx.Node:
    """The ``matmul(q, k^T)`` among the few score ops feeding the softmax."""
    frontier, seen = [start], set()
    while frontier and len(seen) < limit:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if op_name(node) == "matmul" and swapped_last_two(node.args[1]) is not None:
            return node
        if op_name(node) in _SCORE_OPS or is_float_cast(node):
            frontier.extend(node.all_input_nodes)
    raise NearMiss("no matmul(q, k.transpose(-1, -2)) found before the softmax")


def _walk_scores(qk: fx.Node, softmax: fx.Node) -> tuple[float, list]:
    """Scale and additive mask terms of the ops between ``q @ k^T`` and the softmax."""
    scale, masks, node = 1.0, [], qk
    while node is not softmax.args[0]:
        user = _only_user(node, "scores")
        name = op_name(user)
        other = [a for a in (*user.args, *user.kwargs.values()) if a is not node]
        if is_float_cast(user):
            pass
        elif name in ("mul", "div") and len(other) == 1 and _number(other[0]) and not user.kwargs:
            if masks:
                raise NearMiss("scores are scaled after the mask is added")
            if name == "div" and user.args[0] is not node:
                raise NearMiss("scores divide a constant")
            scale *= other[0] if name == "mul" else 1.0 / other[0]
        elif name == "add" and len(other) == 1 and not user.kwargs and isinstance(other[0], fx.Node):
            if getattr(_val(other[0]), "dtype", None) == torch.bool:
                raise NearMiss("a bool tensor is added to the scores (adds 1.0, it is no mask)")
            masks.append(other[0])
        elif name == "masked_fill" and len(user.args) == 3 and user.args[0] is node:
            masks.append(("fill", user.args[1], user.args[2]))
        elif name == "where" and len(user.args) == 3 and user.args[0] is not node:
            cond, a, b = user.args
            masks.append(("fill", cond, a) if b is node else ("keep", cond, b))
        else:
            raise NearMiss(f"unsupported op {user.format_node()} between q @ k^T and softmax")
        node = user
    for term in masks:
        if isinstance(term, tuple) and not (_number(term[2]) or getattr(_val(term[2]), "ndim", 1) == 0):
            raise NearMiss(f"masked value {term[2]} is not a scalar")
    return scale, masks


def _is_bmm(node, *names: str) -> bool:
    """``torch.bmm(a, b)`` / ``a.bmm(b)`` (and the like for the other ``names``)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return any(node.target is getattr(torch, n) for n in names)
    return node.op == "call_method" and node.target in names


_RESHAPES = {"reshape", "contiguous", "view_as", "flatten", "unflatten"}


def _batched_heads_reason(softmax: fx.Node) -> str | None:
    """Why an attention computed with ``bmm`` on ``[batch * heads, T, *]`` views is not matched
    (Bloom, DeBERTa-v2), or None when the softmax does not feed ``bmm(probs, v)``.

    rs::attention takes 4-D [B, H, T, D] attention whose scores are ``q @ k^T`` (scaled) plus an
    additive mask; these compute the scores with extra terms the matcher does not take apart.
    """
    node, steps = softmax, 0
    while steps < 6:
        users = _readers(node)
        pv = next((u for u in users if _is_bmm(u, "bmm") and u.args[0] is node), None)
        if pv is not None:
            break
        step = next((u for u in users if is_float_cast(u) or op_name(u) in ("dropout", *_RESHAPES)), None)
        if step is None:
            return None
        node, steps = step, steps + 1
    else:
        return None
    # What produced the scores: a few ops back from the softmax.
    frontier, seen, baddbmm, products = [softmax.args[0]], set(), False, 0
    while frontier and len(seen) < 48:  # breadth first; stops at the products
        cur = frontier.pop(0)
        if not isinstance(cur, fx.Node) or cur in seen:
            continue
        seen.add(cur)
        if _is_bmm(cur, "baddbmm"):
            baddbmm = True
        elif _is_bmm(cur, "bmm", "matmul") or op_name(cur) == "matmul":
            products += 1
        elif cur.op in ("call_function", "call_method"):
            frontier.extend(cur.all_input_nodes)
    parts = ["probabilities @ v is torch.bmm on [batch * heads, T, S] views, not matmul / "
             "SDPA on [B, H, T, D]"]
    if baddbmm:
        parts.append("the scores are baddbmm(bias, q, k^T) (ALiBi: a per-head position bias "
                     "folded into the product)")
    elif products > 1:
        parts.append(f"the scores add {products - 1} more product(s) to q @ k^T (relative-position "
                     "terms such as DeBERTa's c2p/p2c)")
    return "; ".join(parts) + "; this form is not matched (left dense, exact)"


def match_eager(softmax: fx.Node) -> AttentionMatch | None:
    """None when ``softmax`` is not followed by ``matmul(., v)`` (not attention at all); a
    NearMiss when it is attention in a form the matcher does not take (``bmm`` on 3-D views)."""
    pv = _probs_to_pv(softmax)
    if pv is None:
        reason = _batched_heads_reason(softmax)
        if reason:
            raise NearMiss(reason)
        return None
    x = softmax.args[0]
    ndim = getattr(_val(x), "ndim", None)
    if ndim is None:
        raise NearMiss("score shape unknown at compile time")
    dim = _arg(softmax, 1, "dim")
    if not isinstance(dim, int) or dim % ndim != ndim - 1:
        raise NearMiss(f"softmax over dim {dim}, not the last dim")
    qk = _find_qk(x)
    scale, masks = _walk_scores(qk, softmax)
    k = strip_repeat_kv(swapped_last_two(qk.args[1]))
    return AttentionMatch(pv, qk.args[0], k, strip_repeat_kv(pv.args[1]), masks, False, scale,
                          "eager")


def _mask_node(graph: fx.Graph, term) -> fx.Node:
    """masked_fill(s, cond, c) -> where(cond, c, 0); where(cond, s, c) -> where(cond, 0, c)."""
    if not isinstance(term, tuple):
        return term
    kind, a, b = term
    if kind == "top_left":  # key j visible to query i iff j <= i
        t, s = (graph.call_method("size", (x, -2)) for x in (a, b))
        ones = graph.call_function(torch.ones, (t, s), {"dtype": torch.bool, "device": _val(a).device})
        return graph.call_method("tril", (ones,))
    return graph.call_function(torch.where, (a, b, 0.0) if kind == "fill" else (a, 0.0, b))


def _build_mask(graph: fx.Graph, masks: list) -> fx.Node | None:
    """The sum of the mask terms as one node (None without terms)."""
    total = None
    for term in masks:
        node = _mask_node(graph, term)
        total = node if total is None else graph.call_function(operator.add, (total, node))
    return total


def _int(x):
    """An int or SymInt argument (a graph node's example value), else None."""
    x = _val(x) if isinstance(x, fx.Node) else x
    return x if isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool) else None


def _positions(node) -> tuple[int, object, object] | None:
    """``(axis, length, first)`` of an index tensor ``(arange(n) [+ offset])[None, .., :, ..]``:
    values ``first + i`` along ``axis`` (negative, from the end), every other dim of size 1."""
    if op_name(node) != "getitem" or not isinstance(node.args[1], tuple):
        return None
    index = node.args[1]
    full = [i for i, x in enumerate(index) if x == slice(None)]
    if len(full) != 1 or sum(x is None for x in index) != len(index) - 1:
        return None
    src, offset = node.args[0], 0
    if op_name(src) == "add" and len(src.args) == 2 and not src.kwargs:
        a, b = src.args
        src, offset = (a, _int(b)) if op_name(a) == "arange" else (b, _int(a))
    if op_name(src) != "arange" or offset is None or _val(src) is None:
        return None
    if len(src.args) == 1:
        start = 0
    elif len(src.args) == 2 or len(src.args) == 3 and src.args[2] == 1:
        start = _int(src.args[0])
    else:
        return None
    if start is None or set(src.kwargs) - {"device", "dtype"}:
        return None
    return full[0] - len(index), _val(src).shape[0], start + offset


def _is_causal_rule(cond, t, s) -> bool:
    """``cond`` (through expands) is ``kv_idx <= q_idx`` with rs::attention's bottom-right
    alignment for these T and S, and no query row is left without a key."""
    while op_name(cond) == "expand":
        cond = cond.args[0]
    name = op_name(cond)
    if name not in ("le", "ge") or len(cond.args) != 2 or cond.kwargs:
        return False
    kv, q = cond.args if name == "le" else reversed(cond.args)
    kv, q = _positions(kv), _positions(q)
    if kv is None or q is None or kv[0] != -1 or q[0] != -2:
        return False
    # key j visible to query i iff j + kv_first <= i + q_first; the op's rule is j <= i + (S - T)
    return all(statically_known_true(c) for c in (
        kv[1] == s, q[1] == t, q[2] - kv[2] == s - t, s >= t))


def _underflows(value, dtype: torch.dtype) -> bool:
    return _number(value) and (value == float("-inf") or value <= torch.finfo(dtype).min)


def _fold_causal(m: AttentionMatch) -> None:
    """A sole mask that is only the causal rule becomes ``causal=True`` (see the module docstring)."""
    if m.causal or len(m.masks) != 1 or isinstance(m.masks[0], tuple):
        return
    mask, q, k = m.masks[0], _val(m.q), _val(m.k)
    if getattr(_val(mask), "dtype", None) == torch.bool:
        cond = mask
    elif (op_name(mask) == "where" and len(mask.args) == 3 and not mask.kwargs
          and (mask.args[1] == 0 or op_name(mask.args[1]) == "zeros")
          and _underflows(mask.args[2], q.dtype)):
        cond = mask.args[0]
    else:
        return
    if _is_causal_rule(cond, q.shape[-2], k.shape[-2]):
        m.masks, m.causal = [], True


def check(m: AttentionMatch) -> None:
    """NearMiss unless rs::attention can run the matched inputs."""
    from rs_compile.ops.attention import attention_supported

    q, k, v = _val(m.q), _val(m.k), _val(m.v)
    if q is None or k is None or v is None:
        raise NearMiss("q/k/v shapes unknown at compile time")
    values = [_val(t[1]) if isinstance(t, tuple) else _val(t)
              for t in m.masks if not (isinstance(t, tuple) and t[0] == "top_left")]
    if any(x is None for x in values):
        raise NearMiss("mask shape unknown at compile time")
    for value in values or [None]:
        reason = attention_supported(q, k, v, value)
        if reason:
            raise NearMiss(reason)


def _detail(m: AttentionMatch) -> str:
    q, k = _val(m.q), _val(m.k)
    parts = [f"heads {q.shape[1]}/{k.shape[1]}", f"head_dim {q.shape[-1]}", f"scale {m.scale:.4g}"]
    if m.causal or any(isinstance(t, tuple) and t[0] == "top_left" for t in m.masks):
        parts.append("causal")
    if m.masks:
        parts.append("mask")
    return ", ".join(parts)


def find_attention(graph: fx.Graph, report: Report) -> list[AttentionMatch]:
    """Every rewritable attention; near misses go to ``report.skipped``."""
    matches = []
    for node in graph.nodes:
        name = op_name(node)
        if name not in ("sdpa", "softmax"):
            continue
        try:
            m = match_sdpa(node) if name == "sdpa" else match_eager(node)
            if m is not None:
                check(m)
                _fold_causal(m)
                matches.append(m)
        except NearMiss as miss:
            report.skip(module_name(node), f"attention not rewritten: {miss}")
        except Exception as error:  # a matcher bug must cost the rewrite, not the compile
            report.skip(module_name(node), f"attention not rewritten: matcher error {error!r}")
    return matches


def rewrite_attention(rw, encoding: EncodingConfig, compile_config: CompileConfig,
                      report: Report) -> int:
    """Rewrite every matched attention of ``rw`` (a GraphRewrite) into ``rs::attention`` (no
    weight is encoded: ``encoding`` is there for the passes' common signature)."""
    if not compile_config.attention:
        return 0
    import rs_compile.ops.attention  # noqa: F401  (registers rs::attention)

    graph = rw.gm.graph
    matches = find_attention(graph, report)
    for m in matches:
        with graph.inserting_before(m.output):
            mask = _build_mask(graph, m.masks)
            new = graph.call_function(torch.ops.rs.attention.default,
                                      (m.q, m.k, m.v, mask, m.causal, m.scale))
        new.meta.update({k: v for k, v in m.output.meta.items() if k != "example_value"})
        m.output.replace_all_uses_with(new)
        report.attention_rewrites.append(
            AttentionRewrite(module_name(m.output), m.pattern, _detail(m)))
    return len(matches)
