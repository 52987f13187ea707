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

    python -m models.revnet --depth 8 --epochs 1 --limit-train 6000 --out runs/revnet-d8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as nnf
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

import vaekernels
from models._cli import add_training_args, finish_run, json_settings, new_run_dir
from models.data import default_data_dir, load_mnist

MODES = ("reversible", "resnet", "checkpoint")


def residual_function(channels: int, dropout: float = 0.0) -> nn.Sequential:
    """RevNet's F or G: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, channels to channels."""
    layers = [nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
              nn.BatchNorm2d(channels), nn.ReLU()]
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
    raise ValueError(f"models.revnet: mode must be one of {', '.join(MODES)}, got {mode!r}")


class RevNet(nn.Module):
    """A RevNet classifier; ``mode="resnet"`` or ``"checkpoint"`` gives its matched ResNet.

    ``depth`` coupling blocks in all, split evenly over ``stages``; stage s has ``width * 2**s``
    channels (F and G see half of them).

    >>> model = RevNet(depth=4, width=8, stages=2)
    >>> model(torch.randn(3, 1, 28, 28)).shape
    torch.Size([3, 10])
    """

    def __init__(self, depth: int = 8, width: int = 16, stages: int = 2, in_channels: int = 1, classes: int = 10,
                 mode: str = "reversible", dropout: float = 0.0):
        super().__init__()
        if depth < stages or depth % stages:
            raise ValueError(f"models.revnet.RevNet: depth must be a positive multiple of stages = {stages}, "
                             f"got {depth}")
        if width % 2:
            raise ValueError(f"models.revnet.RevNet: width must be even (F and G take half), got {width}")
        self.mode = mode
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        layers = []
        for stage in range(stages):
            channels = width * 2**stage
            if stage:
                layers.append(nn.Conv2d(channels // 2, channels, 1, stride=2, bias=False))
            blocks = [vaekernels.nn.AdditiveCoupling(residual_function(channels // 2, dropout),
                                                     residual_function(channels // 2, dropout))
                      for _ in range(depth // stages)]
            layers.append(trunk(blocks, mode))
        self.stages = nn.Sequential(*layers)
        final = width * 2 ** (stages - 1)
        self.head = nn.Sequential(nn.BatchNorm2d(final), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(final, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


# ----------------------------------------------------------------------------- training


def mnist_tensors(data_dir: Path | None, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST images as float [N, 1, 28, 28] in [0, 1] and labels [N]."""
    images, labels = load_mnist(split, data_dir or default_data_dir())
    return images[:limit].unsqueeze(1).float() / 255, labels[:limit].long()


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int,
                     batch_size: int, lr: float, seed: int, progress: bool = True) -> list[float]:
    """Adam on the cross-entropy; the mean loss of each epoch.

    >>> model = RevNet(depth=2, width=4, stages=1)
    >>> len(train_classifier(model, torch.rand(8, 1, 28, 28), torch.arange(8) % 10, epochs=1, batch_size=4,
    ...                      lr=1e-3, seed=0, progress=False))
    1
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator).split(batch_size)
        bar = tqdm(order, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, dynamic_ncols=True)
        losses = []
        for indices in bar:
            loss = nnf.cross_entropy(model(images[indices]), labels[indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        history.append(sum(losses) / len(losses))
    return history


def fit_on_mnist(model: nn.Module, args) -> tuple[list[float], float, torch.Tensor, torch.Tensor]:
    """Trains ``model`` on the CLI's slice of MNIST; the epochs' mean losses, the seconds they took, and the test
    images and labels."""
    train_x, train_y = mnist_tensors(args.data_dir, "train", args.limit_train)
    test_x, test_y = mnist_tensors(args.data_dir, "test", args.limit_test)
    started = time.perf_counter()
    history = train_classifier(model, train_x, train_y, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               seed=args.seed, progress=not args.no_progress)
    return history, time.perf_counter() - started, test_x, test_y


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = sum((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m models.revnet", description="Train a RevNet (or its matched "
                                     "ResNet) on MNIST; writes checkpoint.pt and metrics.json to --out.")
    parser.add_argument("--mode", choices=MODES, default="reversible")
    parser.add_argument("--depth", type=int, default=8, help="coupling blocks in all")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.0)
    add_training_args(parser, out="runs/revnet", batch_size=64)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = new_run_dir(parser, args.out)
    torch.manual_seed(args.seed)
    model = RevNet(args.depth, args.width, args.stages, mode=args.mode, dropout=args.dropout)
    history, seconds, test_x, test_y = fit_on_mnist(model, args)
    metrics = {"settings": json_settings(args), "train_loss": history, "train_seconds": seconds,
               "test_accuracy": accuracy(model, test_x, test_y)}
    return finish_run(out, model, metrics)


if __name__ == "__main__":
    main()
