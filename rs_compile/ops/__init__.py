"""torch.library custom ops of rs_compile (namespace ``rs``).

Importing this package registers every rs op a converted model's graph can hold, including
``rs::cpu_linear``, which Inductor's lowering emits: what a process that loads an exported
AOTInductor package (rs_compile.export) must import before ``aoti_load_package``.
"""

from rs_compile.ops.linear import linear
from rs_compile.ops.cpu_linear import cpu_linear
from rs_compile.ops.embedding import embedding
from rs_compile.ops.attention import attention
from rs_compile.experts import expert_linear

__all__ = ["attention", "cpu_linear", "embedding", "expert_linear", "linear"]
