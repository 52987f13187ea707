"""A small PixelSNAIL (Chen et al. 2018) on 256-level MNIST: causal convolutions for the local
context and strictly causal self-attention (:func:`vaekernels.causal_attention`, memory linear in
the 784 positions) for the whole past, with the discretised logistic mixture likelihood.

Each block: gated ResNets on down-right-shifted 2x2 convolutions (which alone would miss the
pixels above and to the right), then attention whose queries are the block's features and whose
keys and values are the features with the image appended; pixel i reads only pixels j < i.

    nice -n 10 python -m models train pixelsnail --minutes 2
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.autoregressive.pixelcnnpp import (
    DownRightShiftedConv2d,
    DownShiftedConv2d,
    GatedResnet,
    down_shift,
    right_shift,
)
from vaekernels.nn import CausalAttention2d
from vaekernels.reference.logistic_mixture import num_params


class SnailBlock(nn.Module):
    def __init__(self, filters: int, channels: int, resnets: int, key_channels: int, heads: int):
        super().__init__()
        self.resnets = nn.ModuleList(GatedResnet(filters, DownRightShiftedConv2d, (2, 2)) for _ in range(resnets))
        self.attention = CausalAttention2d(filters, filters + channels, key_channels, filters, heads)
        self.mix = nn.Conv2d(filters, filters, 1)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            h = resnet(h)
        return h + self.mix(F.elu(self.attention(h, torch.cat([h, x], 1))))


class PixelSNAIL(nn.Module):
    """``forward(x)`` maps x [B, C, H, W] in [-1, 1] to mixture params [B, P, H, W]."""

    def __init__(
        self,
        channels: int = 1,
        filters: int = 32,
        blocks: int = 2,
        resnets: int = 2,
        key_channels: int = 16,
        heads: int = 2,
        mixtures: int = 5,
    ):
        super().__init__()
        self.channels, self.mixtures = channels, mixtures
        self.init_up = DownShiftedConv2d(channels + 1, filters, (1, 3))
        self.init_left = DownRightShiftedConv2d(channels + 1, filters, (2, 1))
        self.blocks = nn.ModuleList(SnailBlock(filters, channels, resnets, key_channels, heads) for _ in range(blocks))
        self.head = nn.Conv2d(filters, num_params(channels, mixtures), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        # Strictly before each pixel: the row above (down-shifted) and the pixel to its left.
        h = down_shift(self.init_up(padded)) + right_shift(self.init_left(padded))
        for block in self.blocks:
            h = block(h, x)
        return self.head(F.elu(h))
