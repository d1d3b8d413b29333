"""Curvature validation and the clamps every hyperbolic formula shares.

The clamps follow geoopt / hyptorch, and every one of them scales with the curvature ``c``:

* ``MIN_NORM`` keeps norms and denominators away from 0 (directions ``v / |v|`` at ``v = 0``).
* ``TANH_MAX``: ``tanh(15) == 1`` in float32 and differs from 1 by 2e-13 in float64, so clamping the
  argument loses nothing and keeps ``exp`` inside tanh-like kernels far from overflow.
* ``ball_eps(dtype)``: points are projected to the radius ``(1 - eps) / sqrt(c)``. float32 cannot
  tell ``1 - c|x|^2`` from 0 closer to the boundary than ~1e-7, so it needs a wide margin (4e-3,
  geoopt's value); float64 keeps 1e-5.
* ``artanh_max(dtype)``: the largest argument given to ``artanh``; 1 itself would return inf.
"""

from __future__ import annotations

import math

import torch

MIN_NORM = 1e-15
TANH_MAX = 15.0
_BALL_EPS = {torch.float32: 4e-3, torch.float64: 1e-5}
_ARTANH_EPS = {torch.float32: 1e-7, torch.float64: 1e-15}


def check_curvature(c: float | torch.Tensor) -> float:
    """Return ``c`` as a Python float after checking it names a hyperbolic space of curvature -c."""
    if isinstance(c, torch.Tensor):
        if c.numel() != 1:
            raise ValueError(f"c must be a scalar; got a tensor of shape {tuple(c.shape)}")
        if c.requires_grad:
            raise ValueError(
                "c is a tensor that requires grad, but the rs_hyp ops take c as a constant "
                "(learnable curvature is not supported); pass c.detach() or a float"
            )
        c = c.item()
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        raise ValueError(f"c must be a real number or a one-element tensor; got {type(c).__name__}")
    if not math.isfinite(c) or c <= 0:
        raise ValueError(
            f"c={c!r} is invalid: c is the magnitude of the negative curvature -c and must be "
            "finite and > 0 (c <= 0 would be flat or spherical space); pass e.g. c=1.0"
        )
    return float(c)


def check_float_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _BALL_EPS:
        raise ValueError(
            f"{name} has dtype {t.dtype}; hyperbolic ops support float32 and float64 only "
            "(the boundary margins are tuned per dtype); cast with .float() or .double()"
        )


def ball_eps(dtype: torch.dtype) -> float:
    return _BALL_EPS[dtype]


def artanh_max(dtype: torch.dtype) -> float:
    return 1.0 - _ARTANH_EPS[dtype]


def sq_norm(x: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean norm over the last dim, kept as a trailing size-1 dim."""
    return (x * x).sum(dim=-1, keepdim=True)


def norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the last dim (keepdim), clamped to ``MIN_NORM``."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(MIN_NORM)


def dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(dim=-1, keepdim=True)
