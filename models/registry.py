"""Every reference model by name: how to build it at its command line's defaults, one training
batch of the shape it trains on, and its training step.

The model-step benchmark (``bench/test_models.py``) and the compile tests build every model through
:data:`REGISTRY`, so a model added here is measured and compiled without more code.

Example::

    >>> entry = REGISTRY["iwae-k5"]
    >>> _ = torch.manual_seed(0)
    >>> model = entry.build()
    >>> x, y = entry.batch(torch.Generator().manual_seed(0))
    >>> entry.loss(model, (x, y)).shape
    torch.Size([])
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

import vaekernels

from .adversarial import Optimizers
from .factorvae import FactorVAE
from .grae import Autoencoder
from .pixelcnnpp import MixtureModel, PixelCNNPlusPlus
from .pixelsnail import PixelSNAIL
from .pixelvae import GatedDecoder, LatentAutoregressiveModel
from .shapes import Shapes
from .vlae import LocalWindowDecoder
from .zoo import build_model

Batch = tuple


@dataclass(frozen=True)
class ModelEntry:
    """One model: ``build(**overrides)`` at its CLI defaults (``small`` holds overrides that give a
    small model of the same structure, for tests), ``batch(generator, batch_size=None)`` one
    training batch at the CLI's batch size (made up, with the data's shape and value range),
    ``loss(model, batch)`` the scalar it minimises, and :meth:`step`, one training step."""

    name: str
    description: str
    build: Callable[..., nn.Module]
    batch: Callable[..., Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    lr: float = 1e-3
    adam_eps: float = 1e-8
    small: dict = field(default_factory=dict)
    # Models that train several players (FactorVAE): (model, optimizers, batch) -> the loss.
    train_step: Callable[[nn.Module, object, Batch], torch.Tensor] | None = None

    def optimizer(self, model: nn.Module):
        """What :meth:`step` updates the parameters with: Adam (its fused kernel, one pass over all
        parameters rather than a few ops per parameter), or one Adam per player."""
        if self.train_step is not None:
            return Optimizers(model.players(), self.lr)
        return torch.optim.Adam(model.parameters(), lr=self.lr, eps=self.adam_eps, fused=True)

    def step(self, model: nn.Module, optimizer, batch: Batch, loss_fn=None) -> torch.Tensor:
        """One training step; ``loss_fn`` (default :attr:`loss`) may be a compiled version of it."""
        if self.train_step is not None:
            return self.train_step(model, optimizer, batch)
        loss = (loss_fn or self.loss)(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()


MNIST_PIXELS = 28 * 28


def binary_digits(default_batch: int, image_shape=(MNIST_PIXELS,), labels: bool = True):
    """Batches of binary images about as dense as binarised MNIST's strokes (13% ones), with labels."""
    def batch(generator: torch.Generator, batch_size: int | None = None) -> Batch:
        n = batch_size or default_batch
        x = torch.bernoulli(torch.full((n, *image_shape), 0.13), generator=generator)
        return x, torch.randint(0, 10, (n,), generator=generator) if labels else None
    return batch


def byte_digits(default_batch: int, scale: str):
    """Batches of 256-level images [B, 1, 28, 28]: in [-1, 1] (``"signed"``) or [0, 1] flattened (``"unit"``)."""
    def batch(generator: torch.Generator, batch_size: int | None = None) -> Batch:
        levels = torch.randint(0, 256, (batch_size or default_batch, 1, 28, 28), generator=generator).float()
        x = levels / 127.5 - 1 if scale == "signed" else (levels / 255).flatten(1)
        return x, None
    return batch


def shapes_batch(default_batch: int):
    shapes = Shapes()

    def batch(generator: torch.Generator, batch_size: int | None = None) -> Batch:
        images, _ = shapes.sample(batch_size or default_batch, generator)
        return images.flatten(1).float(), None
    return batch


ZOO_SMALL = {"latent_dim": 4, "hidden_dim": 16}


def zoo_entry(name: str, model: str, description: str, **options) -> ModelEntry:
    """A likelihood-zoo model on binarised MNIST at ``python -m models.train``'s defaults, batch 100."""
    defaults = {"arch": "mlp", "likelihood": "bernoulli", "k": 1, "latent_dim": 50, "hidden_dim": 200,
                "beta": 0.5 if model == "beta-vae" else 1.0, "num_classes": 10 if model == "cvae" else 0}
    if model in ("hvae", "hiwae"):
        defaults.update(latent_dim=100, hidden_dim=100)
    settings = {**defaults, **options}

    def build(**overrides):
        return build_model(model, MNIST_PIXELS, (28, 28), **{**settings, **overrides})

    return ModelEntry(name, description, build, binary_digits(100), zoo_loss, adam_eps=1e-4, small=ZOO_SMALL)


def zoo_loss(net, batch):
    return net(*batch)[0]


def autoregressive_loss(net, batch):
    return net.loss(batch[0]).mean()


def gated_pixelcnn_loss(net, batch):
    x, y = batch
    return net.nll(x, y).mean()


def grae_loss(columns):
    def loss(net, batch):
        return net.loss(batch[0], 0.2, columns, None)
    return loss


def factor_vae_step(model, optimizers, batch):
    return model.train_step(batch[0], None, None, optimizers)["loss"]


def gated_pixelcnn(channels: int = 32, layers: int = 6):
    return vaekernels.nn.GatedPixelCNN(1, channels, layers, levels=2, num_classes=10)


def pixelcnn_plus_plus(filters: int = 32, blocks: int = 3, mixtures: int = 5):
    return MixtureModel(PixelCNNPlusPlus(1, filters, blocks, mixtures))


def pixelsnail(filters: int = 32, blocks: int = 2, resnets: int = 2, key_channels: int = 16, heads: int = 2,
               mixtures: int = 5):
    return MixtureModel(PixelSNAIL(1, filters, blocks, resnets, key_channels, heads, mixtures))


def pixelvae(latent_dim: int = 16, channels: int = 32):
    return LatentAutoregressiveModel(GatedDecoder(latent_dim, channels), latent_dim)


def vlae(latent_dim: int = 16, channels: int = 32):
    return LatentAutoregressiveModel(LocalWindowDecoder(latent_dim, channels), latent_dim)


def grae(method: str, latent_dim: int = 8, hidden_dim: int = 256):
    return Autoencoder(method, "mlp", latent_dim, hidden_dim)


def factor_vae(latent_dim: int = 10):
    return FactorVAE(64 * 64, (64, 64), arch="conv64", latent_dim=latent_dim)


SMALL_PIXEL_MIXTURE = {"filters": 8, "blocks": 1, "mixtures": 2}


def _entries() -> list[ModelEntry]:
    binary_images = binary_digits(32, (1, 28, 28), labels=False)
    return [
        zoo_entry("vae", "vae", "VAE, MLP 784-200-200-50, Bernoulli, batch 100"),
        zoo_entry("beta-vae", "beta-vae", "beta-VAE (beta 0.5), as vae"),
        zoo_entry("capacity-vae", "capacity-vae", "beta-VAE with controlled capacity (Burgess et al.)"),
        zoo_entry("geco", "geco", "GECO: min KL s.t. reconstruction <= kappa^2"),
        zoo_entry("cvae", "cvae", "conditional VAE, one-hot labels into encoder and decoder"),
        zoo_entry("iwae-k5", "iwae", "IWAE, k = 5", k=5),
        zoo_entry("iwae-k50", "iwae", "IWAE, k = 50", k=50),
        zoo_entry("iwae-k50-dreg", "iwae", "IWAE, k = 50, DReG estimator", k=50, estimator="dreg"),
        zoo_entry("geco-iwae", "geco-iwae", "GECO + IWAE, k = 5", k=5),
        zoo_entry("hiwae-k5", "hiwae", "two stochastic layers, IWAE bound, k = 5", k=5),
        zoo_entry("vhp-vae", "vhp-vae", "VHP-VAE: learned hierarchical prior in the Lagrangian"),
        ModelEntry("gated-pixelcnn", "Gated PixelCNN, 6 layers of 32 channels, class-conditional, batch 32",
                   gated_pixelcnn, binary_digits(32, (1, 28, 28)), gated_pixelcnn_loss,
                   small={"channels": 8, "layers": 2}),
        ModelEntry("pixelcnn++", "PixelCNN++, 32 filters, 3 blocks, 5 logistics, batch 32", pixelcnn_plus_plus,
                   byte_digits(32, "signed"), autoregressive_loss, lr=2e-3, small=SMALL_PIXEL_MIXTURE),
        ModelEntry("pixelsnail", "PixelSNAIL, 32 filters, 2 blocks x 2 resnets, 2 heads, batch 32", pixelsnail,
                   byte_digits(32, "signed"), autoregressive_loss, lr=2e-3,
                   small={**SMALL_PIXEL_MIXTURE, "resnets": 1, "key_channels": 4, "heads": 1}),
        ModelEntry("pixelvae", "PixelVAE, latent 16, 3 gated layers of 32 channels, batch 32", pixelvae,
                   binary_images, autoregressive_loss, lr=2e-3, small={"latent_dim": 4, "channels": 8}),
        ModelEntry("vlae", "VLAE, latent 16, 3x3 type-A window, batch 32", vlae, binary_images, autoregressive_loss,
                   lr=2e-3, small={"latent_dim": 4, "channels": 8}),
        ModelEntry("grae-star", "GRAE*, MLP 784-256-256-8 softplus, one sampled Jacobian column, batch 100",
                   functools.partial(grae, "grae-star"), byte_digits(100, "unit"), grae_loss(1),
                   small={"hidden_dim": 16}),
        ModelEntry("grae", "GRAE, exact Jacobian regulariser, as grae-star", functools.partial(grae, "grae"),
                   byte_digits(100, "unit"), grae_loss(None), small={"hidden_dim": 16}),
        ModelEntry("factor-vae", "FactorVAE on 64x64 shapes, conv64, batch 64 (VAE and discriminator steps)",
                   factor_vae, shapes_batch(64), zoo_loss, train_step=factor_vae_step, small={"latent_dim": 4}),
    ]


REGISTRY: dict[str, ModelEntry] = {entry.name: entry for entry in _entries()}
