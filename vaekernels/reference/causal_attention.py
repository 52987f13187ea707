"""Strictly causal attention (PixelSNAIL) in plain PyTorch: the test oracle and the bench baseline.

It builds the full [.., L, L] score matrix, which the fused op never does.
"""

from __future__ import annotations

import math

import torch


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax over j < i of scale * q_i . k_j, applied to v; row 0 attends to nothing and is 0.

    Row 0 is left out of the products (not given zero weights), so that its q and its output's
    gradient reach nothing, even where they are infinite or NaN (0 * inf); the weights of the keys
    a row may not see are 0 after the softmax too (a row with an infinite score, whose softmax is
    NaN, gives no NaN to the values it may not see). A row whose scores are all -inf or hold +inf
    or NaN has no softmax: NaN. Row 1 sees one key, whose weight is 1 whatever its finite score:
    that score passes no gradient (softmax's backward would give it dP - dP, NaN where dP is
    infinite)."""
    L = q.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = scale * q[..., 1:, :] @ k.transpose(-2, -1)  # rows 1..L-1
    one_key = torch.zeros(max(L - 1, 0), 1, dtype=torch.bool, device=q.device)
    one_key[:1] = True
    scores = torch.where(one_key & torch.isfinite(scores), scores.detach(), scores)
    allowed = torch.ones(L, L, dtype=torch.bool, device=q.device).tril(-1)[1:]
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).masked_fill(~allowed, 0.0)
    return torch.cat([torch.zeros_like(v[..., :1, :]), weights @ v], dim=-2)
