"""nn.Modules over the vaekernels ops."""

from .iwae import IWAEBound
from .jacobian import GRAERegularizer

__all__ = ["GRAERegularizer", "IWAEBound"]
