"""The adversarial zoo on MNIST: InfoGAN, the adversarial autoencoder, adversarial variational Bayes
and BiGAN, each an :class:`~models.adversarial.AdversarialModel` with ``train_step`` (one update of
every player) and ``pictures`` (the PNG grids of a run).

========  =====================================================================================
InfoGAN   G(z, c), c = (categorical, continuous codes); Q(c | x) shares D's body; the variational
          bound on I(c; G(z, c)) is E log Q(c | G(z, c)) (+ H(c)), maximised by G and Q
          (Chen et al. 2016)
AAE       deterministic encoder whose codes a discriminator pushes to a prior (Gaussian, mixture
          of 10 Gaussians, swiss roll); one-hot labels into the discriminator (with the prior's
          matching component) or into the decoder (Makhzani et al. 2015)
AVB       black-box q(z | x) = E(x, eps); the KL term replaced by T(x, z), trained as a
          discriminator of (x, z ~ q) against (x, z ~ p) so that T* = log q(z|x) - log p(z)
          (Mescheder et al. 2017)
BiGAN     encoder E and generator G; D tells (x, E(x)) from (G(z), z) (Donahue et al. 2016)
========  =====================================================================================

MLPs throughout (a CPU budget). The likelihood models' decoders are Bernoulli through the zoo's
:class:`~models.vae.zoo.Likelihood` (the fused log-density); InfoGAN's continuous codes are scored by
the fused Gaussian log-density and AVB's T adds the fused log N(z; 0, I).

Example::

    >>> from models.adversarial import Optimizers
    >>> model = AAE(16, (4, 4), latent_dim=2, hidden_dim=8, prior="mixture")
    >>> optimizers = Optimizers(model.players(), lr=1e-3)
    >>> stats = model.train_step(torch.bernoulli(torch.full((6, 16), 0.5)), torch.arange(6) % 10, None, optimizers)
    >>> sorted(stats)
    ['discriminator', 'reconstruction', 'regularisation']
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

import vaekernels
from models.adversarial import (
    TECHNIQUE_NAMES,
    AdversarialModel,
    Optimizers,
    Techniques,
    VirtualBatchNorm,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
    leaky_mlp,
    virtual_batch,
)
from models.training.pictures import reconstruction_rows
from models.vae.zoo import Likelihood, standard_normal_log_prob

PRIORS = ("gaussian", "mixture", "swiss-roll")
CONDITIONS = ("none", "discriminator", "decoder")
REFERENCE_BATCH = 64  # the virtual batch norm's fixed reference batch


def _fail(fn: str, message: str, error: type = ValueError):
    raise error(f"models.adversarial.gans.{fn}: {message}")


def sample_prior(
    kind: str, n: int, dim: int, labels: torch.Tensor | None = None, generator=None, classes: int = 10
) -> torch.Tensor:
    """n draws [n, dim] of an AAE prior; with ``labels`` [n], each from the part its label owns.

    ``mixture``: 10 2-D Gaussians with means on a circle of radius 4, standard deviations 0.5 along the
    radius and 0.1 across it (Makhzani et al.'s elongated components); ``swiss-roll``: the 2-D spiral
    r = theta / pi, theta in [pi, 4 pi], uniform along theta, label k owning its k-th tenth;
    ``gaussian``: N(0, I) in any dimension, whatever the label.

    >>> z = sample_prior("mixture", 1000, 2, torch.full((1000,), 3), torch.Generator().manual_seed(0))
    >>> [round(v, 1) for v in z.mean(0).tolist()]  # component 3: angle 2 pi 3 / 10
    [-1.2, 3.8]
    """
    if kind not in PRIORS:
        _fail("sample_prior", f"kind must be one of {PRIORS}, got {kind!r}")
    if kind != "gaussian" and dim != 2:
        _fail("sample_prior", f"the {kind} prior is 2-D: dim must be 2, got {dim}")
    if kind == "gaussian":
        return torch.randn((n, dim), generator=generator)
    if labels is None:
        labels = torch.randint(0, classes, (n,), generator=generator)
    if kind == "mixture":
        angle = 2 * math.pi * labels.float() / classes
        radial = 4 + 0.5 * torch.randn(n, generator=generator)
        across = 0.1 * torch.randn(n, generator=generator)
        return torch.stack(
            [
                radial * torch.cos(angle) - across * torch.sin(angle),
                radial * torch.sin(angle) + across * torch.cos(angle),
            ],
            1,
        )
    position = (labels.float() + torch.rand(n, generator=generator)) / classes
    theta = math.pi * (1 + 3 * position)
    radius = theta / math.pi
    return torch.stack([radius * torch.cos(theta), radius * torch.sin(theta)], 1) + 0.05 * torch.randn(
        (n, 2), generator=generator
    )


def generator_net(code_dim: int, hidden_dim: int, data_dim: int, virtual: bool) -> nn.Sequential:
    """codes -> pixel logits: two ReLU layers, each normalised (batch norm, or virtual batch norm).

    >>> generator_net(3, 8, 16, virtual=False)(torch.zeros(2, 3)).shape
    torch.Size([2, 16])
    """
    norm = VirtualBatchNorm if virtual else nn.BatchNorm1d
    return nn.Sequential(
        nn.Linear(code_dim, hidden_dim),
        norm(hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, hidden_dim),
        norm(hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, data_dim),
    )


def features_net(in_dim: int, hidden_dim: int) -> nn.Sequential:
    """A discriminator's body: its last layer's output d(x) is what feature matching matches."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.LeakyReLU(0.2), nn.Linear(hidden_dim, hidden_dim), nn.LeakyReLU(0.2)
    )


def _one_hot(fn: str, y, classes: int) -> torch.Tensor:
    if y is None:
        _fail(fn, "this model is conditioned on labels: y must be a tensor of class indices, got None")
    return F.one_hot(y.long(), classes).to(torch.get_default_dtype())


class _ImageGAN(AdversarialModel):
    """What InfoGAN and BiGAN share: a generator of images (virtual batch norm against a fixed
    reference batch of codes when asked) and the generator's adversarial loss (feature matching or
    the non-saturating loss)."""

    SUPPORTED = TECHNIQUE_NAMES

    def _build_generator(self, code_dim: int, hidden_dim: int, data_dim: int) -> None:
        self.generator = generator_net(code_dim, hidden_dim, data_dim, self.techniques.virtual_batch_norm)
        if self.techniques.virtual_batch_norm:
            self.register_buffer("reference_codes", self.sample_codes(REFERENCE_BATCH)[0])

    def generate(self, codes: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] [N, D] for codes [N, c]."""
        if self.techniques.virtual_batch_norm:
            return torch.sigmoid(virtual_batch(self.generator, self.reference_codes, codes))
        return torch.sigmoid(self.generator(codes))

    def _generator_adversarial(self, real_features, fake_features, fake_logits) -> torch.Tensor:
        if self.techniques.feature_matching:
            return feature_matching_loss(real_features, fake_features)
        return generator_loss(fake_logits)


class InfoGAN(_ImageGAN):
    """InfoGAN with one categorical code (``categories`` values) and ``continuous`` codes uniform on [-1, 1].

    Q(c | x) is a head on the discriminator's body: a softmax over the categories and a Gaussian
    (mean, log-variance) per continuous code. The information term -E log Q(c | G(z, c)) is minimised by
    the discriminator's player (body and heads, on detached fakes) and by the generator.
    """

    PLAYERS = {"discriminator": ("body", "real_head", "code_head"), "generator": ("generator",)}

    def __init__(
        self,
        data_dim: int,
        image_shape,
        *,
        noise_dim: int = 62,
        categories: int = 10,
        continuous: int = 2,
        hidden_dim: int = 512,
        info_weight: float = 1.0,
        techniques: Techniques | None = None,
    ):
        super().__init__(techniques)
        if categories < 2:
            _fail("InfoGAN", f"categories must be >= 2, got {categories}")
        self.data_dim, self.image_shape = data_dim, tuple(image_shape)
        self.noise_dim, self.categories, self.continuous = noise_dim, categories, continuous
        self.info_weight = info_weight
        self._build_generator(noise_dim + categories + continuous, hidden_dim, data_dim)
        self.body = features_net(data_dim, hidden_dim)
        self.real_head = nn.Linear(hidden_dim, 1)
        self.code_head = nn.Linear(hidden_dim, categories + 2 * continuous)
        self._start_histories()

    def sample_codes(self, n: int, generator=None, category=None, continuous=None):
        """(codes [n, noise + categories + continuous], category [n], continuous [n, c]); given parts are kept."""
        noise = torch.randn((n, self.noise_dim), generator=generator)
        if category is None:
            category = torch.randint(0, self.categories, (n,), generator=generator)
        if continuous is None:
            continuous = torch.rand((n, self.continuous), generator=generator) * 2 - 1
        codes = torch.cat([noise, F.one_hot(category, self.categories).float(), continuous], 1)
        return codes, category, continuous

    def information_loss(self, features, category, continuous) -> torch.Tensor:
        """-E log Q(c | x): cross-entropy of the categorical code + Gaussian negative log-density of the others."""
        out = self.code_head(features)
        logits, mean, raw_log_var = out.split([self.categories, self.continuous, self.continuous], 1)
        log_var = 2.5 * torch.tanh(raw_log_var / 2.5)  # bounded: a collapsing variance cannot blow the density up
        return F.cross_entropy(logits, category) - vaekernels.gaussian_log_prob(continuous, mean, log_var).mean()

    def train_step(self, x, y, generator, optimizers: Optimizers) -> dict:
        codes, category, continuous = self.sample_codes(len(x), generator)
        fake = self.generate(codes)
        real_features, fake_features = self.body(x), self.body(fake.detach())
        real_logits = self.real_head(real_features)
        discriminator = self.update(
            optimizers,
            "discriminator",
            discriminator_loss(real_logits, self.real_head(fake_features), self.techniques.label_smoothing)
            + self.info_weight * self.information_loss(fake_features, category, continuous),
        )
        fake_features = self.body(fake)
        real_features = None  # the body's features of real data after the update: feature matching's target
        if self.techniques.feature_matching:
            with torch.no_grad():
                real_features = self.body(x)
        adversarial = self._generator_adversarial(real_features, fake_features, self.real_head(fake_features))
        information = self.information_loss(fake_features, category, continuous)
        self.update(optimizers, "generator", adversarial + self.info_weight * information)
        return {
            "discriminator": discriminator,
            "generator": adversarial.detach(),
            "information": information.detach(),
            "real_probability": torch.sigmoid(real_logits.detach()).mean(),
        }

    @torch.no_grad()
    def pictures(self, x, y, generator) -> dict:
        """samples.png (row k: category k) and traversal-c<j>.png (row k: category k, columns: c_j from -2
        to 2, the noise fixed for the whole grid, the other continuous codes 0)."""
        rows, columns = self.categories, 10
        category = torch.arange(rows).repeat_interleave(columns)
        pictures = {"samples.png": (self.generate(self.sample_codes(rows * columns, generator, category)[0]), columns)}
        noise = torch.randn((1, self.noise_dim), generator=generator).expand(rows * columns, -1)
        for j in range(self.continuous):
            continuous = torch.zeros(rows * columns, self.continuous)
            continuous[:, j] = torch.linspace(-2, 2, columns).repeat(rows)
            codes = torch.cat([noise, F.one_hot(category, self.categories).float(), continuous], 1)
            pictures[f"traversal-c{j + 1}.png"] = (self.generate(codes), columns)
        return pictures


class _Autoencoder(AdversarialModel):
    """What AAE and AVB share: a Bernoulli decoder through the zoo's fused log-density and the pictures."""

    def _reconstruction(self, logits, x) -> torch.Tensor:
        """-log p(x | z) per example, averaged: nats per image."""
        return -self.likelihood.log_prob(logits.unsqueeze(1), x).mean()

    @torch.no_grad()
    def pictures(self, x, y, generator) -> dict:
        """samples.png (prior draws decoded; row k: label k for a label-conditioned model) and
        reconstructions.png (rows of test images, each followed by its reconstructions)."""
        labels = torch.arange(10).repeat_interleave(10)
        samples = torch.sigmoid(self.decode(self.sample_latents(100, labels, generator), labels))
        reconstructions = reconstruction_rows(x, self.reconstruct(x, y, generator))
        return {"samples.png": (samples, 10), "reconstructions.png": (reconstructions, 10)}


class AAE(_Autoencoder):
    """Adversarial autoencoder: reconstruction phase (encoder + decoder), then the discriminator tells
    prior draws from codes, then the encoder alone learns to fool it (Makhzani et al.'s three phases)."""

    PLAYERS = {"autoencoder": ("encoder", "decoder"), "discriminator": ("discriminator",), "encoder": ("encoder",)}
    SUPPORTED = ("historical_averaging", "label_smoothing")

    def __init__(
        self,
        data_dim: int,
        image_shape,
        *,
        latent_dim: int = 2,
        hidden_dim: int = 512,
        prior: str = "gaussian",
        condition: str = "none",
        classes: int = 10,
        techniques: Techniques | None = None,
    ):
        super().__init__(techniques)
        if prior not in PRIORS:
            _fail("AAE", f"prior must be one of {PRIORS}, got {prior!r}")
        if condition not in CONDITIONS:
            _fail("AAE", f"condition must be one of {CONDITIONS}, got {condition!r}")
        if prior != "gaussian" and latent_dim != 2:
            _fail("AAE", f"the {prior} prior is 2-D: latent_dim must be 2, got {latent_dim}")
        self.data_dim, self.image_shape, self.latent_dim = data_dim, tuple(image_shape), latent_dim
        self.prior, self.condition, self.classes = prior, condition, classes
        self.encoder = leaky_mlp(data_dim, hidden_dim, latent_dim)
        self.decoder = leaky_mlp(latent_dim + (classes if condition == "decoder" else 0), hidden_dim, data_dim)
        self.discriminator = leaky_mlp(latent_dim + (classes if condition == "discriminator" else 0), hidden_dim, 1)
        self.likelihood = Likelihood("bernoulli", data_dim)
        self._start_histories()

    def _with_label(self, where: str, z, y):
        return (
            torch.cat([z, _one_hot(f"AAE ({where}-conditioned)", y, self.classes)], 1) if self.condition == where else z
        )

    def decode(self, z, y=None) -> torch.Tensor:
        return self.decoder(self._with_label("decoder", z, y))

    def reconstruct(self, x, y=None, generator=None) -> torch.Tensor:
        return torch.sigmoid(self.decode(self.encoder(x), y))

    def sample_latents(self, n: int, labels, generator=None) -> torch.Tensor:
        given = labels if self.condition == "discriminator" else None
        return sample_prior(self.prior, n, self.latent_dim, given, generator, self.classes)

    def train_step(self, x, y, generator, optimizers: Optimizers) -> dict:
        reconstruction = self.update(
            optimizers, "autoencoder", self._reconstruction(self.decode(self.encoder(x), y), x)
        )
        z = self.encoder(x)
        prior = self.sample_latents(len(x), y, generator)
        discriminator = self.update(
            optimizers,
            "discriminator",
            discriminator_loss(
                self.discriminator(self._with_label("discriminator", prior, y)),
                self.discriminator(self._with_label("discriminator", z.detach(), y)),
                self.techniques.label_smoothing,
            ),
        )
        regularisation = self.update(
            optimizers, "encoder", generator_loss(self.discriminator(self._with_label("discriminator", z, y)))
        )
        return {"reconstruction": reconstruction, "discriminator": discriminator, "regularisation": regularisation}


class AVB(_Autoencoder):
    """Adversarial variational Bayes with a black-box encoder z = E(x, eps), eps ~ N(0, I).

    T(x, z) = t(x, z) - log N(z; 0, I): the known part of the optimum T* = log q(z|x) - log p(z) is
    added in closed form (the fused log-density), so the network t learns log q(z|x) alone. The VAE's
    loss is E[-log p(x|z) + T(x, z)], z ~ q; the adversary's, the cross-entropy of T telling
    (x, z ~ q(z|x)) (label 1) from (x, z ~ p(z)) (label 0).
    """

    PLAYERS = {"vae": ("encoder", "decoder"), "adversary": ("adversary",)}

    def __init__(self, data_dim: int, image_shape, *, latent_dim: int = 8, hidden_dim: int = 512, noise_dim: int = 8):
        super().__init__()
        self.data_dim, self.image_shape = data_dim, tuple(image_shape)
        self.latent_dim, self.noise_dim = latent_dim, noise_dim
        self.encoder = leaky_mlp(data_dim + noise_dim, hidden_dim, latent_dim)
        self.decoder = leaky_mlp(latent_dim, hidden_dim, data_dim)
        self.adversary = leaky_mlp(data_dim + latent_dim, hidden_dim, 1)
        self.likelihood = Likelihood("bernoulli", data_dim)

    def encode(self, x, generator=None) -> torch.Tensor:
        """One draw z ~ q(z | x) [N, d]: the encoder fed x and fresh noise."""
        return self.encoder(torch.cat([x, torch.randn((len(x), self.noise_dim), generator=generator)], 1))

    def decode(self, z, y=None) -> torch.Tensor:
        return self.decoder(z)

    def contrast(self, x, z) -> torch.Tensor:
        """T(x, z) [N], the estimate of log q(z|x) - log p(z)."""
        return self.adversary(torch.cat([x, z], 1)).squeeze(1) - standard_normal_log_prob(z)

    def reconstruct(self, x, y=None, generator=None) -> torch.Tensor:
        return torch.sigmoid(self.decode(self.encode(x, generator)))

    def sample_latents(self, n: int, labels=None, generator=None) -> torch.Tensor:
        return torch.randn((n, self.latent_dim), generator=generator)

    def train_step(self, x, y, generator, optimizers: Optimizers) -> dict:
        z = self.encode(x, generator)
        reconstruction = self._reconstruction(self.decode(z), x)
        kl = self.contrast(x, z).mean()
        loss = self.update(optimizers, "vae", reconstruction + kl)
        real, fake = self.contrast(x, z.detach()), self.contrast(x, self.sample_latents(len(x), None, generator))
        adversary = self.update(optimizers, "adversary", discriminator_loss(real, fake))
        return {"loss": loss, "reconstruction": reconstruction.detach(), "kl": kl.detach(), "adversary": adversary}


class BiGAN(_ImageGAN):
    """BiGAN: D(x, z) tells (x, E(x)) (label 1) from (G(z), z) (label 0); E and G, one player, invert the
    labels (non-saturating), or with feature matching G matches D's features of the real pairs."""

    PLAYERS = {"discriminator": ("body", "real_head"), "encoder_generator": ("encoder", "generator")}

    def __init__(
        self,
        data_dim: int,
        image_shape,
        *,
        latent_dim: int = 16,
        hidden_dim: int = 512,
        techniques: Techniques | None = None,
    ):
        super().__init__(techniques)
        self.data_dim, self.image_shape, self.latent_dim = data_dim, tuple(image_shape), latent_dim
        self.encoder = leaky_mlp(data_dim, hidden_dim, latent_dim)
        self._build_generator(latent_dim, hidden_dim, data_dim)
        self.body = features_net(data_dim + latent_dim, hidden_dim)
        self.real_head = nn.Linear(hidden_dim, 1)
        self._start_histories()

    def sample_codes(self, n: int, generator=None):
        return (torch.randn((n, self.latent_dim), generator=generator),)

    def train_step(self, x, y, generator, optimizers: Optimizers) -> dict:
        (z,) = self.sample_codes(len(x), generator)
        fake, encoded = self.generate(z), self.encoder(x)
        real_logits = self.real_head(self.body(torch.cat([x, encoded.detach()], 1)))
        fake_logits = self.real_head(self.body(torch.cat([fake.detach(), z], 1)))
        discriminator = self.update(
            optimizers, "discriminator", discriminator_loss(real_logits, fake_logits, self.techniques.label_smoothing)
        )
        real_features, fake_features = self.body(torch.cat([x, encoded], 1)), self.body(torch.cat([fake, z], 1))
        real_logits = self.real_head(real_features)
        encoder = F.binary_cross_entropy_with_logits(real_logits, torch.zeros_like(real_logits))
        generator_part = self._generator_adversarial(real_features, fake_features, self.real_head(fake_features))
        self.update(optimizers, "encoder_generator", encoder + generator_part)
        return {"discriminator": discriminator, "encoder": encoder.detach(), "generator": generator_part.detach()}

    def reconstruct(self, x, y=None, generator=None) -> torch.Tensor:
        """G(E(x)): BiGAN's reconstructions, good only as far as E inverts G."""
        return self.generate(self.encoder(x))

    @torch.no_grad()
    def pictures(self, x, y, generator) -> dict:
        return {
            "samples.png": (self.generate(self.sample_codes(100, generator)[0]), 10),
            "reconstructions.png": (reconstruction_rows(x, self.reconstruct(x)), 10),
        }
