"""The independent reference every rs::attention check compares with: float64 PyTorch SDPA.

Shared by test_attention_op.py and the Triton interpreter script it starts in a subprocess.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sdpa64(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Float64 SDPA with the op's bottom-right causal rule spelled as an explicit tril mask."""
    t, s = q.shape[2], k.shape[2]
    if causal:
        allowed = torch.ones(t, s, dtype=torch.bool).tril(s - t)
        if mask is None:
            mask = allowed
        elif mask.dtype == torch.bool:
            mask = mask & allowed
        else:
            mask = mask.masked_fill(~allowed, float("-inf"))
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    q, k, v = (x.double() for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
