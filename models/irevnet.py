"""i-RevNet (Jacobsen et al., 2018) on MNIST: a bijective classifier trunk.

The trunk is one :class:`vaekernels.nn.ReversibleSequential`: per stage, an
:class:`~vaekernels.nn.InvertibleDownsample` (space-to-depth, 2x2) followed by additive
couplings, so nothing is discarded on the way to the features (28x28x1 -> 14x14x4 -> 7x7x16)
and the input is rebuilt exactly from them. A pooled linear head classifies. F and G are
conv3x3-BN-ReLU-conv3x3 bottlenecks of ``hidden`` channels on half the trunk's channels.

Reports test accuracy and the relative error of rebuilding test images from their features,
and writes ``reconstructions.png`` (test digits, each followed by the one rebuilt from its
features)::

    python -m models.irevnet --blocks 4 --epochs 1 --limit-train 6000 --out runs/irevnet
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import vaekernels
from models._cli import add_training_args, finish_run, json_settings, new_run_dir
from models.iwae import save_grid
from models.revnet import accuracy, fit_on_mnist


def bottleneck(channels: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
                         nn.Conv2d(hidden, channels, 3, padding=1))


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
            layers += [vaekernels.nn.AdditiveCoupling(bottleneck(channels // 2, hidden),
                                                      bottleneck(channels // 2, hidden)) for _ in range(blocks)]
        self.trunk = vaekernels.nn.ReversibleSequential(*layers)
        self.head = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(channels, classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def inverse(self, features: torch.Tensor) -> torch.Tensor:
        return self.trunk.inverse(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m models.irevnet", description="Train an i-RevNet on MNIST.")
    parser.add_argument("--blocks", type=int, default=4, help="couplings per stage")
    parser.add_argument("--hidden", type=int, default=32)
    add_training_args(parser, out="runs/irevnet", batch_size=64)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = new_run_dir(parser, args.out)
    torch.manual_seed(args.seed)
    model = IRevNet(args.blocks, args.hidden)
    history, seconds, test_x, test_y = fit_on_mnist(model, args)
    model.eval()
    with torch.no_grad():
        x = test_x[:500]
        rebuilt = model.inverse(model.features(x))
    metrics = {"settings": json_settings(args), "train_loss": history, "train_seconds": seconds, "test_accuracy": accuracy(model, test_x, test_y),
               "reconstruction_rel_err": ((rebuilt - x).norm() / x.norm()).item()}
    pairs = torch.stack([x[:50].flatten(1), rebuilt[:50].flatten(1)], 1).reshape(100, 784)
    save_grid(out / "reconstructions.png", pairs.clamp(0, 1), 10)
    return finish_run(out, model, metrics)


if __name__ == "__main__":
    main()
