"""rs_compile: a torch.compile backend that runs Linear layers, embeddings and attention from
low-bit weight codes on level grids shaped by the Poincare ball's log map (rs_compile.codec.format).

    torch.compile(model, backend="realitystone")     # compress at compile time
    rs_compile.convert(model)                        # compress once, in place
    rs_compile.inspect(model, *inputs)               # what was rewritten, what was not, and why
    rs_compile.compile_for_generation(model)         # static-cache, compiled HF generate
    rs_compile.export(model, inputs, "m.pt2")        # a converted model as an AOTInductor package
    AutoModelForCausalLM.from_pretrained(path, quantization_config=rs_compile.RealityStoneConfig())

Options are the fields of ``EncodingConfig`` (the stored bytes) and ``CompileConfig`` (how the
model runs), given as keywords to any of the above.

Importing rs_compile changes nothing in torch: the Inductor lowerings of the rs ops are installed
on first use (rs_compile.lowering.install_lowerings), and the submodules that pull in Inductor,
transformers or the models (``hub``, ``models``, ``demo``, ...) load on first attribute access.
"""

import importlib
from typing import Any

from rs_compile import hf_registration
from rs_compile._lazy import lazy_submodules
from rs_compile.aoti import export
from rs_compile.backend import backend, realitystone
from rs_compile.config import CompileConfig, EncodingConfig
from rs_compile.convert import convert
from rs_compile.generation import compile_for_generation
from rs_compile.inspection import inspect
from rs_compile.kernels import register_triton_kernels
from rs_compile.modules import CompressedLinear
from rs_compile.report import Report
from rs_compile.serialization import load, save

register_triton_kernels()  # CUDA implementations, only when a Triton GPU driver is active
hf_registration.install()  # quant_method "realitystone" for from_pretrained, once transformers loads

__version__ = "0.1.0"
__all__ = ["CompileConfig", "CompressedLinear", "EncodingConfig", "RealityStoneConfig", "Report",
           "backend", "compile_for_generation", "convert", "export", "inspect", "load", "realitystone",
           "save"]
# rs_compile.hub, rs_compile.models, ...: imported on first access
_submodule, __dir__ = lazy_submodules(__name__, (
    "bench", "calibration", "cli", "codec", "demo", "eval", "hf_quantizer", "hub", "hyperbolic",
    "kernels", "lora", "lowering", "models", "ops", "passes"), globals())


def __getattr__(name: str) -> Any:
    if name == "RealityStoneConfig":  # imports transformers' quantizer registry (seconds): lazily
        return importlib.import_module("rs_compile.hf_quantizer").RealityStoneConfig
    return _submodule(name)
