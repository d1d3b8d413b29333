"""rs_compile: a torch.compile backend that runs Linear layers and attention from
hyperbolic (Poincare-ball) weight codes.

    torch.compile(model, backend="realitystone")     # compress at compile time
    rs_compile.convert(model)                        # compress once, in place
    rs_compile.inspect(model, *inputs)               # what was rewritten, what was not, and why
"""

from rs_compile.backend import backend, realitystone
from rs_compile.config import CompressionConfig
from rs_compile.convert import convert
from rs_compile.inspection import inspect
from rs_compile.kernels import register_triton_kernels
from rs_compile.lowering import install_lowerings
from rs_compile.modules import CompressedLinear
from rs_compile.report import Report
from rs_compile.serialization import load, save

install_lowerings()  # so that any Inductor compile of a converted model fuses the rs ops
register_triton_kernels()  # CUDA implementations, only when a Triton GPU driver is active

__version__ = "0.1.0"
__all__ = ["CompressionConfig", "CompressedLinear", "Report", "backend", "convert", "inspect",
           "load", "realitystone", "save"]
