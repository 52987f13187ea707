"""nn.Modules over the vaekernels ops."""

from .causal_attention import CausalAttention2d
from .iwae import IWAEBound
from .pixelcnn import GatedPixelCNN, GatedPixelCNNLayer, MaskedConv2d

__all__ = ["CausalAttention2d", "GatedPixelCNN", "GatedPixelCNNLayer", "IWAEBound", "MaskedConv2d"]
