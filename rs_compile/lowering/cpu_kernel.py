"""The hand-written CPU kernel of ``rs::linear`` (``cpu_kernel.cpp``) and the routing around it.

* :func:`linear_cpu`: what ``rs::linear`` runs on CPU. Few rows (``M <= GEMV_MAX_ROWS``, decode
  steps) go to the kernel's fused GEMV, which streams the packed weight once and never writes a
  dense one; more rows (prefill) decode the weight with the kernel, in tiles of rows, and multiply
  each tile with BLAS.
* :func:`reference_linear`: the pure reference (``decode_weight`` + ``F.linear``), for tests and for
  whatever the kernel does not take (other dtypes, other devices, a failed build).

Availability is decided by building once (issue I-7): the first call compiles the C++ with
Inductor's toolchain and cache (``CppPythonBindingsCodeCache``: its compiler flags and OpenMP
runtime, one build per machine and source, reused across processes), then checks it against the
reference on small random layers of every supported width. A failed build or self-test is
recorded (:func:`status`), warned about once, and every call takes the reference path instead;
``RS_COMPILE_CPU_KERNEL=0`` in the environment disables the kernel the same way.

The kernel's own dispatch (AVX-512 paths for 4/5/8-bit codes and groups of a multiple of 32,
plain C++ otherwise) is chosen inside the library from the CPU's features: see the .cpp header.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import rs_compile.codec.activations as codec_activations
import rs_compile.codec.format as codec_format
from rs_compile.codec.activations import ACT_BITS, quantize_activations
from rs_compile.codec.format import SUPPORTED_BITS, Format, decode_weight, level_table, pack_groups

ENV_VAR = "RS_COMPILE_CPU_KERNEL"  # "0" disables the kernel (the reference path runs instead)
GEMV_MAX_ROWS = 16  # rows at or below which the fused GEMV runs; above: decode tiles + BLAS (measured
# on 2048x640 4-bit: the GEMV 426 vs 633 us at 16 rows, 637 vs 673 at 24, 850 vs 670 at 32)
DECODE_TILE_BYTES = 8 << 20  # float32 bytes of one decoded tile on the prefill path
MAX_GROUP_SIZE = 1024  # the kernel's limit (its stack tail buffer); larger groups use the reference

_ARGTYPES = ["const float*", "const uint8_t*", "const uint8_t*", "const uint16_t*", "const float*",
             "const int8_t*", "float*"] + ["int64_t"] * 11
FORCE_GENERIC = 1  # kernel flag: run the plain C++ path even where AVX-512 is available
NO_VNNI = 2  # kernel flag: the float path even where VNNI is available (act_bits=0: x as is;
# act_bits=8: x rounded to floats); by default VNNI CPUs run both through int8 dot products

_lock = threading.Lock()
_state: dict = {"kernel": None, "reason": None, "tried": False, "features": 0}


class KernelUnavailable(RuntimeError):
    pass


def _build():
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    class Bindings(CppPythonBindingsCodeCache):
        """Inductor's bindings, returning the kernel's int64 status instead of None."""

        cache: dict = {}
        call_entry_function = "return PyLong_FromLongLong(kernel({}));"

    source = format_defines() + Path(__file__).with_suffix(".cpp").read_text()
    return Bindings.load_pybinding(_ARGTYPES, source, needs_vec_isa=False)


def format_defines() -> str:
    """The ``#define``s the C++ source is built with: the format's constants, read from
    rs_compile.codec.format (and the activation rounding's) when the kernel is built, so that it
    cannot drift from them; they are part of the source text Inductor's build cache is keyed on."""
    planes = " ".join(f"X({bits}, {', '.join(map(str, codec_format.PLANES[bits]))})"
                      for bits in SUPPORTED_BITS)
    defines = {"RS_CURVATURE_BITS": codec_format.CURVATURE_BITS,
               "RS_TABLES": len(codec_format.CURVATURES),
               "RS_UNIFORM_BITS": codec_format.UNIFORM_BITS,
               "RS_FORMAT_PLANES(X)": planes,  # X(bits, plane widths...) per supported width
               "RS_ACT_TOP": f"{float(codec_activations.ACT_TOP)}f",
               "RS_MAX_GROUP_SIZE": MAX_GROUP_SIZE}
    return "".join(f"#define {name} {value}\n" for name, value in defines.items())


@functools.cache
def _levels(bits: int) -> torch.Tensor:
    return level_table(bits).contiguous()


def _call(kern, x, codes, groups, row_scale, bias, out, m, bits, group_size, in_features, act_bits,
          mode, flags=0) -> None:
    levels = _levels(bits)
    status = kern(x, codes, groups, row_scale.view(torch.int16), out if bias is None else bias,
                  levels, out, m, codes.shape[0], in_features, bits, group_size, groups.shape[1],
                  act_bits, bias is not None, torch.get_num_threads(), mode, flags)
    if status != 0:
        raise RuntimeError(f"rs_compile CPU kernel refused its arguments (status {status}): bits={bits}, "
                           f"group_size={group_size}, in_features={in_features}")


def _random_layer(n, k, bits, group_size, seed):
    g = torch.Generator().manual_seed(seed)
    fmt = Format(bits, group_size)
    spec = fmt.packed_specs(n, k)
    codes = torch.randint(0, 256, spec["codes"][0], generator=g, dtype=torch.int32).to(torch.uint8)
    # every step a group byte holds, with a valid table index (fewer tables than the index's bits
    # can count would leave invalid bytes)
    step = torch.randint(-fmt.max_step - 1, fmt.max_step + 1, spec["groups"][0], generator=g)
    groups = pack_groups(step, torch.randint(0, fmt.tables, spec["groups"][0], generator=g), bits)
    row_scale = (torch.rand(n, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    return codes, groups, row_scale


def _self_test(kern, flags: int = 0) -> None:
    """Kernel against the reference on small layers of every width (raises on a mismatch)."""
    for bits in SUPPORTED_BITS:
        for group_size, k in ((32, 100), (64, 192), (128, 136)):
            codes, groups, row_scale = _random_layer(37, k, bits, group_size, seed=bits * 1000 + k)
            w = decode_weight(codes, groups, row_scale, bits, group_size, k)
            out = torch.empty(37, k)
            _call(kern, out, codes, groups, row_scale, None, out, 0, bits, group_size, k, 0, 1, flags)
            if not torch.equal(out, w):
                raise KernelUnavailable(f"decode of {bits}-bit codes, groups of {group_size} differs")
            bias = torch.randn(37, generator=torch.Generator().manual_seed(k))
            for m in (1, 5):
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k))
                for act_bits in ACT_BITS:
                    xr = quantize_activations(x, group_size) if act_bits else x
                    ref = F.linear(xr.double(), w.double(), bias.double())
                    bound = 1e-5 * (F.linear(xr.double().abs(), w.double().abs(), bias.double().abs()) + 1e-30)
                    y = torch.empty(m, 37)
                    _call(kern, x, codes, groups, row_scale, bias, y, m, bits, group_size, k, act_bits, 0,
                          flags)
                    if not ((y.double() - ref).abs() <= bound).all():
                        raise KernelUnavailable(
                            f"{bits}-bit GEMV (groups of {group_size}, {m} rows, act_bits={act_bits}) "
                            f"differs from the reference by {(y.double() - ref).abs().max().item():.3g}")


def kernel():
    """The built and self-tested kernel, or None (reason in :func:`status`). Builds on first call."""
    if _state["tried"]:
        return _state["kernel"]
    with _lock:
        if _state["tried"]:
            return _state["kernel"]
        try:
            if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "off", "no"):
                raise KernelUnavailable(f"disabled by {ENV_VAR}={os.environ[ENV_VAR]}")
            from torch.utils._python_dispatch import _disable_current_modes

            # the first call may come from a trace (a decomposition running under fake tensors):
            # build and self-test on real tensors
            with _disable_current_modes(), torch._C._DisableFuncTorch():
                kern = _build()
                _self_test(kern)
            _state["kernel"] = kern
        except Exception as e:  # noqa: BLE001  (any failure means: use the reference path)
            _state["reason"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            warnings.warn(f"rs_compile: the CPU kernel of rs::linear is unavailable ({_state['reason']}); "
                          "using decode + F.linear instead (slower)", RuntimeWarning, stacklevel=2)
        finally:
            _state["tried"] = True
    return _state["kernel"]


def status() -> dict:
    """``{"available": bool, "reason": str | None, "features": ...}`` (builds on first call)."""
    kern = kernel()
    feats = _features(kern) if kern is not None else 0
    return {"available": kern is not None, "reason": _state["reason"],
            "avx512": bool(feats & 1), "vnni": bool(feats & 2)}


def _features(kern) -> int:
    t = torch.empty(1)
    return kern(t, t, t, t, t, t, t, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0)


def reset() -> None:
    """Forget the build decision (tests): the next call builds (or loads from cache) again."""
    with _lock:
        _state.update(kernel=None, reason=None, tried=False, features=0)


def supports(x: torch.Tensor, bits: int, group_size: int) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and group_size <= MAX_GROUP_SIZE
            and group_size % 8 == 0)


def reference_linear(x, codes, groups, row_scale, bias, bits, group_size, in_features, act_bits=0):
    """The pure reference of rs::linear: decode the whole weight, then F.linear."""
    from rs_compile.ops.linear import reference_linear as ref

    return ref(x, codes, groups, row_scale, bias, bits, group_size, in_features, act_bits)


def decode_cpu(codes, groups, row_scale, bits, group_size, in_features) -> torch.Tensor:
    """``decode_weight`` through the kernel (parallel, vectorised), or the reference decode."""
    kern = kernel()
    if kern is None or group_size > MAX_GROUP_SIZE or codes.device.type != "cpu":
        return decode_weight(codes, groups, row_scale, bits, group_size, in_features)
    out = torch.empty(codes.shape[0], in_features)
    _call(kern, out, codes.contiguous(), groups.contiguous(), row_scale.contiguous(), None, out, 0,
          bits, group_size, in_features, 0, 1)
    return out


@functools.lru_cache(maxsize=4096)
def _expected(n: int, bits: int, group_size: int, in_features: int):
    """(codes shape, groups shape) of a valid weight with ``n`` rows (raises for a bad format)."""
    spec = Format(bits, group_size).packed_specs(n, in_features)
    return spec["codes"][0], spec["groups"][0]


def fast_checks_pass(x, codes, groups, row_scale, bias, bits, group_size, in_features, act_bits) -> bool:
    """True when the op's checks (rs_compile.ops.linear.check_inputs) would pass and the tensors
    are the contiguous CPU float32 / packed ones the kernel reads; a cheap test for the eager
    fast path, which otherwise calls the op (and its full checks and errors)."""
    n = codes.shape[0]
    try:
        exp_codes, exp_groups = _expected(n, bits, group_size, in_features)
    except ValueError:
        return False
    return (x.dtype == torch.float32 and x.shape[-1] == in_features and codes.shape == exp_codes
            and groups.shape == exp_groups and row_scale.shape == (n,) and act_bits in ACT_BITS
            and codes.dtype == torch.uint8 and groups.dtype == torch.uint8
            and row_scale.dtype == torch.bfloat16 and codes.is_contiguous() and groups.is_contiguous()
            and (bias is None or (bias.shape == (n,) and bias.dtype == torch.float32))
            and group_size <= MAX_GROUP_SIZE)


def linear_cpu(x, codes, groups, row_scale, bias, bits, group_size, in_features, act_bits=0, *,
               out=None):
    """rs::linear on CPU (inputs already checked by the op): kernel GEMV for few rows, decoded
    tiles + BLAS for many, the reference where the kernel does not apply. ``out`` (float32,
    contiguous, ``[*x.shape[:-1], N]``), if given, receives the result (kernel paths only)."""
    kern = _state["kernel"] if _state["tried"] else kernel()
    if kern is None or not supports(x, bits, group_size):
        y = reference_linear(x, codes, groups, row_scale, bias, bits, group_size, in_features,
                             act_bits)
        return y if out is None else out.copy_(y)
    n = codes.shape[0]
    m = x.numel() // in_features
    if not codes.is_contiguous():
        codes = codes.contiguous()
    if not groups.is_contiguous():
        groups = groups.contiguous()
    if not row_scale.is_contiguous():
        row_scale = row_scale.contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    if out is None:
        out = torch.empty((*x.shape[:-1], n))
    if m <= GEMV_MAX_ROWS:
        if not x.is_contiguous():
            x = x.contiguous()
        status = kern(x, codes, groups, row_scale.view(torch.int16), out if bias is None else bias,
                      _levels(bits), out, m, n, in_features, bits, group_size, groups.shape[1],
                      act_bits, bias is not None, torch.get_num_threads(), 0, 0)
        if status != 0:
            raise RuntimeError(f"rs_compile CPU kernel refused its arguments (status {status})")
        return out
    x2 = x.reshape(m, in_features)
    if act_bits:
        x2 = quantize_activations(x2, group_size)
    out2 = out.view(m, n)
    rows = max(1, DECODE_TILE_BYTES // (4 * in_features))
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        whole = n0 == 0 and n1 == n
        w = decode_cpu(*((codes, groups, row_scale) if whole else
                         (codes[n0:n1], groups[n0:n1], row_scale[n0:n1])),
                       bits, group_size, in_features)
        b = None if bias is None else bias[n0:n1]
        if whole:
            if b is None:
                torch.mm(x2, w.t(), out=out2)
            else:
                torch.addmm(b, x2, w.t(), out=out2)
        else:
            out2[:, n0:n1] = F.linear(x2, w, b)
    return out
