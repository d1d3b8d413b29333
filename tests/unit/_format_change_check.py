"""Change the format's constants in this process, then check that every decode path follows.

Started by test_format_one_definition.py in a subprocess (TRITON_INTERPRET=1, a fresh CPU kernel
build), so the patched constants never reach the pytest process. The patch is one edit of
rs_compile.codec.format (and of the activation rounding's ACT_TOP), as a format change would be:
group bytes with 3-bit table indices (so 4-bit scale steps), 3-bit codes with the 1-bit plane
first, level tables topping at 100, activations rounded to +-63. Every path is compared with an
independent decode written here from those constants, and a decode with the original constants
must disagree (the check can fail). Prints one JSON line; exits non-zero on any mismatch.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

import rs_compile.codec.activations as activations
import rs_compile.codec.format as fmt

CURVATURE_BITS, TOP_LEVEL, PLANES_3, ACT_TOP = 3, 100, (1, 2), 63
fmt.CURVATURE_BITS, fmt.TOP_LEVEL, fmt.PLANES[3], activations.ACT_TOP = CURVATURE_BITS, TOP_LEVEL, PLANES_3, ACT_TOP
fmt._levels.cache_clear()

from rs_compile.codec.encode import encode  # noqa: E402  (after the patch, as a fresh import would be)
from rs_compile.kernels.triton_linear import triton_linear  # noqa: E402
from rs_compile.lowering import cpu_kernel  # noqa: E402
from rs_compile.ops.linear import reference_linear  # noqa: E402

N, K, G = 24, 80, 32  # a partial last group


def levels(bits: int) -> torch.Tensor:
    """The patched tables from their published formula: round(TOP * f_c(u) / f_c(1 + 1/h))."""
    if bits == 8:
        return torch.arange(-128, 128, dtype=torch.float64).unsqueeze(0)
    h = 2 ** (bits - 1) - 1
    u = (torch.arange(2**bits, dtype=torch.float64) - h) / h
    c = torch.arange(4, dtype=torch.float64).unsqueeze(-1)
    f = u * (1 + c * u * u / 3)
    return torch.floor(TOP_LEVEL * f / f[:, -1:] + 0.5)


def independent_decode(codes, groups, row_scale, bits, curvature_bits, planes) -> torch.Tensor:
    """float64 ``[N, K]`` from the bytes, one code at a time (no rs_compile code involved)."""
    cb = 0 if bits == 8 else curvature_bits
    table = levels(bits)
    out = torch.zeros(N, K, dtype=torch.float64)
    for n in range(N):
        for kk in range(K):
            g, j = divmod(kk, G)
            base, q, low = g * G * bits // 8, 0, 0
            for w in planes:
                nbytes = G * w // 8
                byte = int(codes[n, base + j % nbytes])
                q |= ((byte >> (w * (j // nbytes))) & ((1 << w) - 1)) << low
                base, low = base + nbytes, low + w
            gb = int(groups[n, g].view(torch.int8))
            k, c = gb >> cb, gb & ((1 << cb) - 1)
            out[n, kk] = float(row_scale[n]) * k * float(table[c, q])
    return out


def expected(x, w, bias, act_bits):
    """float64 ``x @ w.T + bias`` with x rounded as the patched activation format says (in x's
    dtype, as the paths round), and a bound on float32 summation differences."""
    if act_bits:  # round(x / s) * s per group, s = max|x| / ACT_TOP
        xg = F.pad(x, (0, -K % G)).view(x.shape[0], -1, G)
        s = xg.abs().amax(-1, keepdim=True) / ACT_TOP
        x = (torch.round(xg / s) * s).view(x.shape[0], -1)[:, :K]
    x = x.double()
    return (F.linear(x, w, bias.double()),
            1e-5 * (F.linear(x.abs(), w.abs(), bias.double().abs()) + 1e-30))


@torch.compile(backend="inductor", dynamic=False, fullgraph=True)
def linear_compiled(x, codes, groups, row_scale, bias, bits, group_size, in_features, act_bits):
    return torch.ops.rs.linear(x, codes, groups, row_scale, bias, bits, group_size, in_features,
                               act_bits)


def main() -> None:
    torch._dynamo.config.recompile_limit = 64  # one graph per width, act_bits and row count
    report: dict = {"kernel": cpu_kernel.status(), "checked": []}
    assert report["kernel"]["available"], f"the CPU kernel did not build with the patched format: {report}"
    assert f"#define RS_CURVATURE_BITS {CURVATURE_BITS}\n" in cpu_kernel.format_defines()
    gen = torch.Generator().manual_seed(0)
    for bits in (3, 4, 5, 8):
        f = fmt.Format(bits, G)
        planes = PLANES_3 if bits == 3 else fmt.PLANES[bits]
        w = torch.randn(N, K, generator=gen) * 0.05
        enc = encode(w, f)
        codes, groups, row_scale = enc.tensors()
        ref_w = independent_decode(codes, groups, row_scale, bits, CURVATURE_BITS, planes)
        # the format module, the encoder and the independent decode agree on the patched layout
        assert torch.equal(enc.dequantize().double(), ref_w), bits
        assert (ref_w - w).norm() < 0.5 * w.norm(), (bits, float((ref_w - w).norm() / w.norm()))
        if bits != 8:  # the original layout reads these bytes differently: the check can fail
            old = independent_decode(codes, groups, row_scale, bits, 2, fmt.PLANES[bits] if bits != 3 else (2, 1))
            assert not torch.equal(old, ref_w), bits
        assert torch.equal(cpu_kernel.decode_cpu(codes, groups, row_scale, bits, G, K).double(), ref_w), bits
        bias = torch.randn(N, generator=gen)
        for m, act_bits in ((1, 0), (3, 8), (20, 0), (20, 8)):
            x = torch.randn(m, K, generator=gen)
            args = (codes, groups, row_scale, bias, bits, G, K, act_bits)
            outputs = {"cpu kernel": (x, cpu_kernel.linear_cpu(x, *args)),
                       "reference op": (x, reference_linear(x, *args)),
                       "triton (interpreted)": (x, triton_linear(x, *args))}
            if m == 3 or not act_bits:  # the decomposition Inductor fuses (float64: no kernel)
                outputs["inductor decomposition"] = (x.double(), linear_compiled(x.double(), *args))
            for path, (xp, y) in outputs.items():
                expect, bound = expected(xp, ref_w, bias, act_bits)
                err = (y.double() - expect).abs()
                assert (err <= bound).all(), (path, bits, m, act_bits, float(err.max()))
            report["checked"].append([bits, m, act_bits, sorted(outputs)])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
