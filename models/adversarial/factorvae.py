"""FactorVAE (Kim & Mnih 2018): the VAE objective plus gamma times the total correlation of the
aggregate posterior, KL(q(z) || prod_j q(z_j)), estimated by a discriminator (the density-ratio trick).

A discriminator D tells draws of q(z) from draws of prod_j q(z_j), so that
TC = E_q(z)[log q(z) / prod_j q(z_j)] ~ E_q(z)[log D(z) / (1 - D(z))], the mean of D's logit on
q(z)'s samples. Samples of prod_j q(z_j) come from :func:`permute_dims`: each latent dimension
permuted independently across a second batch. One training step (Kim & Mnih, Algorithm 2) splits
the batch in two halves: the VAE steps on the first with loss recon + beta KL + gamma TC_D; then D
steps on the first half's z (label 1) against the permuted z of the second (label 0). With
gamma = 0 (and beta > 1) this is the beta-VAE of :mod:`models.vae.zoo`.

Example::

    >>> model = FactorVAE(64 * 64, (64, 64), arch="conv64", latent_dim=4, gamma=10.0)
    >>> from models.adversarial import Optimizers
    >>> optimizers = Optimizers(model.players(), lr=1e-4, betas=(0.9, 0.999))
    >>> stats = model.train_step(torch.bernoulli(torch.full((8, 64 * 64), 0.1)), None, None, optimizers)
    >>> sorted(stats)
    ['discriminator', 'kl', 'loss', 'reconstruction', 'tc', 'tc_minibatch']
"""

from __future__ import annotations

import torch

import vaekernels
from models.adversarial import Optimizers, discriminator_loss, leaky_mlp
from models.vae.zoo import VAE, reparameterize


def permute_dims(z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z [B, d] with each column permuted independently across the batch: a sample of prod_j q(z_j).

    Each column keeps its values (so its marginal), while the rows' joint structure is broken.

    >>> z = torch.arange(12.0).reshape(4, 3)
    >>> permuted = permute_dims(z, torch.Generator().manual_seed(0))
    >>> torch.equal(permuted.sort(0).values, z)
    True
    """
    if z.dim() != 2:
        raise ValueError(f"models.adversarial.factorvae.permute_dims: z must be [B, d], got shape {list(z.shape)}")
    order = torch.rand(z.shape, generator=generator, device=z.device).argsort(0)
    return z.gather(0, order)


class FactorVAE(VAE):
    """The zoo's VAE with a total-correlation discriminator; players "vae" and "discriminator"."""

    def __init__(self, *args, gamma: float = 10.0, discriminator_hidden: int = 256, **kwargs):
        super().__init__(*args, **kwargs)
        if gamma < 0:
            raise ValueError(f"models.adversarial.factorvae.FactorVAE: gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.discriminator = leaky_mlp(self.latent_dim, discriminator_hidden, 1, layers=3)  # Kim & Mnih's, narrower

    def players(self) -> dict:
        vae = [p for name, p in self.named_parameters() if not name.startswith("discriminator.")]
        return {"vae": vae, "discriminator": list(self.discriminator.parameters())}

    def train_step(self, x, y, generator, optimizers: Optimizers) -> dict:
        """One update of the VAE, then one of the discriminator; returns the step's statistics."""
        if len(x) < 4:
            raise ValueError(
                f"models.adversarial.factorvae.FactorVAE.train_step: needs a batch of >= 4 (two halves of >= 2), "
                f"got {len(x)}"
            )
        first, second = x[: len(x) // 2], x[len(x) // 2 :]
        mean, log_var = self.encode(first, None)
        z = reparameterize(mean, log_var, 1, generator)
        reconstruction = -self.likelihood.log_prob(self.decode(z, None), first).mean()
        kl = vaekernels.gaussian_kl(mean, log_var).mean()
        z = z[:, 0]
        tc = self.discriminator(z).mean()  # log D / (1 - D) is D's logit
        loss = reconstruction + self.beta * kl + self.gamma * tc
        optimizers.step("vae", loss)
        with torch.no_grad():
            other_mean, other_log_var = self.encode(second, None)
            other = permute_dims(reparameterize(other_mean, other_log_var, 1, generator)[:, 0], generator)
            # The fused aggregate-posterior estimate of the same TC, on the minibatch: a check on D's.
            tc_minibatch = vaekernels.total_correlation(z, mean, log_var)
        real, fake = self.discriminator(z.detach()), self.discriminator(other)
        discriminator = discriminator_loss(real, fake)
        optimizers.step("discriminator", discriminator)
        return {
            "loss": loss.detach(),
            "reconstruction": reconstruction.detach(),
            "kl": kl.detach(),
            "tc": tc.detach(),
            "tc_minibatch": tc_minibatch,
            "discriminator": discriminator.detach(),
        }


@torch.no_grad()
def latent_traversals(model: VAE, x: torch.Tensor, values: torch.Tensor, kl_batch: torch.Tensor) -> torch.Tensor:
    """Decoded traversals [d * len(values), D]: row j sets latent j of E_q[z | x] to each of ``values`` in turn.

    Rows are ordered by the dimension's average KL to the prior over ``kl_batch`` (most informative first),
    as in Higgins et al.'s figures.

    >>> from models.vae.zoo import build_model
    >>> model = build_model("vae", data_dim=16, latent_dim=3, hidden_dim=8)
    >>> latent_traversals(model, torch.zeros(16), torch.linspace(-2, 2, 5), torch.zeros(4, 16)).shape
    torch.Size([15, 16])
    """
    mean, log_var = model.encode(kl_batch, None)
    kl_per_dimension = vaekernels.gaussian_kl(mean.unsqueeze(-1), log_var.unsqueeze(-1)).mean(0)  # [d]
    order = kl_per_dimension.argsort(descending=True)
    base = model.encode(x.unsqueeze(0), None)[0][0]
    z = base.repeat(len(order), len(values), 1)  # [d, n, d]
    z[torch.arange(len(order))[:, None], torch.arange(len(values))[None, :], order[:, None]] = values
    return model.likelihood.mean(model.decode(z.flatten(0, 1).unsqueeze(1), None)).squeeze(1)
