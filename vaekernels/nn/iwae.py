"""Modules of the importance-weighted bound family."""

from __future__ import annotations

import torch
from torch import nn

from ..ops._checks import check_float, check_int, fail
from ..ops.iwae import ESTIMATORS, LIKELIHOODS, REDUCTIONS, _iwae_bound
from ..ops.linear_iwae import _linear_expected_log_prob, _linear_iwae_bound


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
        for name, value, choices in (
            ("likelihood", likelihood, LIKELIHOODS),
            ("estimator", estimator, ESTIMATORS),
            ("reduction", reduction, REDUCTIONS),
        ):
            if value not in choices:
                raise ValueError(f"vaekernels.nn.IWAEBound: {name} must be one of {choices}, got {value!r}")
        self.likelihood, self.estimator, self.reduction = likelihood, estimator, reduction

    def forward(
        self,
        logits: torch.Tensor,
        x: torch.Tensor,
        log_pz: torch.Tensor,
        log_qz: torch.Tensor | None = None,
        *,
        log_var: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
        q: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return _iwae_bound(
            "nn.IWAEBound", logits, x, log_pz, log_qz, self.likelihood, self.estimator, self.reduction, log_var, z, q
        )

    def extra_repr(self) -> str:
        return f"likelihood={self.likelihood!r}, estimator={self.estimator!r}, reduction={self.reduction!r}"


class BernoulliLinear(nn.Linear):
    """A decoder's output layer of Bernoulli logits that computes the likelihood and the bound
    without making the logits; see :func:`vaekernels.linear_iwae_bound`.

    Called as a module it is the :class:`torch.nn.Linear` it extends (same parameters, same state
    dict), so it replaces a decoder's last ``nn.Linear`` in place and loads its checkpoints.

    Example:
        >>> import torch, vaekernels
        >>> layer = vaekernels.nn.BernoulliLinear(8, 6)
        >>> h, x = torch.randn(4, 5, 8), torch.rand(4, 6).round()
        >>> log_pz, log_qz = torch.randn(4, 5), torch.randn(4, 5)
        >>> layer.iwae_bound(h, x, log_pz, log_qz, reduction="mean").shape
        torch.Size([])
        >>> layer.expected_log_prob(h, x).shape
        torch.Size([4])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        for arg, value in (("in_features", in_features), ("out_features", out_features)):
            check_int("nn.BernoulliLinear", arg, value)
        super().__init__(in_features, out_features, bias, device, dtype)

    def _check_h(self, fn: str, h) -> None:
        """h against the layer (the op itself would name its weight, which the caller did not pass)."""
        check_float(fn, "h", h, self.weight, "the layer's parameters")
        if h.dim() != 3 or h.shape[2] != self.in_features or 0 in h.shape:
            fail(fn, f"h must have shape [B, K, in_features = {self.in_features}] with B, K >= 1, got {list(h.shape)}")

    def iwae_bound(
        self,
        h: torch.Tensor,
        x: torch.Tensor,
        log_pz: torch.Tensor,
        log_qz: torch.Tensor | None = None,
        *,
        estimator: str = "iwae",
        reduction: str = "none",
        z: torch.Tensor | None = None,
        q: tuple[torch.Tensor, torch.Tensor] | None = None,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """The bound of ``x`` under logits ``self(h)``, h [B, K, in_features]: :func:`vaekernels.linear_iwae_bound`."""
        fn = "nn.BernoulliLinear.iwae_bound"
        self._check_h(fn, h)
        return _linear_iwae_bound(
            fn, h, self.weight, self.bias, x, log_pz, log_qz, estimator, reduction, z, q, chunk_size
        )

    def expected_log_prob(self, h: torch.Tensor, x: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
        """(1/K) sum_k log p(x | logits self(h_k)) [B]: :func:`vaekernels.linear_expected_log_prob`."""
        fn = "nn.BernoulliLinear.expected_log_prob"
        self._check_h(fn, h)
        return _linear_expected_log_prob(fn, h, self.weight, self.bias, x, chunk_size)
