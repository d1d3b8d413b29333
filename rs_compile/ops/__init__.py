"""torch.library custom ops of rs_compile (namespace ``rs``).

Importing this package registers every rs op a converted model's graph can hold, including
``rs::cpu_linear``, which Inductor's lowering emits: what a process that loads an exported
AOTInductor package (rs_compile.export) must import before ``aoti_load_package``. The submodules
``attention``, ``cpu_linear`` and ``embedding`` stay modules here (their ops are
``torch.ops.rs.*``); ``linear`` is the rs::linear op itself, as before.
"""

import rs_compile.experts  # noqa: F401  (rs::expert_linear and its grouped / backward ops)
from rs_compile.ops import attention, cpu_linear, embedding  # noqa: F401  (register the ops)
from rs_compile.ops.linear import linear

__all__ = ["linear"]
