"""Evaluation metrics of the zoo: importance-sampled NLL, active units, ELBO surgery, reconstruction.

All take a model of :mod:`models.vae.zoo` and data as the training loop feeds it (x [N, D], labels
[N] or None) and stream over the data in batches, so the whole test set fits in bounded memory.

Example::

    >>> from models.vae.zoo import build_model
    >>> model = build_model("vae", data_dim=16, latent_dim=2, hidden_dim=8)
    >>> x = torch.bernoulli(torch.full((10, 16), 0.5))
    >>> sorted(evaluate_model(model, x, num_samples=20, progress=False))  # doctest: +NORMALIZE_WHITESPACE
    ['active_units', 'average_kl', 'average_kl_analytic', 'latent_variances', 'marginal_kl',
     'mutual_information', 'nll', 'nll_examples', 'nll_samples', 'nll_seconds', 'reconstruction', 'squared_error']
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

import vaekernels
from models.vae.zoo import VAE, reparameterize, standard_normal_log_prob

ACTIVE_UNIT_THRESHOLD = 1e-2  # Burda et al.: unit u is active when Var_x(E_q[z_u]) > 0.01


def _batches(x, y, batch_size):
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size], None if y is None else y[start : start + batch_size]


@torch.no_grad()
def importance_sampled_nll(
    model: VAE,
    x,
    y=None,
    *,
    num_samples: int = 5000,
    batch_size: int = 100,
    chunk_size: int = 500,
    generator=None,
    progress: bool = True,
) -> torch.Tensor:
    """-log p(x) per example [N], with ``num_samples`` importance samples from q(z|x).

    Models with one stochastic layer, the prior N(0, I) and a likelihood the fused bound takes go
    through :func:`vaekernels.importance_sampled_nll` (streamed over chunks of samples); the others
    (two layers, the learned prior, the discretised logistic) fold ``chunk_size`` log-weights at a
    time into a running log-sum-exp the same way.

    >>> from models.vae.zoo import build_model
    >>> model = build_model("hvae", data_dim=6, latent_dim=2, hidden_dim=4, top_latent_dim=2, top_hidden_dim=4)
    >>> importance_sampled_nll(model, torch.ones(3, 6), num_samples=10, chunk_size=4, progress=False).shape
    torch.Size([3])
    """
    model.eval()
    fused = model.standard_prior and model.likelihood.fused
    results = []
    bar = tqdm(total=len(x), desc=f"NLL, K={num_samples}", unit="image", disable=not progress, dynamic_ncols=True)
    for xb, yb in _batches(x, y, batch_size):
        if fused:
            nll = vaekernels.importance_sampled_nll(
                xb,
                lambda data, yb=yb: model.encode(data, yb),
                lambda z, yb=yb: model.decode(z, yb),
                num_samples,
                chunk_size,
                generator=generator,
                **model.likelihood.bound_kwargs(),
            )
        else:
            total = torch.full((len(xb),), float("-inf"), device=xb.device)
            for start in range(0, num_samples, chunk_size):
                samples = min(chunk_size, num_samples - start)
                log_w = model.log_weights(xb, yb, samples, generator)
                total = torch.logaddexp(total, torch.logsumexp(log_w, dim=1))
            nll = math.log(num_samples) - total
        results.append(nll)
        bar.update(len(xb))
    bar.close()
    return torch.cat(results)


def active_units(means: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> tuple[int, torch.Tensor]:
    """(number of units u with Var_x(E_q[z_u]) > threshold, the variances [d]) from posterior means [N, d].

    >>> active_units(torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
    (1, tensor([0., 2.]))
    """
    variances = means.var(dim=0)
    return int((variances > threshold).sum()), variances


def elbo_surgery(z, mean, log_var, log_prior=standard_normal_log_prob) -> dict:
    """Hoffman & Johnson's ELBO surgery on N points: average KL = marginal KL + index-code MI.

    ``z`` [N, d] holds one draw z_i ~ q(z | x_i) per point, ``mean`` and ``log_var`` [N, d] the
    posteriors. With the aggregate posterior q(z) = (1/N) sum_j q(z | x_j) (the fused
    :func:`vaekernels.aggregate_posterior_log_density`), on the same draws:

    * average KL  = mean_i [log q(z_i | x_i) - log p(z_i)]
    * marginal KL = mean_i [log q(z_i) - log p(z_i)]           (KL(q(z) || p(z)))
    * MI          = mean_i [log q(z_i | x_i) - log q(z_i)]     (I(i; z) <= log N)

    so the identity holds term by term. ``log_prior`` maps z [N, 1, d] to log p(z) [N, 1].

    >>> mean = torch.zeros(5, 2)  # every posterior the same: no information about the index
    >>> parts = elbo_surgery(torch.randn(5, 2), mean, torch.zeros(5, 2))
    >>> abs(parts["mutual_information"]) < 1e-6, abs(parts["average_kl"] - parts["marginal_kl"]) < 1e-6
    (True, True)
    """
    log_q_joint = vaekernels.aggregate_posterior_log_density(z, mean, log_var)
    log_q_conditional = vaekernels.gaussian_log_prob(z, mean, log_var)
    log_p = log_prior(z.unsqueeze(1)).squeeze(1)
    return {
        "average_kl": (log_q_conditional - log_p).mean().item(),
        "marginal_kl": (log_q_joint - log_p).mean().item(),
        "mutual_information": (log_q_conditional - log_q_joint).mean().item(),
    }


@torch.no_grad()
def evaluate_model(
    model: VAE,
    x,
    y=None,
    *,
    num_samples: int = 5000,
    nll_limit: int | None = None,
    surgery_limit: int | None = 2000,
    batch_size: int = 100,
    chunk_size: int = 500,
    generator=None,
    progress: bool = True,
) -> dict:
    """Every metric on (x, y): NLL (on the first ``nll_limit`` points), active units, ELBO surgery
    (on the first ``surgery_limit``: its cost grows as N^2), reconstruction loss -E_q[log p(x|z)]
    and squared error ||x - E[x|z]||^2 per example, one z ~ q(z|x) each."""
    model.eval()
    means, log_vars, draws, reconstruction, squared = [], [], [], [], []
    for xb, yb in _batches(x, y, batch_size):
        mean, log_var = model.encode(xb, yb)
        z = reparameterize(mean, log_var, 1, generator)
        out = model.decode(z, yb)
        reconstruction.append(-model.likelihood.log_prob(out, xb)[:, 0])
        squared.append((model.likelihood.mean(out)[:, 0] - xb).pow(2).sum(-1))
        means.append(mean), log_vars.append(log_var), draws.append(z[:, 0])
    means, log_vars, draws = torch.cat(means), torch.cat(log_vars), torch.cat(draws)
    count, variances = active_units(means)
    metrics = {
        "active_units": count,
        "latent_variances": variances.tolist(),
        "reconstruction": torch.cat(reconstruction).mean().item(),
        "squared_error": torch.cat(squared).mean().item(),
    }
    if hasattr(model, "top_means"):  # z1's prior is p(z1 | z2), not a density of z1 alone
        metrics["active_units_top"] = active_units(
            torch.cat([model.top_means(xb, yb) for xb, yb in _batches(x, y, batch_size)])
        )[0]
    else:
        keep = slice(0, surgery_limit)
        metrics.update(elbo_surgery(draws[keep], means[keep], log_vars[keep], model.log_prior))
    if model.standard_prior:
        metrics["average_kl_analytic"] = vaekernels.gaussian_kl(means, log_vars).mean().item()
    nll_x = x[:nll_limit]
    started = time.perf_counter()
    nll = importance_sampled_nll(
        model,
        nll_x,
        None if y is None else y[:nll_limit],
        num_samples=num_samples,
        batch_size=batch_size,
        chunk_size=chunk_size,
        generator=generator,
        progress=progress,
    )
    metrics.update(
        nll=nll.mean().item(),
        nll_samples=num_samples,
        nll_examples=len(nll_x),
        nll_seconds=time.perf_counter() - started,
    )
    return metrics
