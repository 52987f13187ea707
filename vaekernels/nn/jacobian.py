"""Modules of the decoder-Jacobian family."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.jacobian import _grae_regularizer, check_grae_settings

_NAME = "nn.GRAERegularizer"


class GRAERegularizer(nn.Module):
    """The GRAE / GRAE* decoder-Jacobian regulariser as a module; see :func:`vaekernels.grae_regularizer`.

    Example:
        >>> import torch, vaekernels
        >>> decoder = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Softplus(), torch.nn.Linear(8, 5))
        >>> vaekernels.nn.GRAERegularizer(beta=0.5, num_columns=1)(decoder, torch.randn(3, 2)).shape
        torch.Size([3])
    """

    def __init__(self, beta: float, exact: bool = False, num_columns: int | None = None):
        super().__init__()
        check_grae_settings(_NAME, beta, exact, num_columns)
        self.beta, self.exact, self.num_columns = beta, exact, num_columns

    def forward(self, decoder: nn.Module, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return _grae_regularizer(_NAME, decoder, z, self.beta, self.exact, self.num_columns, generator)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, exact={self.exact}, num_columns={self.num_columns}"
