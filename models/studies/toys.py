"""The seed's two toys: ``python -m models study gradient-variance`` and ``python -m models study collapse``.

1. Gradient variance (seed 001, "log-derivative trick" vs "reparametrization trick"): the gradient
   of E_q[f(z)] with respect to q's mean, q = N(mu, sigma^2 I), f(z) = -||z - x||^2 / 2, estimated
   by the score function f(z) grad log q(z) (log q through :func:`vaekernels.gaussian_log_prob`)
   and by the reparameterised grad_mu f(mu + sigma eps). Both are unbiased (the true gradient is
   x - mu); the score function's variance is far larger and grows with the dimension.
2. Posterior collapse (seed 001): data from N(mu, Sigma), a VAE with a linear decoder whose
   Gaussian noise is diagonal and learned. When Sigma is diagonal the decoder models the data
   alone and the latents go unused (no active units); when Sigma has off-diagonal structure (here
   a rank-2 covariance plus noise) the latents carry it (as many active units as its rank).
   Encoder and decoder start from the collapsed point (zero weights) with noise variances above the
   data's per-coordinate variances: as in probabilistic PCA, a latent direction is used only where
   the data vary more than the noise explains. With diagonal Sigma the noise variances shrink to
   Sigma's diagonal and no direction ever exceeds them (the ELBO also has equally good solutions
   that use the latents, a flat valley; a weak L2 prior on the decoder weights picks the one
   without); with correlations the principal directions exceed them, and the latents take them.
"""

from __future__ import annotations

import argparse

import torch

import vaekernels
from models.metrics.likelihood import active_units
from models.training.trainer import Optimizers, train_steps
from models.vae.zoo import build_model


def gradient_variance(dim: int, samples: int = 10000, sigma: float = 1.0, seed: int = 0) -> dict:
    """Per-coordinate mean and variance of the score-function and reparameterised gradients w.r.t. mu.

    >>> result = gradient_variance(4, samples=2000)
    >>> result["score_function_variance"] > 10 * result["reparameterised_variance"]
    True
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(dim, generator=generator)
    mu0 = torch.randn(dim, generator=generator)
    log_var = torch.full((dim,), 2 * torch.log(torch.tensor(sigma)).item())
    eps = torch.randn(samples, dim, generator=generator)

    def f(z):
        return -0.5 * (z - x).pow(2).sum(-1)

    # One leaf row per sample: a single backward gives every sample's own gradient.
    mu = mu0.expand(samples, dim).clone().requires_grad_(True)
    z = (mu + sigma * eps).detach()
    (f(z) * vaekernels.gaussian_log_prob(z, mu, log_var)).sum().backward()
    score = mu.grad
    mu = mu0.expand(samples, dim).clone().requires_grad_(True)
    f(mu + sigma * eps).sum().backward()
    reparameterised = mu.grad
    return {
        "dim": dim,
        "true_gradient": (x - mu0).tolist(),
        "score_function_mean": score.mean(0).tolist(),
        "reparameterised_mean": reparameterised.mean(0).tolist(),
        "score_function_variance": score.var(0).mean().item(),
        "reparameterised_variance": reparameterised.var(0).mean().item(),
    }


def gaussian_data(covariance: str, n: int = 2000, dim: int = 5, rank: int = 2, seed: int = 0) -> torch.Tensor:
    """n points of N(mu, Sigma): Sigma diagonal (``"diagonal"``) or rank-``rank`` plus 0.1 I (``"full"``)."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(dim, generator=generator)
    if covariance == "diagonal":
        scale = torch.diag(torch.rand(dim, generator=generator) * 1.5 + 0.5)
    elif covariance == "full":
        factors = torch.randn(dim, rank, generator=generator)
        scale = torch.linalg.cholesky(factors @ factors.T + 0.1 * torch.eye(dim))
    else:
        raise ValueError(
            f"models.studies.toys.gaussian_data: covariance must be 'diagonal' or 'full', got {covariance!r}"
        )
    return mean + torch.randn(n, dim, generator=generator) @ scale.T


def posterior_collapse(covariance: str, steps: int = 500, dim: int = 5, seed: int = 0) -> dict:
    """Train a linear-Gaussian VAE (latent dim = data dim) on ``gaussian_data``; its active units.

    >>> posterior_collapse("full", steps=300)["active_units"] >= 1
    True
    """
    data = gaussian_data(covariance, dim=dim, seed=seed)
    torch.manual_seed(seed)
    model = build_model("vae", dim, (1, dim), arch="linear", likelihood="gaussian", latent_dim=dim)
    with torch.no_grad():
        model.decoder.net[-1].weight.zero_()
        model.encoder.head[-1].weight.zero_()
        model.likelihood.raw_log_scale.copy_(data.var(0).log() + 1)
    # The ELBO is flat along a valley of optima that trade decoder weights for noise variance;
    # Adam would random-walk along it. A weak L2 prior on the decoder weights picks the smallest.
    weight = model.decoder.net[-1].weight
    others = [p for p in model.parameters() if p is not weight]
    groups = [{"params": others}, {"params": [weight], "weight_decay": 0.1}]
    optimizers = Optimizers({"model": groups}, lr=1e-2, betas=(0.9, 0.999))
    generator = torch.Generator().manual_seed(seed)
    # Full batches: minibatch noise would let the unused directions drift.
    train_steps(lambda step: {"loss": optimizers.step("model", model(data, generator=generator)[0])}, steps)
    with torch.no_grad():
        count, variances = active_units(model.encode(data)[0])
        loss, stats = model.eval()(data, generator=generator)
    return {
        "covariance": covariance,
        "active_units": count,
        "latent_variances": variances.tolist(),
        "negative_elbo": loss.item(),
        "kl": stats["kl"].item(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models study", description=__doc__.split("\n\n")[0])
    parser.add_argument("toy", choices=("gradient-variance", "collapse"))
    args = parser.parse_args(argv)
    if args.toy == "gradient-variance":
        print("| dim | score-function variance | reparameterised variance | ratio |")
        print("| ---: | ---: | ---: | ---: |")
        for dim in (1, 10, 100):
            r = gradient_variance(dim)
            ratio = r["score_function_variance"] / r["reparameterised_variance"]
            print(f"| {dim} | {r['score_function_variance']:.3g} | {r['reparameterised_variance']:.3g} | {ratio:.3g} |")
    else:
        for covariance in ("diagonal", "full"):
            r = posterior_collapse(covariance)
            print(
                f"Sigma {covariance}: {r['active_units']} active units of 5 (Var_x E_q[z] = "
                f"{', '.join(f'{v:.3f}' for v in r['latent_variances'])}), KL {r['kl']:.3f}"
            )
