"""nn.Modules over the vaekernels ops."""

from .iwae import IWAEBound
from .pixelcnn import GatedPixelCNN, GatedPixelCNNLayer, MaskedConv2d

__all__ = ["GatedPixelCNN", "GatedPixelCNNLayer", "IWAEBound", "MaskedConv2d"]
