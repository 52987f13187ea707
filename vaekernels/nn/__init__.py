"""nn.Modules over the vaekernels ops."""

from .causal_attention import CausalAttention2d
from .iwae import BernoulliLinear, IWAEBound
from .jacobian import GRAERegularizer
from .pixelcnn import GatedPixelCNN, GatedPixelCNNLayer, MaskedConv2d
from .reversible import AdditiveCoupling, AffineCoupling, InvertibleDownsample, ReversibleSequential

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "BernoulliLinear",
    "CausalAttention2d",
    "GRAERegularizer",
    "GatedPixelCNN",
    "GatedPixelCNNLayer",
    "IWAEBound",
    "InvertibleDownsample",
    "MaskedConv2d",
    "ReversibleSequential",
]
