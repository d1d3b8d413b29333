"""torch.library custom ops of rs_compile (namespace ``rs``)."""

from rs_compile.ops.linear import poincare_linear

__all__ = ["poincare_linear"]
