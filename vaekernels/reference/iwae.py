"""Importance-weighted bounds in plain PyTorch: the test oracle and the benchmark baseline.

Each function has the signature of its fused counterpart in :mod:`vaekernels.ops.iwae` and is
written to be read, not to be fast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


def log_mean_exp(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """log(mean(exp(x))) along ``dim``; a slice of all -inf gives -inf with a zero gradient, one
    holding +inf gives +inf with the gradient shared evenly by its +inf entries (the softmax's limit).

    Written as max + log(mean(exp(x - max))) with the max held constant, so that the gradient is
    exp(x - max) / sum(exp(x - max)), whose weights sum to 1 however the output rounds
    (logsumexp's own backward takes exp(x - output): at x = [-1e7] * 4 + [-inf] * 2 in float32 the
    output rounds by a whole unit and its weights sum to 1.47)."""
    empty = torch.isneginf(x).all(dim, keepdim=True)  # the log of a zero mean
    # A slice holding +inf (and no NaN) has out = +inf, and its softmax is, in the limit, spread
    # evenly over the +inf entries (exp(x - out) would be inf / inf = NaN there). So the +inf
    # entries count as 0 and the others as -inf, whose softmax is that limit, with x's gradient
    # passed straight through; out gets its +inf back at the end.
    top = torch.isposinf(x)
    infinite = top.any(dim, keepdim=True) & ~torch.isnan(x).any(dim, keepdim=True)
    values = torch.where(infinite, torch.where(top, 0.0, float("-inf")), torch.where(empty, 0.0, x.detach()))
    finite = _StraightThrough.apply(x, values)
    shift = finite.amax(dim, keepdim=True).detach()
    shift = torch.where(torch.isfinite(shift), shift, 0.0)  # NaN is its own answer
    out = shift + torch.log(torch.exp(finite - shift).mean(dim, keepdim=True))
    out = torch.where(empty, float("-inf"), out + torch.where(infinite, float("inf"), 0.0))
    return out if keepdim else out.squeeze(dim)


class _StraightThrough(torch.autograd.Function):
    """``values`` in the forward, the gradient passed to ``x`` unchanged (nothing saved)."""

    @staticmethod
    def forward(x, values):
        return values

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum over event dims of x log sigmoid(l) + (1 - x) log(1 - sigmoid(l)); logits [B, K, *event], x [B, *event]."""
    return _BernoulliTerms.apply(logits, x.unsqueeze(1)).flatten(2).sum(-1)


class _BernoulliTerms(torch.autograd.Function):
    """x log sigmoid(l) + (1 - x) log sigmoid(-l) per element, keeping only l and x for backward, as
    x l - softplus(l) would; that form is inf - inf or 0 * inf at l = +-inf, where a term of weight
    0 counts 0 (as in xlogy) and the other is -inf. The gradient is x - sigmoid(l) (l for x)."""

    @staticmethod
    def forward(logits, x):
        positive = torch.where(x == 0, 0.0, x * F.logsigmoid(logits))
        return positive + torch.where(x == 1, 0.0, (1 - x) * F.logsigmoid(-logits))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        logits, x = ctx.saved_tensors
        grad_logits = grad * (x - torch.sigmoid(logits)) if ctx.needs_input_grad[0] else None
        grad_x = (grad * logits).sum_to_size(x.shape) if ctx.needs_input_grad[1] else None
        return grad_logits, grad_x


def standardised(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """w = (x - mean) / std with no 0 * inf, forward or backward, at a tiny variance (1 / std
    overflows float32 below log_var = -176): 1 / std is exp(-log_var / 4) taken twice, so that a
    tiny difference over a tiny std stays finite while the quotient is; at x = mean the exponent is
    0 instead (w is 0 whatever it is), and elsewhere capped where exp would overflow (w overflows
    then anyway)."""
    diff = x - mean
    exponent = torch.where(diff == 0, 0.0, -0.25 * log_var)
    # Capped by where, not clamp: clamp's backward drops the gradient at a NaN log_var, whose
    # log-density and gradient are NaN on every backend.
    cap = math.log(torch.finfo(diff.dtype).max)
    exponent = torch.where(exponent > cap, cap, exponent)
    root = torch.exp(exponent)
    w = diff * root * root
    # An overflowed w (a density of 0) is held constant: the zero gradient a vanishing density
    # passes back then stays 0 instead of becoming 2 w * 0 = NaN. Its inputs are zeroed on that
    # branch too, so that the zero gradient is not multiplied by an infinite x - mean there either.
    overflow = torch.isinf(w.detach())
    kept_root = torch.where(overflow, 0.0, root)
    safe = torch.where(overflow, 0.0, diff) * kept_root * kept_root
    return torch.where(overflow, w.detach(), safe)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, exp(log_var)) summed over the last dim, with broadcasting."""
    return _gaussian_log_density_terms(x, mean, log_var).sum(-1)


def _gaussian_log_density_terms(x, mean, log_var, nearest=None):
    """log N(x; mean, exp(log_var)) per element, with broadcasting. At a variance of 0 (log_var =
    -inf) away from the mean, w^2 = +inf outgrows log_var = -inf: the term is -inf (a density of
    0), not -inf + inf = NaN; w is held constant there as wherever it overflows, so that
    d/dlog_var is -1/2 (the kernels'). With ``nearest`` (a constant |w| per element) the term is
    shifted by nearest^2 / 2, the square taken as (|w| - nearest)(|w| + nearest): exactly 0 where
    |w| = nearest, even where w^2 overflows."""
    w = standardised(x, mean, log_var)
    square = w**2 if nearest is None else (w.abs() - nearest) * (w.abs() + nearest)
    zero_variance = torch.isneginf(log_var) & torch.isinf(w)
    log_var_b = log_var.expand(w.shape)
    plus_inf = _StraightThrough.apply(log_var_b, torch.full_like(w, float("inf")))
    quad = torch.where(zero_variance, plus_inf, log_var_b + square)
    return -0.5 * (LOG_2PI + quad)


def gaussian_kl(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)) summed over the last dim; +inf at log_var = +inf (where
    expm1(log_var) - log_var is inf - inf), with the gradient exp(log_var) / 2 = +inf there: the
    infinite slice goes through exp alone, and the other branch sees 0 (its backward would be NaN)."""
    infinite = torch.isposinf(log_var)
    finite = torch.where(infinite, 0.0, log_var)
    # exp sees only the infinite slice: exp(1e4) = inf elsewhere would pass 0 * inf = NaN back
    # through the unselected branch.
    excess = torch.where(infinite, torch.exp(torch.where(infinite, log_var, 0.0)), torch.expm1(finite) - finite)
    return 0.5 * (excess + mean**2).sum(-1)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    return {"none": values, "mean": values.mean(), "sum": values.sum()}[reduction]


def iwae_bound(
    logits,
    x,
    log_pz,
    log_qz,
    *,
    likelihood="bernoulli",
    estimator="iwae",
    reduction="none",
    log_var=None,
    z=None,
    q=None,
):
    """log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x) per example; see :func:`vaekernels.iwae_bound`."""
    if likelihood == "bernoulli":
        log_px = bernoulli_log_prob(logits, x)
    else:
        log_var = torch.broadcast_to(log_var, logits.shape)
        log_px = gaussian_log_prob(x.unsqueeze(1).flatten(2), logits.flatten(2), log_var.flatten(2))
    if q is not None:
        q_mean, q_log_var = (t.unsqueeze(1) if t.dim() == 2 else t for t in q)
        if estimator in ("dreg", "stl"):
            q_mean, q_log_var = q_mean.detach(), q_log_var.detach()
        log_qz = gaussian_log_prob(z, q_mean, q_log_var)
    log_w = log_px + log_pz - log_qz
    if estimator == "dreg":
        empty = torch.isneginf(log_w).all(1, keepdim=True)
        weights = torch.where(empty, 0.0, torch.softmax(log_w, dim=1)).detach()
        z.register_hook(lambda grad: grad * weights.unsqueeze(-1))
    return _reduce(log_mean_exp(log_w, dim=1), reduction)


@torch.no_grad()
def importance_sampled_nll(
    x,
    encode,
    decode,
    num_samples=5000,
    chunk_size=500,
    *,
    likelihood="bernoulli",
    log_var=None,
    progress=False,
    generator=None,
):
    """-log p(x) from all ``num_samples`` importance samples at once (memory grows with K)."""
    mean, q_log_var = encode(x)
    eps = torch.randn(
        mean.shape[0], num_samples, mean.shape[1], generator=generator, dtype=mean.dtype, device=mean.device
    )
    z = mean.unsqueeze(1) + torch.exp(0.5 * q_log_var).unsqueeze(1) * eps
    log_pz = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
    log_qz = gaussian_log_prob(z, mean.unsqueeze(1), q_log_var.unsqueeze(1))
    return -iwae_bound(decode(z), x, log_pz, log_qz, likelihood=likelihood, log_var=log_var)


def aggregate_posterior_log_density(z, mean, log_var, *, dataset_size=None, per_dim=False):
    """log q(z_i) = logsumexp_j log q(z_i | x_j) - log(B [* dataset_size]), materialising [B, B, d]."""
    table = gaussian_log_prob(
        z.unsqueeze(1).unsqueeze(-1), mean.unsqueeze(0).unsqueeze(-1), log_var.unsqueeze(0).unsqueeze(-1)
    )  # [B, N, d]: each dim's density
    if not per_dim:
        table = table.sum(-1)
    # log_mean_exp, not logsumexp: a z of density 0 under every posterior (an infinite z) gives
    # -inf with no gradient, where logsumexp's backward is exp(-inf - -inf) = NaN.
    return log_mean_exp(table, dim=1) - math.log(dataset_size or 1)


def marginal_kl(z, mean, log_var, *, dataset_size=None):
    """KL(q(z) || p(z)) estimated as mean_i [log q(z_i) - log p(z_i)]."""
    log_qz = aggregate_posterior_log_density(z, mean, log_var, dataset_size=dataset_size)
    return (log_qz - gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))).mean()


def mutual_information(z, mean, log_var, *, dataset_size=None):
    """Index-code mutual information: mean_i [log q(z_i | x_i) - log q(z_i)]."""
    log_qz = aggregate_posterior_log_density(z, mean, log_var, dataset_size=dataset_size)
    return (gaussian_log_prob(z, mean, log_var) - log_qz).mean()


def total_correlation(z, mean, log_var, *, dataset_size=None):
    """Total correlation: mean_i [log q(z_i) - sum_k log q(z_ik)].

    Every term log q(z_ik | x_j) is shifted by the same nearest[i, k]^2 / 2 for all j, nearest the
    smallest |w| = |z_ik - mean_jk| / std_jk over j: the difference cancels it, and the nearest
    posterior's term stays finite where w^2 overflows (a code 1e30 out in float32, whose
    log-densities are -inf but whose correlation is not), as in the fused kernels."""
    z, mean, log_var = z.unsqueeze(1), mean.unsqueeze(0), log_var.unsqueeze(0)  # [B, 1, d], [1, N, d]
    nearest = standardised(z, mean, log_var).detach().abs().amin(1, keepdim=True)
    nearest = torch.where(torch.isinf(nearest), 0.0, nearest)  # no posterior in reach: no shift
    table = _gaussian_log_density_terms(z, mean, log_var, nearest)  # [B, N, d]
    normaliser = math.log(dataset_size or 1)
    joint = log_mean_exp(table.sum(-1), dim=1) - normaliser
    marginals = log_mean_exp(table, dim=1) - normaliser
    return (joint - marginals.sum(-1)).mean()
