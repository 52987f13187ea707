"""RevNet (Gomez et al., 2017) on MNIST, and its matched ResNet.

One architecture, three ways to backpropagate through its trunk (``--mode``):

- ``reversible``: each stage is a :class:`vaekernels.nn.ReversibleSequential` of additive
  couplings; backward rebuilds activations instead of storing them.
- ``resnet``: the same coupling blocks (same F/G, width, depth, stages) run as an ordinary
  residual network, every activation kept for backward: y1 = x1 + F(x2), y2 = x2 + G(y1).
- ``checkpoint``: the ordinary network with ``torch.utils.checkpoint`` around each block.

Between stages a strided 1x1 convolution doubles the channels and halves the resolution (as in
RevNet, the downsampling is not reversible); a stem convolution lifts the image to ``width``
channels and a pooled linear head classifies. F and G are RevNet's pre-activation residual
functions BN-ReLU-conv3x3-BN-ReLU-conv3x3 on half the channels, with optional dropout.

Example::

    python -m models train revnet --depth 8 --epochs 1 --limit-train 6000
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import vaekernels

MODES = ("reversible", "resnet", "checkpoint")


def residual_function(channels: int, dropout: float = 0.0) -> nn.Sequential:
    """RevNet's F or G: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, channels to channels."""
    layers = [
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
    ]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
    return nn.Sequential(*layers)


class CheckpointedSequential(nn.Sequential):
    """The blocks in order, each under ``torch.utils.checkpoint`` (the non-reentrant variant)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = checkpoint(block, x, use_reentrant=False) if torch.is_grad_enabled() else block(x)
        return x


def trunk(blocks: list[nn.Module], mode: str) -> nn.Module:
    """The blocks as one stage, backpropagated the way ``mode`` says."""
    if mode == "reversible":
        return vaekernels.nn.ReversibleSequential(*blocks)
    if mode == "resnet":
        return nn.Sequential(*blocks)
    if mode == "checkpoint":
        return CheckpointedSequential(*blocks)
    raise ValueError(f"models.flows.revnet: mode must be one of {', '.join(MODES)}, got {mode!r}")


class RevNet(nn.Module):
    """A RevNet classifier; ``mode="resnet"`` or ``"checkpoint"`` gives its matched ResNet.

    ``depth`` coupling blocks in all, split evenly over ``stages``; stage s has ``width * 2**s``
    channels (F and G see half of them).

    >>> model = RevNet(depth=4, width=8, stages=2)
    >>> model(torch.randn(3, 1, 28, 28)).shape
    torch.Size([3, 10])
    """

    def __init__(
        self,
        depth: int = 8,
        width: int = 16,
        stages: int = 2,
        in_channels: int = 1,
        classes: int = 10,
        mode: str = "reversible",
        dropout: float = 0.0,
    ):
        super().__init__()
        if depth < stages or depth % stages:
            raise ValueError(
                f"models.flows.revnet.RevNet: depth must be a positive multiple of stages = {stages}, got {depth}"
            )
        if width % 2:
            raise ValueError(f"models.flows.revnet.RevNet: width must be even (F and G take half), got {width}")
        self.mode = mode
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        layers = []
        for stage in range(stages):
            channels = width * 2**stage
            if stage:
                layers.append(nn.Conv2d(channels // 2, channels, 1, stride=2, bias=False))
            blocks = [
                vaekernels.nn.AdditiveCoupling(
                    residual_function(channels // 2, dropout), residual_function(channels // 2, dropout)
                )
                for _ in range(depth // stages)
            ]
            layers.append(trunk(blocks, mode))
        self.stages = nn.Sequential(*layers)
        final = width * 2 ** (stages - 1)
        self.head = nn.Sequential(
            nn.BatchNorm2d(final), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(final, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


# ----------------------------------------------------------------------------- training
