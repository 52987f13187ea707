"""Decoder Jacobians in plain PyTorch: the oracle of :mod:`vaekernels.ops.jacobian` and the bench baseline.

The public functions build the whole Jacobian ``J = torch.func.vmap(torch.func.jacfwd(decoder))``,
[B, D, d], and reduce it; the two kernel-level ops (the tangent step of one activation and the
reduction of a tangent block through a metric) are written out elementwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("tanh", "sigmoid", "relu", "leaky_relu", "softplus", "elu", "gelu")


def activation_and_derivative(pre: torch.Tensor, activation: str, p0: float, p1: float):
    """(act(pre), act'(pre)) for one of :data:`ACTIVATIONS`; ``p0``, ``p1``: leaky_relu's slope,
    elu's alpha, softplus's beta and threshold (ignored by the others)."""
    if activation == "tanh":
        out = torch.tanh(pre)
        return out, 1 - out * out
    if activation == "sigmoid":
        out = torch.sigmoid(pre)
        return out, out * (1 - out)
    if activation == "relu":
        return torch.relu(pre), (pre > 0).to(pre.dtype)
    if activation == "leaky_relu":
        return F.leaky_relu(pre, p0), torch.where(pre > 0, 1.0, torch.full_like(pre, p0))
    if activation == "softplus":
        return F.softplus(pre, p0, p1), torch.where(pre * p0 > p1, 1.0, torch.sigmoid(pre * p0)).to(pre.dtype)
    if activation == "elu":
        return F.elu(pre, p0), torch.where(pre > 0, 1.0, p0 * torch.exp(pre.clamp(max=0)))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(pre * 0.5**0.5))
        density = torch.exp(-0.5 * pre * pre) * (2 * torch.pi) ** -0.5
        return pre * cdf, cdf + pre * density
    raise ValueError(f"vaekernels.reference.jacobian: unknown activation {activation!r}")


def jacobian_tangent_step(
    pre: torch.Tensor, tangent: torch.Tensor, activation: str, p0: float = 0.0, p1: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One activation layer in forward mode: ``pre`` [B, h] (the pre-activations), ``tangent``
    [P, k, h] with P = B or 1 (the tangents of ``pre`` along k directions, shared by the batch
    when P = 1) -> (act(pre) [B, h], act'(pre)[:, None, :] * tangent [B, k, h])."""
    out, slope = activation_and_derivative(pre, activation, p0, p1)
    return out, slope.unsqueeze(1) * tangent


def jacobian_gram_reduce(
    tangent: torch.Tensor, metric: torch.Tensor, diagonal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """For a tangent block T [B, k, h] and a metric M [h, h]: (T M Tᵀ per example, [B, k, k], or only
    its diagonal, [B, k]; and T M). With M = WᵀW of the last linear layer, the first is JᵀJ or the
    squared column norms of J = T Wᵀ."""
    tm = tangent @ metric
    if diagonal:
        return (tm * tangent).sum(-1), tm
    return tm @ tangent.transpose(-1, -2), tm


def jacobian(decoder, z: torch.Tensor) -> torch.Tensor:
    """J_g(z) [B, D, d] of the decoder at each row of z [B, d], output flattened to D."""

    def single(row):
        return decoder(row.unsqueeze(0)).reshape(-1)

    return torch.func.vmap(torch.func.jacfwd(single))(z)


def jacobian_column_sq_norms(decoder, z: torch.Tensor, columns=None) -> torch.Tensor:
    """‖∂g(z)/∂z_i‖² for every column i (or those in ``columns``): [B, d] (or [B, len(columns)])."""
    jac = jacobian(decoder, z)
    if columns is not None:
        jac = jac[..., torch.as_tensor(columns, device=z.device, dtype=torch.long)]
    return jac.pow(2).sum(1)


def jacobian_gram(decoder, z: torch.Tensor) -> torch.Tensor:
    """JᵀJ [B, d, d]."""
    jac = jacobian(decoder, z)
    return jac.transpose(1, 2) @ jac


def sample_columns(d: int, num_columns: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``num_columns`` distinct columns of d, uniformly: the draw of the sampled GRAE* estimate."""
    return torch.randperm(d, generator=generator)[:num_columns]


def grae_regularizer(
    decoder,
    z: torch.Tensor,
    beta: float,
    *,
    exact: bool = False,
    num_columns: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per example [B]: Σ_i log(1 + ‖J_i‖²/β) (GRAE*), its estimate from ``num_columns`` sampled
    columns scaled by d / num_columns, or with ``exact`` log det(I + JᵀJ/β) (GRAE)."""
    d = z.shape[-1]
    if exact:
        gram = jacobian_gram(decoder, z)
        return torch.logdet(torch.eye(d, dtype=z.dtype, device=z.device) + gram / beta)
    if num_columns is None:
        return torch.log1p(jacobian_column_sq_norms(decoder, z) / beta).sum(-1)
    columns = sample_columns(d, num_columns, generator)
    return torch.log1p(jacobian_column_sq_norms(decoder, z, columns) / beta).sum(-1) * (d / num_columns)
