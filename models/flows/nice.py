"""NICE (Dinh et al., 2015) on MNIST: an additive-coupling flow trained by exact likelihood.

Pixels are dequantised to x = (pixel + u) / 256 in [0, 1], taken to logit space as in MAF
(h = logit(a + (1 - 2a) x), a = 1e-6, its Jacobian counted), and their order fixed once so
that the two halves the couplings split are the even and the odd pixels. The flow is a
:class:`vaekernels.nn.ReversibleSequential` of :class:`~vaekernels.nn.AdditiveCoupling` blocks
(each two NICE coupling layers, one per half) with MLPs of ``hidden`` units, then NICE's
diagonal scaling; the prior is the standard logistic.
log p(x) = log p(z) + sum(log_scale) + log|dh/dx|.

Reports the test NLL in nats (of the dequantised data on [0, 1]^784) and in bits per dim of the
8-bit images, and writes ``samples.png``::

    python -m models train nice --epochs 1
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf
from torch import nn

import vaekernels

D = 784
LOGIT_ALPHA = 1e-6


def mlp(dim: int, hidden: int, layers: int) -> nn.Sequential:
    modules, width = [], dim
    for _ in range(layers):
        modules += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    modules.append(nn.Linear(width, dim))
    return nn.Sequential(*modules)


class NICE(nn.Module):
    """The NICE flow on [B, 784] inputs.

    >>> flow = NICE(blocks=1, hidden=8, layers=1)
    >>> x = torch.rand(3, 784)
    >>> flow.log_prob(x).shape, torch.allclose(flow.inverse(flow(x)[0]), x, atol=1e-5)
    (torch.Size([3]), True)
    """

    def __init__(self, blocks: int = 2, hidden: int = 500, layers: int = 4):
        super().__init__()
        order = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("unorder", torch.argsort(order), persistent=False)
        self.flow = vaekernels.nn.ReversibleSequential(
            *[
                vaekernels.nn.AdditiveCoupling(mlp(D // 2, hidden, layers), mlp(D // 2, hidden, layers))
                for _ in range(blocks)
            ]
        )
        self.log_scale = nn.Parameter(torch.zeros(D))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z and log|det dz/dx| (the couplings are volume-preserving: only the scaling counts)."""
        z = self.flow(x[:, self.order]) * torch.exp(self.log_scale)
        return z, self.log_scale.sum().expand(len(x))

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return self.flow.inverse(z * torch.exp(-self.log_scale))[:, self.unorder]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) for x in [0, 1]^784: the flow's density of h = logit(a + (1 - 2a) x) and its Jacobian."""
        s = LOGIT_ALPHA + (1 - 2 * LOGIT_ALPHA) * x
        h = torch.log(s) - torch.log1p(-s)
        logit_logdet = (math.log(1 - 2 * LOGIT_ALPHA) - torch.log(s) - torch.log1p(-s)).sum(1)
        z, logdet = self(h)
        log_prior = -(nnf.softplus(z) + nnf.softplus(-z)).sum(1)  # standard logistic
        return log_prior + logdet + logit_logdet

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images in [0, 1]: logistic noise through the inverse flow and the inverse logit."""
        u = torch.rand(n, D, generator=generator).clamp(1e-6, 1 - 1e-6)
        h = self.inverse(torch.log(u) - torch.log1p(-u))
        return (torch.sigmoid(h) - LOGIT_ALPHA) / (1 - 2 * LOGIT_ALPHA)


def dequantised(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return (images.flatten(1).float() + torch.rand(images.shape[0], D, generator=generator)) / 256


def bits_per_dim(nll_nats: float) -> float:
    """Bits per dim of the 8-bit images for an NLL of the dequantised data on [0, 1]^784."""
    return (nll_nats + D * math.log(256)) / (D * math.log(2))
