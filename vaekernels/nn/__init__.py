"""nn.Modules over the vaekernels ops."""

from .iwae import IWAEBound
from .reversible import AdditiveCoupling, AffineCoupling, InvertibleDownsample, ReversibleSequential

__all__ = ["AdditiveCoupling", "AffineCoupling", "IWAEBound", "InvertibleDownsample", "ReversibleSequential"]
