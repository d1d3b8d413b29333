"""``rs::gemv_w4``: the decode-time CPU kernel of ``rs::poincare_linear`` for 4-bit codes.

Inductor's C++ for the float GEMV (rs_compile.lowering.linear) is ALU-bound at about 10 vector
instructions per 8 weights. With an integer curvature step every level of a group is an integer
(``147 d + c d^3``, see ``gemv_w4.cpp``), looked up by ``vpshufb`` as int16: then about 40
instructions per 64 weights with float activations, 20 with int8 ones (``act_bits=8``, int16
multiply-adds). Inductor does not emit these, so the kernel is hand-written and built by
Inductor's own C++ toolchain and cache (``CppPythonBindingsCodeCache``: its compiler flags and
OpenMP runtime, one build per machine).

Scope: 4-bit codes, ``group_size % 64 == 0``, integer ``curv_step`` <= 61, float32 CPU
activations, ``act_bits`` 0 or 8, an x86 CPU with AVX2 (or AVX-512). Anything else keeps
Inductor's GEMV: the same result up to float rounding.

Inductor runs it once per linear per token, so the call path is kept short: a lowering makes the
compiled graph call :func:`gemv_w4_out` directly (``extern_kernels.rs_gemv_w4(..., out=buf)``
into a buffer Inductor allocates), skipping the dispatcher (~12 us per call here), and the kernel
returns its status instead of filling a tensor. Eager calls go through the op, registered with
``torch.library.Library`` (a ``custom_op`` wrapper costs ~60 us).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

from rs_compile.ops.linear import poincare_linear  # noqa: F401  (defines torch.ops.rs.poincare_linear)

_ARGTYPES = ["const float*", "const uint8_t*", "const uint16_t*", "const uint8_t*", "const float*",
             "float*", "int64_t", "int64_t", "int64_t", "int64_t", "int64_t", "int64_t", "int64_t",
             "int64_t"]
MAX_LEVEL_CURVATURE = 61  # 147 * 8 + 61 * 8**3 < 2**15: the largest c * curv_step with int16 levels


@functools.cache
def available() -> bool:
    """True when Inductor builds for an x86 vector ISA with AVX2 (AVX2 or AVX-512)."""
    from torch._inductor.cpu_vec_isa import VecAVX2, VecAVX512, pick_vec_isa

    return isinstance(pick_vec_isa(), (VecAVX2, VecAVX512))


def supports(x: torch.Tensor, bits: int, group_size: int, curv_step: float, act_bits: int) -> bool:
    return (bits == 4 and act_bits in (0, 8) and group_size % 64 == 0
            and float(curv_step).is_integer() and 0 <= curv_step <= MAX_LEVEL_CURVATURE
            and x.dtype == torch.float32 and x.device.type == "cpu" and available())


@functools.cache
def _kernel():
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    class Bindings(CppPythonBindingsCodeCache):
        """Inductor's bindings, returning the kernel's int64 status instead of None."""

        cache: dict = {}
        call_entry_function = "return PyLong_FromLongLong(kernel({}));"

    source = Path(__file__).with_suffix(".cpp").read_text()
    return Bindings.load_pybinding(_ARGTYPES, source, needs_vec_isa=True)


_LIB = torch.library.Library("rs", "FRAGMENT")
_LIB.define("gemv_w4(Tensor x, Tensor codes, Tensor scales, Tensor curv, Tensor? bias, "
            "int group_size, int in_features, float curv_step, int act_bits) -> Tensor")


def gemv_w4_out(x, codes, scales, curv, bias, group_size, in_features, curv_step, act_bits, *,
                out):
    """``rs::gemv_w4`` into ``out`` (float32, ``[*x.shape[:-1], N]``). The compiled graph's call,
    kept to the kernel call: its inputs are contiguous, the bias (if any) float32, and
    :func:`supports` held when the graph was built."""
    n, ng = scales.shape
    if _kernel()(x, codes, scales, curv, out if bias is None else bias, out,
                 x.numel() // in_features, n, ng, group_size, in_features, int(curv_step),
                 bias is not None, act_bits):
        warnings.warn(f"rs::gemv_w4: a curvature index times curv_step exceeds "
                      f"{MAX_LEVEL_CURVATURE}; computing this layer with the reference instead "
                      "(slower). Encode with fewer curvatures to use the kernel.", stacklevel=2)
        out.copy_(torch.ops.rs.poincare_linear(x, codes, scales, curv, bias, 4, group_size,
                                               in_features, curv_step, act_bits))
    return out


def _gemv_w4(x, codes, scales, curv, bias, group_size, in_features, curv_step, act_bits):
    """``rs::poincare_linear(..., bits=4, act_bits=act_bits)`` on CPU, inputs checked by that op."""
    if not supports(x, 4, group_size, curv_step, act_bits):
        raise RuntimeError(
            f"rs::gemv_w4 needs float32 CPU activations, group_size % 64 == 0, an integer "
            f"curv_step <= {MAX_LEVEL_CURVATURE}, act_bits 0 or 8 and AVX2; got {x.dtype} on "
            f"{x.device}, group_size={group_size}, curv_step={curv_step}, act_bits={act_bits}")
    out = torch.empty((*x.shape[:-1], scales.shape[0]), dtype=torch.float32)
    x, codes, scales, curv = (t.contiguous() for t in (x, codes, scales, curv))
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    return gemv_w4_out(x, codes, scales, curv, bias, group_size, in_features, curv_step, act_bits,
                       out=out)


_LIB.impl("gemv_w4", _gemv_w4, "CPU")


@torch.library.register_fake("rs::gemv_w4")
def _(x, codes, scales, curv, bias, group_size, in_features, curv_step, act_bits):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def install() -> None:
    """Let Inductor call :func:`gemv_w4_out` without the dispatcher (idempotent)."""
    from torch._inductor import ir, lowering
    from torch._inductor.select_algorithm import extern_kernels
    from torch._inductor.virtualized import V

    extern_kernels.rs_gemv_w4 = gemv_w4_out
    op = torch.ops.rs.gemv_w4.default
    if op in lowering.lowerings:
        return

    through_dispatcher = lowering.fallback_handler(op, add_to_fallback_set=False)

    @lowering.register_lowering(op, type_promotion_kind=None)
    def _lower(x, codes, scales, curv, bias, group_size, in_features, curv_step, act_bits):
        if V.graph.cpp_wrapper:  # a C++ wrapper cannot call a Python function: keep the op
            return through_dispatcher(x, codes, scales, curv, bias, group_size, in_features,
                                      curv_step, act_bits)
        size = [*x.get_size()[:-1], codes.get_size()[0]]
        layout = ir.FixedLayout(x.get_device(), torch.float32, size,
                                ir.FlexibleLayout.contiguous_strides(size))
        if bias is not None:
            bias = lowering.to_dtype(bias, torch.float32)
        tensors = [ir.ExternKernel.require_contiguous(ir.ExternKernel.realize_input(t))
                   for t in (x, codes, scales, curv, bias) if t is not None]  # what the call assumes
        # constant arguments follow the tensors: a missing bias is passed as None in its place
        constants = ([] if bias is not None else [None]) + [group_size, in_features, curv_step,
                                                            act_bits]
        return ir.TensorBox.create(ir.ExternKernelOut(
            layout, tensors, constants, python_kernel_name="extern_kernels.rs_gemv_w4"))
