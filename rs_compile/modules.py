"""CompressedLinear: the module ``convert`` swaps in for nn.Linear and transformers' Conv1D."""

from __future__ import annotations

import torch
from torch import nn

from rs_compile.codec.encode import EncodedWeight
from rs_compile.codec.format import decode_weight
from rs_compile.ops.linear import poincare_linear


class CompressedLinear(nn.Module):
    """y = x @ W.T + b with W held only as Poincare codes (buffers), executed by rs::poincare_linear.

    Buffers: ``codes`` (uint8), ``scales`` (float16), ``curv`` (uint8), and the dense ``bias``
    if the original layer had one. No dense weight is kept. ``act_bits=8`` rounds the input to
    int8 per group first (rs_compile.codec.activations).
    """

    def __init__(self, encoded: EncodedWeight, bias: torch.Tensor | None = None, act_bits: int = 0):
        super().__init__()
        self.register_buffer("codes", encoded.codes)
        self.register_buffer("scales", encoded.scales)
        self.register_buffer("curv", encoded.curv)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.bits = encoded.bits
        self.group_size = encoded.group_size
        self.in_features = encoded.in_features
        self.out_features = encoded.out_features
        self.curv_step = encoded.curv_step
        self.act_bits = act_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return poincare_linear(x, self.codes, self.scales, self.curv, self.bias, self.bits,
                               self.group_size, self.in_features, self.curv_step, self.act_bits)

    def dequantize(self) -> torch.Tensor:
        """The dense float32 weight [out, in] the codes represent (what the op multiplies by)."""
        return decode_weight(self.codes, self.scales, self.curv, self.bits, self.group_size,
                             self.in_features, self.curv_step)

    @classmethod
    def from_meta(cls, meta: dict, packed: dict[str, torch.Tensor],
                  bias: torch.Tensor | None) -> CompressedLinear:
        """The layer :meth:`meta` and the packed buffers (named as in
        rs_compile.codec.format.packed_specs) describe: what load rebuilds a saved layer from."""
        enc = EncodedWeight(**packed, bits=meta["bits"], group_size=meta["group_size"],
                            in_features=meta["in_features"], curv_step=meta["curv_step"])
        return cls(enc, bias, meta["act_bits"])

    def meta(self) -> dict:
        return dict(bits=self.bits, group_size=self.group_size, in_features=self.in_features,
                    out_features=self.out_features, curv_step=self.curv_step,
                    bias=self.bias is not None, act_bits=self.act_bits)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}"
                + (f", act_bits={self.act_bits}" if self.act_bits else ""))
