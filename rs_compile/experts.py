"""Mixture-of-experts: transformers' 3-D expert tensors compressed, only the routed experts read.

transformers 5 keeps the experts of Mixtral, Qwen2/3-MoE, DeepSeek-V3 (and others built with
``@use_experts_implementation``) as one module holding two 3-D parameters,
``gate_up_proj [E, 2*I, H]`` and ``down_proj [E, H, I]`` (nn.Linear orientation per expert; with
``is_transposed`` the last two dims are swapped), called as
``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``; its
forward is one of an expert loop ("eager"), ``batched_mm`` (weights indexed per routed pair) or
``grouped_mm`` (the default: pairs sorted by expert), chosen by ``config._experts_implementation``.
All three compute, for each token ``t`` and slot ``j`` with expert ``e = top_k_index[t, j]``::

    gate, up = (x_t @ gate_up_proj[e].T).chunk(2)
    out_t += top_k_weights[t, j] * (act_fn(gate) * up) @ down_proj[e].T

:class:`CompressedExperts` computes the same from codes. Storage: each expert's ``[out, in]``
matrix is encoded on its own (rs_compile.codec.encode) and the experts are stacked on a leading
dim, so the packed buffers are ``<proj>_codes [E, out, ...]``, ``<proj>_groups [E, out, ngroups]``
and ``<proj>_row_scale [E, out]``: ``codes[e]`` is exactly what rs::linear takes for one expert.

The matmul is the custom op ``rs::expert_linear(x [S, K], expert_ids [S], codes, groups,
row_scale, ...) -> [S, N]`` (row ``s`` multiplied by expert ``expert_ids[s]``). Its CPU kernel
decodes only the experts that appear in ``expert_ids`` and multiplies each one's rows with
``torch.ops.rs.linear`` on that expert's slice of the codes (so a faster rs::linear kernel speeds
experts up too); a decode step of a top-k model reads k experts' codes per layer, not all E.
Under torch.compile the op is one node of the graph. Inductor decomposes decode-sized calls (a few
routed rows, static size) into one rs::linear per row on its expert's codes, picked by
``index_select`` (rs_compile.lowering.experts); larger calls (prefill) run the CPU kernel above as
a fallback kernel (``rs::expert_linear_grouped``). Autograd flows to ``x`` only
(``rs::expert_linear_backward``, also decoding only the experts present).

Which modules are replaced (:func:`find_experts`, called by convert): exactly the parameters
``gate_up_proj`` and ``down_proj`` of the shapes above, transformers' default gating
(``act_fn(gate) * up``, concatenated gate/up), no bias, no post-expert norm, no expert
parallelism; and, before swapping, the compressed module must give the original forward's output
(run on the decoded weights) on random routed tokens. Anything else holding a parameter of 3 or
more dims is listed in ``report.skipped``. rs_compile.save / load store CompressedExperts
(``meta()``: kind "experts"; :func:`experts_specs`, :func:`load_experts`).
"""

from __future__ import annotations

import torch
from torch import nn

from rs_compile.codec.encode import EncodedWeight, encode
from rs_compile.codec.format import Format, decode_weight
from rs_compile.config import CompileConfig, EncodingConfig
from rs_compile.ops.linear import check_packed, linear  # noqa: F401  (registers rs::linear)

PROJECTIONS = ("gate_up_proj", "down_proj")
PACKED = ("codes", "groups", "row_scale")
PROBE_TOKENS = 16  # tokens a candidate is checked on before it is swapped in


# --------------------------------------------------------------------------------------------
# the op


def _check_expert_inputs(x, expert_ids, codes, groups, row_scale, bits, group_size, in_features,
                         act_bits=0) -> None:
    from rs_compile.codec.activations import ACT_BITS

    if act_bits not in ACT_BITS:
        raise ValueError(f"rs::expert_linear: act_bits={act_bits!r} is not supported; valid values "
                         f"are {ACT_BITS} (0 keeps float activations)")
    if not x.is_floating_point() or x.dim() != 2:
        raise ValueError(f"rs::expert_linear: x must be a 2-D float tensor [S, in], got "
                         f"{tuple(x.shape)} {x.dtype}")
    if x.shape[-1] != in_features:
        raise ValueError(f"rs::expert_linear: x has {x.shape[-1]} features but the experts expect "
                         f"{in_features}")
    if expert_ids.dim() != 1 or expert_ids.shape[0] != x.shape[0] or expert_ids.is_floating_point():
        raise ValueError(f"rs::expert_linear: expert_ids must be an integer tensor [S={x.shape[0]}], "
                         f"got {tuple(expert_ids.shape)} {expert_ids.dtype}")
    if codes.dim() != 3 or groups.dim() != 3 or row_scale.dim() != 2:
        raise ValueError("rs::expert_linear: codes, groups and row_scale must be stacked per expert "
                         f"([E, out, ...]); got {tuple(codes.shape)}, {tuple(groups.shape)}, "
                         f"{tuple(row_scale.shape)}")
    if not codes.shape[0] == groups.shape[0] == row_scale.shape[0]:
        raise ValueError("rs::expert_linear: codes, groups and row_scale hold different numbers of "
                         f"experts ({codes.shape[0]}, {groups.shape[0]}, {row_scale.shape[0]})")
    check_packed(codes[0], groups[0], row_scale[0], bits, group_size, in_features)


SMALL_CALL_ROWS = 64  # routed rows up to which experts are grouped in Python (decode steps)


def _expert_rows(ids: torch.Tensor, n_experts: int) -> list[tuple[int, "slice | torch.Tensor"]]:
    """``[(expert, its rows)]`` for the experts present in ``ids``, rows as a slice where they are
    one contiguous run (always for a one-token decode step: its k rows have k distinct experts),
    else as an index tensor. ValueError for an id outside ``[0, n_experts)``."""
    if ids.shape[0] <= SMALL_CALL_ROWS:  # a decode step: a few ints, no sort, no device ops
        rows: dict[int, list[int]] = {}
        for i, e in enumerate(ids.tolist()):
            rows.setdefault(e, []).append(i)
        lo, hi = min(rows), max(rows)
    else:
        ids = ids.to(torch.long)
        lo, hi = (int(v) for v in ids.aminmax())
    if lo < 0 or hi >= n_experts:
        raise ValueError(f"rs::expert_linear: expert_ids range over [{lo}, {hi}] but there are "
                         f"{n_experts} experts")
    if ids.shape[0] <= SMALL_CALL_ROWS:
        return [(e, slice(r[0], r[-1] + 1) if r[-1] - r[0] + 1 == len(r) else torch.tensor(r))
                for e, r in rows.items()]
    order = torch.argsort(ids, stable=True)
    experts, counts = torch.unique_consecutive(ids[order], return_counts=True)
    return list(zip(experts.tolist(), order.split(counts.tolist())))


def expert_linear_into(out, x, expert_ids, codes, groups, row_scale, bits, group_size, in_features,
                       act_bits):
    """``out[s] = x[s] @ decode(expert expert_ids[s]).T`` into ``out [S, N]`` (inputs checked):
    each expert present multiplies its rows on ``codes[e]``, a view of the stacked buffers (no
    copy), on CPU straight through the rs::linear CPU kernel (no dispatcher: a decode step makes
    2k such calls per layer), elsewhere through ``rs::linear``."""
    if x.shape[0] == 0:
        return out
    from rs_compile.lowering.cpu_kernel import linear_cpu

    on_cpu = x.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous()
    for e, rows in _expert_rows(expert_ids, codes.shape[0]):
        packed = (codes[e], groups[e], row_scale[e], None, bits, group_size, in_features, act_bits)
        if on_cpu and isinstance(rows, slice):
            linear_cpu(x[rows], *packed, out=out[rows])
        elif on_cpu:
            out[rows] = linear_cpu(x[rows], *packed)
        else:
            out[rows] = torch.ops.rs.linear(x[rows], *packed).to(out.dtype)
    return out


def _grouped(x, expert_ids, codes, groups, row_scale, bits, group_size, in_features, act_bits):
    """The CPU kernel: rows grouped by expert, one rs::linear product per expert present."""
    _check_expert_inputs(x, expert_ids, codes, groups, row_scale, bits, group_size, in_features, act_bits)
    out = x.new_empty((x.shape[0], codes.shape[1]))
    return expert_linear_into(out, x, expert_ids, codes, groups, row_scale, bits, group_size,
                              in_features, act_bits)


@torch.library.custom_op("rs::expert_linear", mutates_args=())
def expert_linear(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    codes: torch.Tensor,
    groups: torch.Tensor,
    row_scale: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    act_bits: int = 0,
) -> torch.Tensor:
    """``y[s] = x[s] @ decode(expert expert_ids[s]).T``: ``x [S, in]`` -> ``[S, out]``.

    Decodes only the experts present in ``expert_ids``; each expert's rows go through one
    ``rs::linear`` call on its slice of the stacked codes. ``expert_ids`` must lie in ``[0, E)``.
    """
    return _grouped(x, expert_ids, codes, groups, row_scale, bits, group_size, in_features, act_bits)


@torch.library.custom_op("rs::expert_linear_grouped", mutates_args=())
def expert_linear_grouped(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    codes: torch.Tensor,
    groups: torch.Tensor,
    row_scale: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    act_bits: int = 0,
) -> torch.Tensor:
    """rs::expert_linear's CPU kernel as an op Inductor never decomposes: what the lowering of
    rs::expert_linear emits for prefill-sized calls (an op cannot be both decomposed and a
    fallback in Inductor)."""
    return _grouped(x, expert_ids, codes, groups, row_scale, bits, group_size, in_features, act_bits)


@expert_linear_grouped.register_fake
def _(x, expert_ids, codes, groups, row_scale, bits, group_size, in_features, act_bits=0):
    _check_expert_inputs(x, expert_ids, codes, groups, row_scale, bits, group_size, in_features, act_bits)
    return x.new_empty((x.shape[0], codes.shape[1]))


@expert_linear.register_fake
def _(x, expert_ids, codes, groups, row_scale, bits, group_size, in_features, act_bits=0):
    from rs_compile.lowering import install_lowerings  # imports this module

    install_lowerings()  # a graph holding the op is being traced: Inductor may compile it next
    _check_expert_inputs(x, expert_ids, codes, groups, row_scale, bits, group_size, in_features, act_bits)
    return x.new_empty((x.shape[0], codes.shape[1]))


def _setup_context(ctx, inputs, output):
    x, expert_ids, codes, groups, row_scale, bits, group_size, in_features = inputs[:8]
    ctx.save_for_backward(expert_ids, codes, groups, row_scale)
    ctx.meta = (bits, group_size, in_features)
    ctx.x_dtype = x.dtype


@torch.library.custom_op("rs::expert_linear_backward", mutates_args=())
def expert_linear_backward(
    grad: torch.Tensor,
    expert_ids: torch.Tensor,
    codes: torch.Tensor,
    groups: torch.Tensor,
    row_scale: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``grad_x[s] = grad[s] @ decode(expert expert_ids[s])``, decoding only the experts present.

    An op of its own so that the data-dependent grouping stays opaque when autograd is traced."""
    grad_x = grad.new_zeros((grad.shape[0], in_features))
    ids = expert_ids.to(torch.long)
    for e in torch.unique(ids).tolist():
        rows = (ids == e).nonzero().squeeze(1)
        w = decode_weight(codes[e], groups[e], row_scale[e], bits, group_size, in_features)
        grad_x[rows] = grad[rows] @ w.to(grad.dtype)
    return grad_x


@expert_linear_backward.register_fake
def _(grad, expert_ids, codes, groups, row_scale, bits, group_size, in_features):
    return grad.new_empty((grad.shape[0], in_features))


def _backward(ctx, grad):
    """Gradient to ``x`` only (the codes are frozen; straight through any activation rounding)."""
    expert_ids, codes, groups, row_scale = ctx.saved_tensors
    grad_x = expert_linear_backward(grad.contiguous(), expert_ids, codes, groups, row_scale, *ctx.meta)
    return grad_x.to(ctx.x_dtype), None, None, None, None, None, None, None, None


expert_linear.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# the module


class CompressedExperts(nn.Module):
    """Drop-in for a transformers experts module (forward ``(hidden_states [T, H], top_k_index
    [T, k], top_k_weights [T, k]) -> [T, H]``) whose expert matrices are held only as codes.

    Buffers ``gate_up_proj_{codes,groups,row_scale}`` and ``down_proj_{...}``, stacked per expert
    (module doc); ``act_fn`` is the original module's activation. No dense weight is kept.
    """

    def __init__(self, gate_up: list, down: list, act_fn, hidden_dim: int, intermediate_dim: int,
                 act_bits: int = 0):
        super().__init__()
        for proj, encs in (("gate_up_proj", gate_up), ("down_proj", down)):
            for i, name in enumerate(PACKED):
                self.register_buffer(f"{proj}_{name}", torch.stack([e.tensors()[i] for e in encs]))
        self.num_experts = len(gate_up)
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.bits = gate_up[0].bits
        self.group_size = gate_up[0].group_size
        self.act_bits = act_bits
        self.act_fn = act_fn

    def _project(self, x: torch.Tensor, ids: torch.Tensor, proj: str, in_features: int) -> torch.Tensor:
        buf = self._buffers  # plain dict reads: nn.Module.__getattr__ costs ~1 us per buffer
        args = (x, ids, buf[f"{proj}_codes"], buf[f"{proj}_groups"], buf[f"{proj}_row_scale"],
                self.bits, self.group_size, in_features, self.act_bits)
        if (not torch.compiler.is_compiling() and x.device.type == "cpu"
                and not (x.requires_grad and torch.is_grad_enabled())):
            # eager inference on CPU: the op's implementation without the dispatcher and custom-op
            # wrapper (tens of us per call; a decode step of a top-2 layer makes two)
            return _grouped(*args)
        return expert_linear(*args)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        tokens, k = top_k_index.shape
        ids = top_k_index.reshape(-1)
        x = hidden_states.unsqueeze(1).expand(tokens, k, self.hidden_dim).reshape(-1, self.hidden_dim)
        gate, up = self._project(x, ids, "gate_up_proj", self.hidden_dim).chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        y = self._project(h, ids, "down_proj", self.intermediate_dim)
        y = y * top_k_weights.reshape(-1, 1).to(y.dtype)
        return y.view(tokens, k, self.hidden_dim).sum(dim=1).to(hidden_states.dtype)

    def meta(self) -> dict:
        """What rs_compile.save records for the module (the packed buffers are saved as tensors)."""
        return dict(kind="experts", bits=self.bits, group_size=self.group_size,
                    num_experts=self.num_experts, hidden_dim=self.hidden_dim,
                    intermediate_dim=self.intermediate_dim, act_bits=self.act_bits)

    def packed_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return experts_specs(self.meta())

    @classmethod
    def from_packed(cls, meta: dict, packed: dict[str, torch.Tensor], act_fn) -> CompressedExperts:
        """The module ``meta`` and its packed buffers (named as :func:`experts_specs`) describe."""
        fmt = Format(meta["bits"], meta["group_size"])
        encs = {}
        for proj, k in (("gate_up_proj", meta["hidden_dim"]), ("down_proj", meta["intermediate_dim"])):
            encs[proj] = [EncodedWeight(*(packed[f"{proj}_{n}"][e] for n in PACKED), fmt, k)
                          for e in range(meta["num_experts"])]
        return cls(encs["gate_up_proj"], encs["down_proj"], act_fn, meta["hidden_dim"],
                   meta["intermediate_dim"], meta["act_bits"])

    def dequantize(self) -> dict[str, torch.Tensor]:
        """The dense float32 ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` the codes
        represent (nn.Linear orientation per expert, whatever the original stored)."""
        out = {}
        for proj, k in (("gate_up_proj", self.hidden_dim), ("down_proj", self.intermediate_dim)):
            c, g, r = (getattr(self, f"{proj}_{n}") for n in PACKED)
            out[proj] = torch.stack([decode_weight(c[e], g[e], r[e], self.bits, self.group_size, k)
                                     for e in range(self.num_experts)])
        return out

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, bits={self.bits}, "
                f"group_size={self.group_size}" + (f", act_bits={self.act_bits}" if self.act_bits else ""))


def experts_specs(meta: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Buffer name -> (shape, dtype) of a CompressedExperts described by ``meta``."""
    fmt = Format(meta["bits"], meta["group_size"])
    e, h, i = meta["num_experts"], meta["hidden_dim"], meta["intermediate_dim"]
    specs = {}
    for proj, (out, k) in (("gate_up_proj", (2 * i, h)), ("down_proj", (h, i))):
        for name, (shape, dtype) in fmt.packed_specs(out, k).items():
            specs[f"{proj}_{name}"] = ((e, *shape), dtype)
    return specs


def check_experts(where: str, name: str, meta, tensors) -> dict:
    """ValueError unless ``meta`` is a valid CompressedExperts record and ``tensors`` hold exactly
    its packed buffers; returns their specs."""
    from rs_compile.codec.activations import ACT_BITS

    keys = ("bits", "group_size", "num_experts", "hidden_dim", "intermediate_dim", "act_bits")
    if (not isinstance(meta, dict) or any(type(meta.get(k)) is not int for k in keys)
            or min(meta[k] for k in keys[2:5]) <= 0 or meta["act_bits"] not in ACT_BITS):
        raise ValueError(f"{where}: compressed experts {name!r} have invalid metadata {meta}")
    try:
        specs = experts_specs(meta)
    except ValueError as err:
        raise ValueError(f"{where}: compressed experts {name!r}: {err}") from None
    for key, (shape, dtype) in specs.items():
        t = tensors.get(f"{name}.{key}")
        if t is None:
            raise ValueError(f"{where}: tensor {name}.{key} of compressed experts {name!r} is missing")
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{where}: tensor {name}.{key} is {t.dtype} {list(t.shape)}, but "
                             f"experts {name!r} store {dtype} {list(shape)}")
    return specs


def load_experts(where: str, name: str, module: nn.Module | None, meta: dict,
                 tensors: dict[str, torch.Tensor]) -> CompressedExperts:
    """rs_compile.load's builder for a saved CompressedExperts: checks the file's metadata and
    tensors and the model's experts module at ``name`` (ValueError naming what is wrong)."""
    specs = check_experts(where, name, meta, tensors)
    reason = "no such module" if module is None else layout_reason(module, check_device=False)
    if reason is None:
        gu, _ = _oriented(module)
        want = (meta["num_experts"], 2 * meta["intermediate_dim"], meta["hidden_dim"])
        if tuple(gu.shape) != want:
            reason = f"its gate_up_proj is {list(gu.shape)} (nn.Linear orientation), the file's {list(want)}"
    if reason:
        raise ValueError(f"{where} compresses experts {name!r} but the model's module there does not "
                         f"fit ({reason}): load into a freshly built, unconverted model of the same "
                         "architecture")
    layer = CompressedExperts.from_packed(meta, {k: tensors[f"{name}.{k}"] for k in specs}, module.act_fn)
    if layer.meta() != meta:
        raise ValueError(f"{where}: compressed experts {name!r} have metadata {meta}, which this "
                         f"rs_compile does not write (it writes {layer.meta()})")
    return layer


# --------------------------------------------------------------------------------------------
# recognition (used by convert)


def _default_gate():
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return None
    return _default_apply_gate


def layout_reason(module: nn.Module, check_device: bool = True) -> str | None:
    """Why ``module`` (which holds a 3-D parameter) is not an experts layout CompressedExperts can
    stand in for, or None when it looks like one (the probe in :func:`compress_experts` decides)."""
    params = dict(module.named_parameters(recurse=False))
    names = sorted(params)
    if names != sorted(PROJECTIONS):
        return (f"{type(module).__qualname__} holds 3-D parameters {names}; only the experts layout "
                f"{list(PROJECTIONS)} (transformers' gated experts) is understood")
    flags = {"has_gate": True, "has_bias": False, "has_post_expert_norm": False,
             "is_concatenated": True, "_is_expert_parallel": False}
    odd = {k: getattr(module, k) for k, want in flags.items() if getattr(module, k, want) != want}
    if odd:
        return f"{type(module).__qualname__} has unsupported experts options {odd}"
    gate = getattr(type(module), "_apply_gate", None)
    if gate is not None and gate is not _default_gate():
        return f"{type(module).__qualname__} has its own _apply_gate (gating other than act(gate) * up)"
    if not callable(getattr(module, "act_fn", None)):
        return f"{type(module).__qualname__} has no act_fn"
    gu, down = params["gate_up_proj"], params["down_proj"]
    if gu.dim() != 3 or down.dim() != 3 or gu.shape[0] != down.shape[0]:
        return f"gate_up_proj {tuple(gu.shape)} / down_proj {tuple(down.shape)} are not stacked experts"
    gu, down = _oriented(module)
    e, two_i, h = gu.shape
    if two_i % 2 or tuple(down.shape) != (e, h, two_i // 2):
        return (f"gate_up_proj {tuple(params['gate_up_proj'].shape)} and down_proj "
                f"{tuple(params['down_proj'].shape)} do not fit [E, 2I, H] / [E, H, I]"
                + (" (transposed)" if getattr(module, "is_transposed", False) else ""))
    for p in (gu, down):
        if check_device and p.device.type == "meta":
            return "expert weights are on the meta device (load real weights first)"
        if not p.is_floating_point():
            return f"expert weight dtype {p.dtype} is not floating point"
    return None


def _oriented(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate_up [E, 2I, H], down [E, H, I])`` in nn.Linear orientation (views)."""
    gu, down = module.gate_up_proj, module.down_proj
    if getattr(module, "is_transposed", False):
        return gu.transpose(1, 2), down.transpose(1, 2)
    return gu, down


def _probe_mismatch(module: nn.Module, compressed: CompressedExperts) -> str | None:
    """Why ``compressed`` cannot stand in for ``module``: on random routed tokens it must give the
    original forward's output computed with the decoded expert weights."""
    e, h = compressed.num_experts, compressed.hidden_dim
    dev = module.gate_up_proj.device
    k = min(2, e)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_TOKENS, h, generator=gen).to(dev)  # float32 whatever the model's dtype:
    # the probe checks what the forward computes, not the rounding of a half-precision run
    index = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(PROBE_TOKENS)]).to(dev)
    weights = torch.rand(PROBE_TOKENS, k, generator=gen).to(dev)
    dense = compressed.dequantize()
    reference = type(module).__new__(type(module))
    reference.__dict__.update(module.__dict__)
    params = {}
    for proj in PROJECTIONS:
        w = dense[proj]
        if getattr(module, "is_transposed", False):
            w = w.transpose(1, 2).contiguous()
        params[proj] = nn.Parameter(w, requires_grad=False)
    reference._parameters = {**module._parameters, **params}
    try:
        with torch.no_grad():
            got, expected = compressed(x, index, weights), reference(x, index, weights)
    except Exception as err:  # noqa: BLE001  (any failure means the forward is not the standard one)
        return (f"{type(module).__qualname__}.forward fails on the probe ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:120] if str(err) else ''}); not the standard experts forward")
    if got.shape != expected.shape or not torch.allclose(got.float(), expected.float(), rtol=1e-4, atol=1e-5):
        diff = (got.float() - expected.float()).abs().max().item() if got.shape == expected.shape else None
        return (f"{type(module).__qualname__}.forward computes something else than the standard experts "
                f"forward (probe max |diff| = {diff}); left dense")
    return None


def compress_experts(module: nn.Module, fmt: Format, curvatures: int | None = None,
                     act_bits: int = 0) -> tuple[CompressedExperts | None, str | None]:
    """``(CompressedExperts, None)`` standing in for ``module``, or ``(None, reason)``."""
    reason = layout_reason(module)
    if reason:
        return None, reason
    gu, down = _oriented(module)
    e, two_i, h = gu.shape
    lo, hi = torch.stack([gu.detach().aminmax()[0], gu.detach().aminmax()[1],
                          down.detach().aminmax()[0], down.detach().aminmax()[1]]).float().aminmax()
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        raise ValueError(f"{type(module).__qualname__} has NaN/Inf expert weights; rs_compile cannot "
                         "encode them. The model was left unchanged.")
    gate_up = [encode(gu[i].detach(), fmt, curvatures=curvatures) for i in range(e)]
    downs = [encode(down[i].detach(), fmt, curvatures=curvatures) for i in range(e)]
    compressed = CompressedExperts(gate_up, downs, module.act_fn, h, two_i // 2, act_bits).to(gu.device)
    reason = _probe_mismatch(module, compressed)
    if reason:
        return None, reason
    return compressed, None


def find_experts(model: nn.Module, encoding: EncodingConfig, compile_config: CompileConfig, report,
                 progress: bool = False) -> dict[str, nn.Module]:
    """Convert's hook: a CompressedExperts per recognised experts module of ``model`` (built, not
    swapped in), each reported as two rewrites of pattern ``experts``; every other module holding
    a parameter of 3 or more dims is reported as skipped with the reason."""
    from tqdm.auto import tqdm

    from rs_compile.report import LinearRewrite

    candidates = [(n, m) for n, m in model.named_modules()
                  if not isinstance(m, CompressedExperts)
                  and any(p.dim() >= 3 for p in m.parameters(recurse=False))]
    new: dict[str, nn.Module] = {}
    for name, module in tqdm(candidates, desc="rs_compile experts", disable=not progress):
        params = dict(module.named_parameters(recurse=False))
        if sorted(params) == sorted(PROJECTIONS):
            gu, down = _oriented(module) if layout_reason(module) is None else (None, None)
            small = gu is not None and min(*gu.shape[1:], *down.shape[1:]) < encoding.min_features
            if small:
                reason = (f"expert matrices {tuple(gu.shape[1:])} / {tuple(down.shape[1:])} smaller "
                          f"than min_features={encoding.min_features}")
                compressed = None
            else:
                compressed, reason = compress_experts(module, encoding.format, encoding.curvatures,
                                                      compile_config.act_bits)
        else:
            big = [f"{n} {tuple(p.shape)}" for n, p in params.items() if p.dim() >= 3]
            compressed, reason = None, (f"{type(module).__qualname__} holds {', '.join(big)}: not an "
                                        "experts layout rs_compile understands; left dense")
        if compressed is None:
            report.skip(name, reason)
            continue
        new[name] = compressed
        for proj in PROJECTIONS:
            p = params[proj]
            codes = getattr(compressed, f"{proj}_codes")
            nbytes = sum(getattr(compressed, f"{proj}_{n}").nbytes for n in PACKED)
            report.linear_rewrites.append(LinearRewrite(
                module=f"{name}.{proj}", pattern="experts", out_features=codes.shape[0] * codes.shape[1],
                in_features=compressed.hidden_dim if proj == "gate_up_proj" else compressed.intermediate_dim,
                bits=compressed.bits, dense_bytes=p.numel() * p.element_size(), compressed_bytes=nbytes))
    return new
