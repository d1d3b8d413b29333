"""Fidelity harness: reference fake-quantizers (``baselines``), measures (``metrics``), held-out
and calibration data (``splits``), and the model-level evaluation tying them together (``harness``).
"""

from rs_compile._lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(__name__, ("baselines", "harness", "methods", "metrics",
                                                  "splits"), globals())
