"""Hyperbolic geometry for rs_compile: Poincare, Lorentz and Klein models, the ``rs_hyp`` custom
ops behind their hot maps, and hyperbolic layers. Curvature is -c with c > 0 everywhere.
"""

from .klein import Klein
from .layers import HyperbolicMLR, KleinLinear, LorentzLinear, PoincareLinear
from .lorentz import Lorentz
from .poincare import PoincareBall

__all__ = [
    "HyperbolicMLR",
    "Klein",
    "KleinLinear",
    "Lorentz",
    "LorentzLinear",
    "PoincareBall",
    "PoincareLinear",
]
