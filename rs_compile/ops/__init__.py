"""torch.library custom ops of rs_compile (namespace ``rs``)."""

from rs_compile.ops.linear import linear

__all__ = ["linear"]
