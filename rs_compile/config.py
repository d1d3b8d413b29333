"""The two option sets of rs_compile, each validated in one place.

* :class:`EncodingConfig`: what the stored bytes are (code widths, groups, level tables, the
  encoder's calibration and bit budget, which weights are compressed). The same weights and
  calibration data converted with equal encoding configs give the same codes.
* :class:`CompileConfig`: how a compressed model runs (graph rewrites of the backend, activation
  rounding, trainable weights); it changes no stored byte.

``convert(model, **options)``, ``rs_compile.backend(**options)``, ``inspect(..., **options)`` and
``torch.compile(..., options={...})`` take the fields of both as flat keywords:
:func:`split_options` routes each to its config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, TypeVar

from rs_compile.codec.activations import ACT_BITS
from rs_compile.codec.format import CURVATURES, SUPPORTED_BITS, Format

C = TypeVar("C", bound="_Options")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is invalid; it must be True or False")


class _Options:
    """``from_options`` for a frozen dataclass of options."""

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls: type[C], base: C | None = None, options: Mapping[str, Any] | None = None) -> C:
        """Merge ``options`` into ``base``; unknown keys are a ValueError listing the valid ones."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} option(s) {unknown}; valid options are "
                             f"{cls.option_names()}")
        return dataclasses.replace(base or cls(), **options)


@dataclasses.dataclass(frozen=True)
class EncodingConfig(_Options):
    """What rs_compile stores for a model's weights.

    bits: code width per weight (2, 3, 4, 5 or 8).
    group_size: weights per (scale step, level table) group along in_features; a positive
        multiple of 8 (the CPU kernel takes multiples of 32). in_features that are not a multiple
        are zero-padded (the padding is stored, never read back).
    curvatures: how many of the format's level tables (curvatures 0, 1, 2, 3) a group may pick
        from (1 to 4; 1 is the fixed-grid ablation; 8-bit codes have one table).
    embeddings: compress nn.Embedding tables (and subclasses) too, into CompressedEmbedding; an
        output layer tied to one reads its codes. False keeps embeddings and tied heads dense.
    embedding_bits: code width of embedding tables (and so of tied heads). 5 by default: on
        Gemma-3-270M, whose tied 262k x 640 table is 63% of the weights, 4-bit tables added 3.7x
        the next-token KL of 5-bit ones (docs/fidelity.md).
    min_features: linears with in_features or out_features below this stay dense.
    compress_tied: also compress a weight the graph reads elsewhere (e.g. a tied lm_head); the
        other readers keep the dense tensor, so this trades memory for decode speed.
    gptq: with calibration data (``convert(..., calibration=...)``), encode with GPTQ error
        feedback; False weights only the per-group search by each input's mean square.
    gptq_damp: GPTQ's damping, relative to the mean diagonal of the inputs' second moments. GPTQ's
        own 0.01 suits thousands of tokens; with a dozen sentences (~160 tokens for 384-wide
        layers) 0.1 measured 24% lower MiniLM embedding error, and equal on TinyStories-260K.
    bit_budget: with calibration data, per-layer widths chosen so that the all-in bits per weight
        stay at most this (e.g. 4.5); None encodes every layer at ``bits``.
    """

    bits: int = 4
    group_size: int = 32
    curvatures: int = 4
    embeddings: bool = True
    embedding_bits: int = 5
    min_features: int = 16
    compress_tied: bool = False
    gptq: bool = True
    gptq_damp: float = 0.1
    bit_budget: float | None = None

    def __post_init__(self) -> None:
        Format(self.bits, self.group_size)  # ValueError for a pair the layout cannot hold
        if self.embedding_bits not in SUPPORTED_BITS:
            raise ValueError(f"embedding_bits={self.embedding_bits!r} is not supported; valid values "
                             f"are {SUPPORTED_BITS}")
        if not isinstance(self.curvatures, int) or not 1 <= self.curvatures <= len(CURVATURES):
            raise ValueError(f"curvatures={self.curvatures!r} is invalid; valid range is "
                             f"1..{len(CURVATURES)}")
        for name in ("embeddings", "compress_tied", "gptq"):
            _check_bool(name, getattr(self, name))
        if not (isinstance(self.gptq_damp, (int, float)) and math.isfinite(self.gptq_damp)
                and self.gptq_damp > 0):
            raise ValueError(f"gptq_damp={self.gptq_damp!r} is invalid; it must be a finite float > 0 "
                             "(0.1 is the default)")
        if self.bit_budget is not None and not (
                isinstance(self.bit_budget, (int, float)) and math.isfinite(self.bit_budget)
                and self.bit_budget > 0):
            raise ValueError(f"bit_budget={self.bit_budget!r} is invalid; it must be None or a "
                             "finite number of bits per weight > 0, e.g. 4.5")
        if not isinstance(self.min_features, int) or self.min_features < 1:
            raise ValueError(f"min_features={self.min_features!r} is invalid; it must be an int >= 1")

    @property
    def format(self) -> Format:
        """The stored format of linear weights (embeddings: :attr:`embedding_format`)."""
        return Format(self.bits, self.group_size)

    @property
    def embedding_format(self) -> Format:
        return Format(self.embedding_bits, self.group_size)


@dataclasses.dataclass(frozen=True)
class CompileConfig(_Options):
    """How a compressed model runs; the stored codes do not depend on it.

    attention: the backend rewrites attention patterns into ``rs::attention``.
    fuse_qkv: the backend fuses q/k/v projections of one input into a single compressed linear.
    act_bits: 0 keeps float activations (weight-only); 8 rounds each activation row to int8 per
        weight group at run time (W4A8), so that the CPU decode kernel multiplies in integers
        (~1.5x its float path for 4-bit codes, ~1.2x the decode rate; fidelity cost in
        docs/fidelity.md). Used by ``convert``'s layers and by the backend.
    frozen_weights: the compile route keeps a linear dense when its weight requires grad and the
        graph is compiled with grad enabled (training: compressed weights get no gradient, and a
        silent ``.grad is None`` would be a wrong answer); the skip is in the report. True
        compresses those weights anyway, frozen: gradients reach the inputs (and biases,
        adapters) only, and the weights' ``.grad`` stays None. ``convert`` always freezes: its
        compressed layers hold codes and bias as buffers, outside ``model.parameters()``.
    """

    attention: bool = True
    fuse_qkv: bool = True
    act_bits: int = 0
    frozen_weights: bool = False

    def __post_init__(self) -> None:
        for name in ("attention", "fuse_qkv", "frozen_weights"):
            _check_bool(name, getattr(self, name))
        if self.act_bits not in ACT_BITS:
            raise ValueError(f"act_bits={self.act_bits!r} is invalid; valid values are {ACT_BITS} "
                             "(0: float activations, 8: dynamic int8 activations)")


def split_options(
    options: Mapping[str, Any] | None = None,
    encoding: EncodingConfig | None = None,
    compile_config: CompileConfig | None = None,
) -> tuple[EncodingConfig, CompileConfig]:
    """``(encoding, compile_config)`` with each of the flat ``options`` merged into the config that
    has it; an unknown key is a ValueError listing both sets."""
    options = dict(options or {})
    unknown = sorted(set(options) - {*EncodingConfig.option_names(), *CompileConfig.option_names()})
    if unknown:
        raise ValueError(f"unknown rs_compile option(s) {unknown}; valid options are "
                         f"{EncodingConfig.option_names()} (EncodingConfig: the stored bytes) and "
                         f"{CompileConfig.option_names()} (CompileConfig: how the model runs)")
    for config, cls in ((encoding, EncodingConfig), (compile_config, CompileConfig)):
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"expected an {cls.__name__} or None, got {type(config).__name__}")

    def picked(cls: type[_Options]) -> dict[str, Any]:
        return {k: v for k, v in options.items() if k in cls.option_names()}

    return (EncodingConfig.from_options(encoding, picked(EncodingConfig)),
            CompileConfig.from_options(compile_config, picked(CompileConfig)))
