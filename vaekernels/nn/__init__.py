"""nn.Modules over the vaekernels ops."""

from .iwae import IWAEBound
from .jacobian import GRAERegularizer
from .reversible import AdditiveCoupling, AffineCoupling, InvertibleDownsample, ReversibleSequential

__all__ = ["AdditiveCoupling", "AffineCoupling", "GRAERegularizer", "IWAEBound", "InvertibleDownsample",
           "ReversibleSequential"]
