"""Inductor decomposition of ``rs::poincare_linear`` into fusable tensor arithmetic.

* Few rows (decoding, ``M <= GEMV_MAX_ROWS``): unpack + closed-form decode + dot product become
  one vectorised C++ reduction that streams each code byte once and never stores a dense weight.
* Many rows (prefill): decode once into a dense buffer, then a BLAS GEMM, whose cost the GEMM
  dominates and which amortises the decode over the rows.
* 4-bit codes at few rows with float32 activations go to the hand-written kernel ``rs::gemv_w4``
  instead (rs_compile.lowering.gemv_w4): integer levels looked up in registers, ~2x this GEMV
  with float activations and ~3x with ``act_bits=8`` (int16 multiply-adds).
* ``act_bits=8`` elsewhere: the activations are rounded first (same expressions as the reference).

The threshold is a guard on the symbolic row count: a dynamic prefill graph and the static
one-row decode graph each compile once.

Why the GEMV is written the way it is (all measured on the AVX2 CPU this was tuned on):

* Codes are read as *slots*: for the narrowest bit plane's byte run ``S`` (4 bits: 32 bytes), slot
  ``o`` holds codes ``o*S .. o*S+S-1`` of every group, which per plane is one contiguous byte run
  shifted by a constant. The loop then vectorises over bytes, and the slots of one byte share a
  single load (4 bits: low and high nibble from the same 32 bytes).
* The decode is ``w = d * (A + B d^2)`` with ``d = q - zero`` and per-group ``A = s/half``,
  ``B = s c / (3 half^3)``: the format's ``s u (1 + c u^2 / 3)`` with the constants folded.
* ``A`` and ``B`` are concatenated into one float32 buffer, which Inductor materialises on CPU
  (it lowers ``cat`` to a buffer). The hot loop then reads no float16, so Inductor keeps 8 float
  lanes, where a byte vector widens to int32 in one instruction; any float16 (or bfloat16) load in
  the loop widens it to 16 lanes, whose byte-to-int32 conversion is scalar code (about 8x slower
  GEMV). Low-precision activations therefore take that slower path; float32 is the fast one.
* Inductor's AVX2 code loads a run of fewer than 32 bytes through a stack buffer (a memcpy, then
  a 32-byte load that stalls on store forwarding); :func:`install` makes 8- and 16-byte runs one
  SSE load each in graphs holding rs ops (about 5x faster GEMV). Without it the lowering is
  correct, only slower.

The loop is then ALU-bound (about 10 vector instructions per 8 weights: unpack, convert, decode,
multiply-add), within ~10% of hand-written AVX2 kernels of the same decode (also a register
table lookup with ``vpermps``), and far from the memory bandwidth.
"""

from __future__ import annotations

import weakref

import torch

from rs_compile.codec.activations import quantize_activations
from rs_compile.codec.format import PLANES, group_bytes, unit_params
from rs_compile.lowering import gemv_w4
from rs_compile.lowering.registry import register
from rs_compile.ops.linear import poincare_linear  # noqa: F401  (defines torch.ops.rs.poincare_linear)

GEMV_MAX_ROWS = 3  # above this, decode-then-GEMM wins: the fused loop re-decodes every row


def code_slots(codes: torch.Tensor, bits: int, group_size: int) -> list[torch.Tensor]:
    """The codes of ``codes[N, ng*G*bits/8]`` as int32 slots ``[N, ng, S]``, in order along a group.

    Slot ``o`` holds codes ``o*S + i`` (``i < S``) with ``S`` the byte run of the narrowest plane;
    in a plane of width ``w`` code ``j`` sits in byte ``j % nbytes`` at bit ``w * (j // nbytes)``.
    """
    gb = group_bytes(bits, group_size)
    g = codes.view(codes.shape[0], codes.shape[1] // gb, gb)
    planes, start = [], 0
    for w in PLANES[bits]:
        nbytes = group_size * w // 8
        planes.append((w, nbytes, g[:, :, start : start + nbytes].to(torch.int32)))
        start += nbytes
    run = group_size * min(PLANES[bits]) // 8
    slots = []
    for o in range(group_size // run):
        q, low = None, 0
        for w, nbytes, plane in planes:
            off, shift = o * run % nbytes, w * (o * run // nbytes)
            part = plane[:, :, off : off + run]
            if shift:
                part = part >> shift
            if shift + w < 8:
                part = part & ((1 << w) - 1)
            if low:
                part = part << low
            q = part if q is None else q | part
            low += w
        slots.append(q)
    return slots


def group_coefficients(
    scales: torch.Tensor, curv: torch.Tensor, bits: int, curv_step: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group float32 ``(A, B)`` ``[N, ng, 1]`` with ``w = d (A + B d^2)``, ``d = q - zero``."""
    _, half = unit_params(bits)
    s = scales.to(torch.float32)
    a = s * (1.0 / half)
    b = s * curv.to(torch.float32) * (curv_step / (3.0 * half**3))
    ab = torch.cat([a.unsqueeze(0), b.unsqueeze(0)])  # one materialised buffer, see module doc
    return ab[0].unsqueeze(-1), ab[1].unsqueeze(-1)


def decode_slot(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bits: int) -> torch.Tensor:
    zero, _ = unit_params(bits)
    d = q.to(torch.float32) - zero
    return d * (a + b * (d * d))


def poincare_linear_decomposition(
    x, codes, scales, curv, bias, bits, group_size, in_features, curv_step, act_bits=0
):
    n, ng = scales.shape
    kp = ng * group_size
    x2 = x.reshape(-1, in_features)
    if x2.shape[0] <= GEMV_MAX_ROWS and gemv_w4.supports(x, bits, group_size, curv_step, act_bits):
        return torch.ops.rs.gemv_w4(x, codes, scales, curv, bias, group_size, in_features,
                                    curv_step, act_bits)
    if act_bits:
        x2 = quantize_activations(x2, group_size)
    if kp != in_features:  # zero columns meet the padding codes; cat keeps masks out of the loop
        x2 = torch.cat([x2, x2.new_zeros(x2.shape[0], kp - in_features)], dim=1)
    m = x2.shape[0]
    slots = code_slots(codes, bits, group_size)
    a, b = group_coefficients(scales, curv, bits, curv_step)
    run = slots[0].shape[-1]
    if m <= GEMV_MAX_ROWS:
        xs = x2.to(torch.float32).view(m, 1, ng, group_size)
        terms = [xs[..., o * run : (o + 1) * run] * decode_slot(q, a, b, bits)
                 for o, q in enumerate(slots)]
        out = sum(terms[1:], terms[0]).sum((-1, -2)).to(x.dtype)
    else:
        w = torch.stack([decode_slot(q, a, b, bits) for q in slots], dim=2).view(n, kp)
        out = torch.mm(x2, w.to(x.dtype).t())
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], n)


_ONES = "0x0101010101010101LL"
# lanes loaded -> (SSE load of exactly those bytes, 1s for the lanes above them)
_AVX2_BYTE_LOADS = {
    8: ("_mm_loadl_epi64", f"_mm256_setr_epi64x(0, {_ONES}, {_ONES}, {_ONES})"),
    16: ("_mm_loadu_si128", f"_mm256_setr_epi64x(0, 0, {_ONES}, {_ONES})"),
}


_RS_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # GraphLowering -> bool


def holds_rs_ops(graph) -> bool:
    """Whether Inductor's ``graph`` (a GraphLowering) compiles rs ops: nodes of a decomposed op
    keep it as ``meta["original_aten"]``, ops Inductor lowers directly are the node target."""
    if graph not in _RS_GRAPHS:
        ops = (n.meta.get("original_aten") or n.target for n in graph.graph.nodes)
        _RS_GRAPHS[graph] = any(getattr(op, "namespace", None) == "rs" for op in ops)
    return _RS_GRAPHS[graph]


def _fast_byte_loads(get_vec_load_line):
    """Wrap ``CppVecKernel._get_vec_load_line``: on AVX2 a contiguous run of 8 or 16 bytes loads
    with one SSE load; the lanes above are set to 1, as the original's stack buffer does. Only
    in graphs holding rs ops: every other kernel keeps Inductor's own code."""
    from torch._inductor.codegen.cpp import DTYPE_TO_CPP, cexpr_index
    from torch._inductor.cpu_vec_isa import VecAVX2
    from torch._inductor.virtualized import V

    def load_line(self, var, index, dtype, load_mask=None):
        if (dtype in (torch.uint8, torch.int8) and load_mask is None
                and self.num_elems in _AVX2_BYTE_LOADS and type(self.vec_isa) is VecAVX2
                and holds_rs_ops(V.graph)):
            load, ones = _AVX2_BYTE_LOADS[self.num_elems]
            ptr = f"{var} + {cexpr_index(index)}" if index != 0 else var
            raw = f"_mm256_zextsi128_si256({load}(reinterpret_cast<const __m128i*>({ptr})))"
            return f"at::vec::Vectorized<{DTYPE_TO_CPP[dtype]}>(_mm256_or_si256({raw}, {ones}))"
        return get_vec_load_line(self, var, index, dtype, load_mask)

    load_line.rs_fast_byte_loads = True
    return load_line


def install() -> None:
    """Register the decomposition with Inductor and the fast byte loads (both idempotent)."""
    from torch._inductor.codegen.cpp import CppVecKernel

    register(torch.ops.rs.poincare_linear.default, poincare_linear_decomposition)
    gemv_w4.install()
    current = CppVecKernel._get_vec_load_line
    if not getattr(current, "rs_fast_byte_loads", False):
        CppVecKernel._get_vec_load_line = _fast_byte_loads(current)
