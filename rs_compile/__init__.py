"""rs_compile: a torch.compile backend that runs Linear layers and attention from
hyperbolic (Poincare-ball) weight codes.

    torch.compile(model, backend="realitystone")     # compress at compile time
    rs_compile.convert(model)                        # compress once, in place
    rs_compile.inspect(model, *inputs)               # what was rewritten, what was not, and why
    AutoModelForCausalLM.from_pretrained(path, quantization_config=rs_compile.RealityStoneConfig())

Importing rs_compile changes nothing in torch: the Inductor lowerings of the rs ops are installed
on first use (rs_compile.lowering.install_lowerings), and the submodules that pull in Inductor,
transformers or the models (``hub``, ``generation``, ``demo``, ...) load on first attribute access.
"""

import importlib
from typing import Any

from rs_compile import hf_registration
from rs_compile.backend import backend, realitystone
from rs_compile.config import CompressionConfig
from rs_compile.convert import convert
from rs_compile.inspection import inspect
from rs_compile.kernels import register_triton_kernels
from rs_compile.modules import CompressedLinear
from rs_compile.report import Report
from rs_compile.serialization import load, save

register_triton_kernels()  # CUDA implementations, only when a Triton GPU driver is active
hf_registration.install()  # quant_method "realitystone" for from_pretrained, once transformers loads

__version__ = "0.1.0"
__all__ = ["CompressionConfig", "CompressedLinear", "RealityStoneConfig", "Report", "backend", "convert",
           "inspect", "load", "realitystone", "save"]
_SUBMODULES = ("bench", "calibration", "cli", "codec", "demo", "eval", "generation", "hf_quantizer",
               "hub", "hyperbolic", "kernels", "lowering", "lora", "models", "ops", "passes")


def __getattr__(name: str) -> Any:
    """``rs_compile.hub``, ``rs_compile.generation``, ...: imported on first access."""
    if name in _SUBMODULES:
        return importlib.import_module(f"rs_compile.{name}")
    if name == "RealityStoneConfig":  # imports transformers' quantizer registry (seconds)
        return importlib.import_module("rs_compile.hf_quantizer").RealityStoneConfig
    raise AttributeError(f"module 'rs_compile' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES, "RealityStoneConfig"})
