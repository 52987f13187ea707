"""PixelVAE (Gulrajani et al. 2017) on dynamically binarised MNIST: a VAE whose decoder is a
shallow PixelCNN conditioned on the latent z.

Encoder: two stride-2 convolutions and a linear layer to the mean and log-variance of a
diagonal Gaussian q(z | x). Decoder: three Gated PixelCNN layers (vaekernels.nn.GatedPixelCNNLayer:
no blind spot, z added inside every gate) and a 1x1 head giving one Bernoulli logit per pixel.
The loss is the negative ELBO, -E_q log p(x | z) + KL(q || N(0, I)), with
:func:`vaekernels.bernoulli_log_prob` and :func:`vaekernels.gaussian_kl`; the test number is
that bound on the NLL, in nats.

    nice -n 10 python -m models train pixelvae --minutes 2
"""

from __future__ import annotations

import torch
from torch import nn

import vaekernels
from models.autoregressive.pixelcnnpp import sample_autoregressively
from vaekernels.nn import GatedPixelCNNLayer


class Encoder(nn.Module):
    """x [B, 1, 28, 28] -> mean and log-variance [B, latent_dim] of q(z | x)."""

    def __init__(self, latent_dim: int, filters: int = 32):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, filters, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(filters, 2 * filters, 4, 2, 1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * filters * 7 * 7, 2 * latent_dim),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.convs(x).chunk(2, dim=1)


class LatentAutoregressiveModel(nn.Module):
    """A VAE with an autoregressive Bernoulli decoder ``decoder(x, z) -> logits [B, 1, 28, 28]``
    (logit (i, j) may read only the pixels before (i, j)): the negative ELBO as ``loss``, ancestral
    sampling (z from the prior, then pixel by pixel) as ``sample``."""

    def __init__(self, decoder: nn.Module, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = Encoder(latent_dim)
        self.decoder = decoder

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        mean, log_var = self.encoder(x)
        z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
        logits = self.decoder(x, z)
        log_px = vaekernels.bernoulli_log_prob(logits.flatten(1).unsqueeze(1), x.flatten(1)).squeeze(1)
        return vaekernels.gaussian_kl(mean, log_var) - log_px

    def sample(self, n: int, generator: torch.Generator, size: int = 28) -> torch.Tensor:
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)

        def step(canvas, i, j):
            probs = torch.sigmoid(self.decoder(canvas, z)[:, :, i, j])
            return torch.bernoulli(probs, generator=generator)

        return sample_autoregressively(step, n, device, size=size)


class GatedDecoder(nn.Module):
    """A shallow Gated PixelCNN: a type-A layer of kernel 7, then type-B layers of kernel 3, z in every gate."""

    def __init__(self, latent_dim: int, channels: int = 32, layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(
            GatedPixelCNNLayer(
                1 if n == 0 else channels,
                channels,
                7 if n == 0 else 3,
                "A" if n == 0 else "B",
                cond_features=latent_dim,
            )
            for n in range(layers)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, 1, 1))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        v = h = x
        for layer in self.layers:
            v, h, _ = layer(v, h, z)
        return self.head(h)
