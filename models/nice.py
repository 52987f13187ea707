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

    python -m models.nice --epochs 1 --out runs/nice
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as nnf
from torch import nn
from tqdm.auto import tqdm

import vaekernels
from models._cli import add_training_args, finish_run, json_settings, new_run_dir
from models.data import default_data_dir, load_mnist
from models.iwae import save_grid

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
            *[vaekernels.nn.AdditiveCoupling(mlp(D // 2, hidden, layers), mlp(D // 2, hidden, layers))
              for _ in range(blocks)])
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m models.nice", description="Train NICE on MNIST.")
    parser.add_argument("--blocks", type=int, default=2, help="AdditiveCoupling blocks (two NICE layers each)")
    parser.add_argument("--hidden", type=int, default=500)
    parser.add_argument("--layers", type=int, default=4, help="hidden layers per coupling MLP")
    add_training_args(parser, out="runs/nice", batch_size=100, limit_test=False)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = new_run_dir(parser, args.out)
    torch.manual_seed(args.seed)
    data_dir = args.data_dir or default_data_dir()
    train = load_mnist("train", data_dir)[0][: args.limit_train]
    test = dequantised(load_mnist("test", data_dir)[0], torch.Generator().manual_seed(args.seed + 1))
    model = NICE(args.blocks, args.hidden, args.layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    history, started = [], time.perf_counter()
    for epoch in range(args.epochs):
        losses = []
        batches = torch.randperm(len(train), generator=generator).split(args.batch_size)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", disable=args.no_progress, dynamic_ncols=True)
        for indices in bar:
            loss = -model.log_prob(dequantised(train[indices], generator)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(nll=f"{losses[-1]:.1f}", refresh=False)
        history.append(sum(losses) / len(losses))
    seconds = time.perf_counter() - started
    with torch.no_grad():
        nll = -torch.cat([model.log_prob(x) for x in test.split(1000)]).mean().item()
    metrics = {"settings": json_settings(args), "train_nll": history, "train_seconds": seconds, "test_nll_nats": nll,
               "test_bits_per_dim": bits_per_dim(nll)}
    save_grid(out / "samples.png", model.sample(100, torch.Generator().manual_seed(args.seed)).clamp(0, 1), 10)
    return finish_run(out, model, metrics)


if __name__ == "__main__":
    main()
