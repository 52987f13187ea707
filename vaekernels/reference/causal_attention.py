"""Strictly causal attention (PixelSNAIL) in plain PyTorch: the test oracle and the bench baseline.

It builds the full [.., L, L] score matrix, which the fused op never does.
"""

from __future__ import annotations

import math

import torch


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax over j < i of scale * q_i . k_j, applied to v; row 0 attends to nothing and is 0."""
    L = q.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = scale * q @ k.transpose(-2, -1)
    allowed = torch.ones(L, L, dtype=torch.bool, device=q.device).tril(-1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # Row 0 has no allowed key: its softmax would be 0/0; a zero score row then zero weights.
    empty = ~allowed.any(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return weights @ v
