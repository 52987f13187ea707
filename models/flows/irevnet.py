"""i-RevNet (Jacobsen et al., 2018) on MNIST: a bijective classifier trunk.

The trunk is one :class:`vaekernels.nn.ReversibleSequential`: per stage, an
:class:`~vaekernels.nn.InvertibleDownsample` (space-to-depth, 2x2) followed by additive
couplings, so nothing is discarded on the way to the features (28x28x1 -> 14x14x4 -> 7x7x16)
and the input is rebuilt exactly from them. A pooled linear head classifies. F and G are
conv3x3-BN-ReLU-conv3x3 bottlenecks of ``hidden`` channels on half the trunk's channels.

Reports test accuracy and the relative error of rebuilding test images from their features,
and writes ``reconstructions.png`` (test digits, each followed by the one rebuilt from its
features)::

    python -m models train irevnet --blocks 4 --epochs 1 --limit-train 6000
"""

from __future__ import annotations

import torch
from torch import nn

import vaekernels


def bottleneck(channels: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(),
        nn.Conv2d(hidden, channels, 3, padding=1),
    )


class IRevNet(nn.Module):
    """A bijective trunk (``features``, ``inverse``) and a classifier head.

    >>> model = IRevNet(blocks=1, hidden=4).eval()
    >>> x = torch.rand(2, 1, 28, 28)
    >>> model.features(x).shape, torch.allclose(model.inverse(model.features(x)), x, atol=1e-5)
    (torch.Size([2, 16, 7, 7]), True)
    """

    def __init__(self, blocks: int = 4, hidden: int = 32, stages: int = 2, in_channels: int = 1, classes: int = 10):
        super().__init__()
        layers, channels = [], in_channels
        for _ in range(stages):
            channels *= 4
            layers.append(vaekernels.nn.InvertibleDownsample(2))
            layers += [
                vaekernels.nn.AdditiveCoupling(bottleneck(channels // 2, hidden), bottleneck(channels // 2, hidden))
                for _ in range(blocks)
            ]
        self.trunk = vaekernels.nn.ReversibleSequential(*layers)
        self.head = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def inverse(self, features: torch.Tensor) -> torch.Tensor:
        return self.trunk.inverse(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
