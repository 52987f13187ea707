"""The decoder's output layer with the Bernoulli likelihood and the bound, as plain PyTorch: the
logits [B, K, D] made whole by the linear layer, then the bound of :mod:`.iwae`."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .iwae import bernoulli_log_prob, iwae_bound


def linear_iwae_bound(
    h, weight, bias, x, log_pz, log_qz=None, *, estimator="iwae", reduction="none", z=None, q=None, chunk_size=None
):
    """:func:`vaekernels.linear_iwae_bound`: ``iwae_bound(linear(h, weight, bias), x, ...)``."""
    return iwae_bound(
        F.linear(h, weight, bias), x.flatten(1), log_pz, log_qz, estimator=estimator, reduction=reduction, z=z, q=q
    )


def linear_expected_log_prob(h: torch.Tensor, weight, bias, x: torch.Tensor, *, chunk_size=None) -> torch.Tensor:
    """:func:`vaekernels.linear_expected_log_prob`: the mean over K of ``bernoulli_log_prob(linear(h), x)``."""
    return bernoulli_log_prob(F.linear(h, weight, bias), x.flatten(1)).mean(1)
