"""Modules of the importance-weighted bound family."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.iwae import ESTIMATORS, LIKELIHOODS, REDUCTIONS, iwae_bound


class IWAEBound(nn.Module):
    """The importance-weighted bound as a module; see :func:`vaekernels.iwae_bound`.

    Example:
        >>> import torch, vaekernels
        >>> bound = vaekernels.nn.IWAEBound(estimator="iwae", reduction="mean")
        >>> logits, x = torch.zeros(2, 3, 4), torch.ones(2, 4)
        >>> bound(logits, x, torch.zeros(2, 3), torch.zeros(2, 3)).shape
        torch.Size([])
    """

    def __init__(self, likelihood: str = "bernoulli", estimator: str = "iwae", reduction: str = "mean"):
        super().__init__()
        for name, value, choices in (("likelihood", likelihood, LIKELIHOODS), ("estimator", estimator, ESTIMATORS),
                                     ("reduction", reduction, REDUCTIONS)):
            if value not in choices:
                raise ValueError(f"vaekernels.nn.IWAEBound: {name} must be one of {choices}, got {value!r}")
        self.likelihood, self.estimator, self.reduction = likelihood, estimator, reduction

    def forward(self, logits: torch.Tensor, x: torch.Tensor, log_pz: torch.Tensor,
                log_qz: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return iwae_bound(logits, x, log_pz, log_qz, likelihood=self.likelihood, estimator=self.estimator,
                          reduction=self.reduction, **kwargs)

    def extra_repr(self) -> str:
        return f"likelihood={self.likelihood!r}, estimator={self.estimator!r}, reduction={self.reduction!r}"
