"""PEFT LoRA adapters on a frozen compressed base (CompressedLinear).

    from peft import LoraConfig, get_peft_model
    from rs_compile.lora import for_compressed, merge_errors

    config = for_compressed(LoraConfig(r=8, target_modules=["c_attn", "c_fc"]))
    peft_model = get_peft_model(model, config)    # model: converted or from_pretrained(RealityStoneConfig)
    ...train...                                   # the codes stay frozen; gradients reach the adapters
    merged = peft_model.merge_and_unload()        # W' = decode(codes) + B A * scale, encoded again
    merge_errors(merged)                          # {layer: relative error of the new codes}

PEFT's LoRA layers know ``nn.Linear``, Conv1D, embeddings and a few quantized layers, not
CompressedLinear: ``get_peft_model`` raises "Target module ... is not supported". PEFT's
custom-module mapping (``LoraConfig._register_custom_module``, experimental in PEFT) takes a LoRA
layer per base type; :func:`for_compressed` registers :class:`CompressedLoraLinear` for
CompressedLinear. Its forward is PEFT's (base output plus ``B A x * scale``); merging differs: PEFT
adds the delta to ``weight.data``, which on a CompressedLinear is a decoded copy (the add would
be lost), so the merged weight is encoded into new codes instead, and the encoding error is
reported (:func:`merge_errors`). Unmerging restores the previous codes exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from rs_compile.codec.encode import encode
from rs_compile.codec.format import Format
from rs_compile.modules import PACKED, CompressedLinear


class CompressedLoraLinear(PeftLoraLinear):
    """PEFT's LoRA Linear around a CompressedLinear: plain LoRA only (no DoRA or other variants,
    which read and rescale the dense weight); merging re-encodes."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any):
        if config.use_dora:
            raise ValueError("DoRA normalises the dense weight column by column; rs_compile's LoRA on "
                             "compressed layers supports plain LoRA only (use_dora=False)")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self._codes_before_merge: list[tuple[torch.Tensor, ...]] = []

    @property
    def lora_variants(self):
        return {(): None}

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Encode ``decode(codes) + B A * scale`` (and the LoRA bias) in the layer's format; the
        relative error of the new codes is in ``base_layer.merge_error`` (and :func:`merge_errors`).
        ``safe_merge`` checks the merged weight for NaN / Inf before anything is replaced."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base: CompressedLinear = self.get_base_layer()
        for adapter in (a for a in adapter_names if a in self.lora_A):
            with torch.no_grad():
                merged = base.dequantize().double() + self.get_delta_weight(adapter).double()
            bias = base.bias
            if self.lora_bias[adapter]:
                if bias is None:
                    raise RuntimeError("cannot merge a LoRA with lora_bias=True into a layer without bias")
                bias = bias + self.lora_B[adapter].bias.detach() * self.scaling[adapter]
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            enc = encode(merged.float(), Format(base.bits, base.group_size))
            error = float((enc.dequantize().double() - merged).norm() / merged.norm().clamp_min(1e-300))
            self._codes_before_merge.append((*(getattr(base, n) for n in PACKED), base.bias))
            for name, t in zip(PACKED, enc.tensors()):
                setattr(base, name, t.to(getattr(base, name).device))
            if bias is not None:
                base.bias = bias.detach().clone()
            base.merge_error = error
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Restore the codes (and bias) the layer had before each merge, newest first."""
        base = self.get_base_layer()
        while self.merged_adapters:
            self.merged_adapters.pop()
            *packed, bias = self._codes_before_merge.pop()
            for name, t in zip(PACKED, packed):
                setattr(base, name, t)
            base.bias = bias
            base.__dict__.pop("merge_error", None)


def for_compressed(config: LoraConfig) -> LoraConfig:
    """``config``, with :class:`CompressedLoraLinear` registered for CompressedLinear targets."""
    config._register_custom_module({CompressedLinear: CompressedLoraLinear})
    return config


def merge_errors(model: nn.Module) -> dict[str, float]:
    """Relative Frobenius error ``|decode(new codes) - merged| / |merged|`` of every layer a LoRA
    merge re-encoded, by module name."""
    return {name: m.merge_error for name, m in model.named_modules()
            if isinstance(m, CompressedLinear) and hasattr(m, "merge_error")}
