"""nn.Modules over the vaekernels ops."""

from .iwae import IWAEBound

__all__ = ["IWAEBound"]
