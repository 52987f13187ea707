"""Pieces the adversarial models share: the non-saturating GAN losses, the improved GAN training
techniques of Salimans et al. (2016) as options, and several named optimisers checkpointed as one.

The techniques (seed 001, "Improved techniques for training GANs"):

* feature matching: the generator matches the mean of an intermediate discriminator layer on real
  and generated data, ||E d(x) - E d(G(z))||^2, instead of maximising the discriminator's output;
* historical averaging: each player's loss gains ||theta - (1/T) sum_t theta_t||^2, the running
  mean of its own past parameters;
* one-sided label smoothing: the discriminator's target for real data is 1 - alpha (fakes keep 0);
* virtual batch normalisation: each example is normalised with the statistics of a fixed reference
  batch joined with that example alone, so examples of one batch no longer depend on each other.

Example::

    >>> real, fake = torch.tensor([3.0, 2.0]), torch.tensor([-3.0, -1.0])
    >>> round(discriminator_loss(real, fake).item(), 3), round(discriminator_loss(real, fake, 0.1).item(), 3)
    (0.269, 0.519)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from models.training.trainer import Optimizers
from models.vae.zoo import mlp


def _fail(fn: str, message: str, error: type = ValueError):
    raise error(f"models.adversarial.{fn}: {message}")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of a discriminator calling real data 1 (or 1 - ``smoothing``: one-sided label smoothing)
    and fakes 0, both halves averaged and summed."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, 1.0 - smoothing))
    return real + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss -log D(G(z)) (Goodfellow et al.), strong while D wins.

    >>> round(generator_loss(torch.zeros(3)).item(), 4)  # D undecided: log 2
    0.6931
    """
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def feature_matching_loss(real_features: torch.Tensor, fake_features: torch.Tensor) -> torch.Tensor:
    """||mean over the batch of d(x) - mean of d(G(z))||^2; the real side is a fixed target.

    >>> feature_matching_loss(torch.ones(4, 3), torch.zeros(2, 3))
    tensor(3.)
    """
    return (real_features.detach().mean(0) - fake_features.mean(0)).square().sum()


def leaky_mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2) -> nn.Sequential:
    """The zoo's :func:`~models.vae.zoo.mlp` with LeakyReLU(0.2): the discriminators' and encoders' net.

    >>> leaky_mlp(3, 8, 1)(torch.zeros(2, 3)).shape
    torch.Size([2, 1])
    """
    return mlp(in_dim, hidden_dim, out_dim, layers, partial(nn.LeakyReLU, 0.2))


class HistoricalAverage(nn.Module):
    """The running mean of a player's past parameters and the penalty ||theta - mean||^2 against it.

    Call :meth:`update` after each optimiser step; the mean is held in buffers, so a checkpoint keeps it.

    >>> layer = nn.Linear(2, 1)
    >>> history = HistoricalAverage(list(layer.parameters()))
    >>> history.penalty(list(layer.parameters())).item()  # the mean starts at the initial parameters
    0.0
    """

    def __init__(self, parameters: list):
        super().__init__()
        for index, p in enumerate(parameters):
            self.register_buffer(f"mean{index}", p.detach().clone())
        self.register_buffer("count", torch.ones((), dtype=torch.long))

    def _means(self):
        return [getattr(self, f"mean{index}") for index in range(len(self._buffers) - 1)]

    def penalty(self, parameters: list) -> torch.Tensor:
        return sum((p - mean).square().sum() for p, mean in zip(parameters, self._means(), strict=True))

    @torch.no_grad()
    def update(self, parameters: list) -> None:
        self.count += 1
        for p, mean in zip(parameters, self._means(), strict=True):
            mean += (p - mean) / self.count


class VirtualBatchNorm(nn.Module):
    """Batch normalisation against a fixed reference batch (Salimans et al. 2016), over dim 1 of [B, C, ...].

    Inside :func:`virtual_batch` the reference batch passes first and each layer keeps its mean and
    mean square (gradients flow through them, as in the paper); every example of the real batch is
    then normalised with the statistics of the reference batch plus itself:
    mean_i = (N m_ref + x_i) / (N + 1), likewise for the mean square. Used outside
    :func:`virtual_batch` it is an error, since there are no reference statistics to use.

    >>> net = nn.Sequential(nn.Linear(3, 4), VirtualBatchNorm(4))
    >>> out = virtual_batch(net, torch.randn(8, 3), torch.randn(5, 3))
    >>> out.shape
    torch.Size([5, 4])
    """

    def __init__(self, features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.reference = None  # (count, mean, mean square) of the reference batch, while one is in use
        self.recording = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(x.dim()) if d != 1]
        if self.recording:
            count = x.numel() // x.shape[1]
            mean, square = x.mean(dims, keepdim=True), x.square().mean(dims, keepdim=True)
            self.reference = (count, mean, square)
        elif self.reference is None:
            _fail(
                "VirtualBatchNorm",
                "no reference statistics: call the network through virtual_batch(net, reference, x)",
                RuntimeError,
            )
        else:
            count, reference_mean, reference_square = self.reference
            own = x[0].numel() // x.shape[1]  # positions per example and channel (1 for [B, C])
            weight = own / (count + own)
            per_example = dims[1:]
            mean = (1 - weight) * reference_mean + weight * (x.mean(per_example, keepdim=True) if per_example else x)
            square = (1 - weight) * reference_square + weight * (
                x.square().mean(per_example, keepdim=True) if per_example else x.square()
            )
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale = torch.rsqrt((square - mean.square()).clamp(min=0) + self.eps) * self.weight.reshape(shape)
        return (x - mean) * scale + self.bias.reshape(shape)


def virtual_batch(net: nn.Module, reference: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``net(x)`` with every :class:`VirtualBatchNorm` in it normalising against ``reference`` (+ the example)."""
    layers = [m for m in net.modules() if isinstance(m, VirtualBatchNorm)]
    for layer in layers:
        layer.recording = True
    try:
        net(reference)
    finally:
        for layer in layers:
            layer.recording = False
    try:
        return net(x)
    finally:
        for layer in layers:
            layer.reference = None  # the statistics belong to this call's graph; none outlive it


@dataclass
class Techniques:
    """The improved-GAN options a model trains with (all off by default)."""

    feature_matching: bool = False
    historical_averaging: float = 0.0  # weight of ||theta - mean_t theta_t||^2 in each player's loss
    label_smoothing: float = 0.0  # alpha: the real target is 1 - alpha
    virtual_batch_norm: bool = False

    def check(self, model: str, supported: tuple[str, ...]) -> None:
        """An error naming ``model`` and the option when an option it does not support is on."""
        if not 0.0 <= self.label_smoothing < 1.0:
            _fail("Techniques", f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.historical_averaging < 0:
            _fail("Techniques", f"historical_averaging must be >= 0, got {self.historical_averaging}")
        for name in TECHNIQUE_NAMES:
            if getattr(self, name) and name not in supported:
                _fail("Techniques", f"{model} does not take {name} (it takes {', '.join(supported) or 'none'})")


TECHNIQUE_NAMES = tuple(field.name for field in fields(Techniques))


class AdversarialModel(nn.Module):
    """Players (named groups of submodules, each with its own optimiser) and the techniques they train with.

    ``PLAYERS`` maps a player's name to the attribute names of its modules (a module may belong to two
    players); ``SUPPORTED`` names the improved-GAN options the model takes. :meth:`update` steps one
    player, with historical averaging when it is on.
    """

    PLAYERS: dict[str, tuple[str, ...]] = {}
    SUPPORTED: tuple[str, ...] = ()

    def __init__(self, techniques: Techniques | None = None):
        super().__init__()
        self.techniques = techniques or Techniques()
        self.techniques.check(type(self).__name__, self.SUPPORTED)

    def _start_histories(self) -> None:
        """Call once the players' modules exist: the historical means start at their initial parameters."""
        if self.techniques.historical_averaging:
            self.histories = nn.ModuleDict(
                {name: HistoricalAverage(self._parameters_of(name)) for name in self.PLAYERS}
            )

    def _parameters_of(self, name: str) -> list:
        return [p for attribute in self.PLAYERS[name] for p in getattr(self, attribute).parameters()]

    def players(self) -> dict:
        return {name: self._parameters_of(name) for name in self.PLAYERS}

    def update(self, optimizers: Optimizers, name: str, loss: torch.Tensor) -> torch.Tensor:
        """One optimiser step of player ``name`` on ``loss`` (+ its historical-averaging penalty); returns
        the loss without the penalty, detached."""
        total = loss
        if self.techniques.historical_averaging:
            penalty = self.histories[name].penalty(self._parameters_of(name))
            total = loss + self.techniques.historical_averaging * penalty
        optimizers.step(name, total)
        if self.techniques.historical_averaging:
            self.histories[name].update(self._parameters_of(name))
        return loss.detach()
