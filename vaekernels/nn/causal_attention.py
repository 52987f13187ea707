"""Strictly causal attention over the raster order of a feature map (PixelSNAIL's attention block)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops._checks import check_float, check_int, fail
from ..ops.causal_attention import causal_attention

_NAME = "nn.CausalAttention2d"


class CausalAttention2d(nn.Module):
    """Multi-head attention in which pixel i of a [B, C, H, W] map reads only pixels before it in
    raster order, through :func:`vaekernels.causal_attention` (memory linear in H * W).

    Queries come from ``query`` and keys and values from ``context`` (PixelSNAIL: the features,
    and the features concatenated with the image), each through a 1x1 convolution. Pixel (0, 0)
    reads nothing and gets 0 (before the output projection's bias).

    Example:
        >>> import torch
        >>> from vaekernels.nn import CausalAttention2d
        >>> attend = CausalAttention2d(8, 9, key_channels=4, value_channels=6, heads=2)
        >>> attend(torch.randn(2, 8, 5, 5), torch.randn(2, 9, 5, 5)).shape
        torch.Size([2, 6, 5, 5])
    """

    def __init__(
        self,
        query_channels: int,
        context_channels: int,
        key_channels: int = 16,
        value_channels: int = 32,
        heads: int = 1,
    ):
        super().__init__()
        for arg, value in (
            ("query_channels", query_channels),
            ("context_channels", context_channels),
            ("key_channels", key_channels),
            ("value_channels", value_channels),
            ("heads", heads),
        ):
            check_int(_NAME, arg, value)
        if key_channels % heads or value_channels % heads:
            fail(
                _NAME,
                f"key_channels ({key_channels}) and value_channels ({value_channels}) must be multiples of "
                f"heads ({heads})",
            )
        self.heads = heads
        self.query = nn.Conv2d(query_channels, key_channels, 1)
        self.key = nn.Conv2d(context_channels, key_channels, 1)
        self.value = nn.Conv2d(context_channels, value_channels, 1)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        B, C, H, W = t.shape
        return t.reshape(B, self.heads, C // self.heads, H * W).transpose(-1, -2)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for arg, t, conv in (("query", query, self.query), ("context", context, self.key)):
            check_float(_NAME, arg, t, conv.weight, "the module's parameters")
            if t.dim() != 4 or t.shape[1] != conv.in_channels or 0 in t.shape:
                fail(
                    _NAME, f"{arg} must have shape [B, {conv.in_channels}, H, W] with B, H, W >= 1, got {list(t.shape)}"
                )
        if context.shape[0] != query.shape[0] or context.shape[2:] != query.shape[2:]:
            fail(
                _NAME,
                f"context must have query's batch and spatial size [{query.shape[0]}, *, "
                f"{query.shape[2]}, {query.shape[3]}], got {list(context.shape)}",
            )
        B, _, H, W = query.shape
        out = causal_attention(
            self._split(self.query(query)), self._split(self.key(context)), self._split(self.value(context))
        )
        return out.transpose(-1, -2).reshape(B, -1, H, W)
