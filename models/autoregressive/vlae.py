"""VLAE, the variational lossy autoencoder (Chen et al. 2017), on dynamically binarised MNIST.

The decoder is autoregressive but sees only a small window: one type-A masked 3x3 convolution
(:class:`vaekernels.nn.MaskedConv2d`: the four causal neighbours of a pixel) followed by 1x1
layers, so it can model local texture (stroke continuity) but not the shape of a digit; global
structure must go through z, which enters as a 28x28 feature map decoded from the latent. The
encoder and the loss (negative ELBO, in nats) are PixelVAE's (:mod:`models.autoregressive.pixelvae`); the KL
term in metrics.json is the information z carries.

    nice -n 10 python -m models train vlae --minutes 2
"""

from __future__ import annotations

import torch
from torch import nn

from vaekernels.nn import MaskedConv2d


class LocalWindowDecoder(nn.Module):
    """logit (i, j) = f(the pixels (i-1, j-1..j+1) and (i, j-1), the z map at (i, j))."""

    def __init__(self, latent_dim: int, channels: int = 32):
        super().__init__()
        self.from_z = nn.Sequential(
            nn.Linear(latent_dim, channels * 7 * 7),
            nn.Unflatten(1, (channels, 7, 7)),
            nn.ReLU(),
            nn.ConvTranspose2d(channels, channels, 4, 2, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(channels, channels, 4, 2, 1),
        )
        self.window = MaskedConv2d(1, channels, 3, mask_type="A")
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, 1, 1))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.window(x) + self.from_z(z))
