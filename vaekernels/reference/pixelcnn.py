"""PixelCNN ops in plain PyTorch, the pytorch-generative way: the test oracle and the bench baseline.

Masked convolutions zero the masked taps of a dense kernel on every call (so every masked tap is
still multiplied, and masked weights still receive gradients); gates are unfused tanh / sigmoid,
concat-ELU an ELU of a concatenation.
Each function has the signature of its fused counterpart in :mod:`vaekernels.ops.pixelcnn`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(
    out_channels: int,
    in_channels: int,
    kernel_size: tuple[int, int],
    mask_type: str,
    channel_groups: int = 1,
    *,
    dtype=torch.float32,
    device=None,
) -> torch.Tensor:
    """The [out, in, kh, kw] 0/1 mask of a PixelCNN convolution.

    Rows above the centre and taps left of it are kept. The centre tap is kept for type "B" and
    dropped for type "A"; with ``channel_groups`` G (e.g. 3 for RGB, channels split into G
    contiguous blocks) it connects output group g to input groups < g (type A) or <= g (type B).
    """
    kh, kw = kernel_size
    mask = torch.zeros(out_channels, in_channels, kh, kw, dtype=dtype, device=device)
    mask[:, :, : kh // 2] = 1
    mask[:, :, kh // 2, : kw // 2] = 1
    out_group = torch.arange(out_channels, device=device) * channel_groups // out_channels
    in_group = torch.arange(in_channels, device=device) * channel_groups // in_channels
    seen = in_group[None, :] < out_group[:, None] if mask_type == "A" else in_group[None, :] <= out_group[:, None]
    mask[:, :, kh // 2, kw // 2] = seen.to(dtype)
    return mask


def masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask_type: str = "B",
    *,
    channel_groups: int = 1,
) -> torch.Tensor:
    """A "same"-padded convolution with the dense weight's masked taps (:func:`causal_mask`) set to 0;
    selected rather than multiplied by the mask, so that an inf or NaN in a masked tap is dropped
    (inf * 0 would be NaN), as the fused op, which never reads those taps, drops it."""
    out_channels, in_channels, kh, kw = weight.shape
    mask = causal_mask(
        out_channels, in_channels, (kh, kw), mask_type, channel_groups, dtype=weight.dtype, device=weight.device
    )
    return F.conv2d(x, torch.where(mask.bool(), weight, 0.0), bias, padding=(kh // 2, kw // 2))


def gated_activation(x: torch.Tensor, cond: torch.Tensor | None = None, gate: str = "tanh") -> torch.Tensor:
    """tanh(a + c_a) * sigmoid(b + c_b) (or (a + c_a) * sigmoid(b + c_b) for ``gate="linear"``), where
    a, b = x.chunk(2, dim=1) and c_a, c_b = cond.chunk(2, dim=1) broadcast over the spatial dims."""
    if cond is not None:
        x = x + cond.reshape(*cond.shape, *([1] * (x.dim() - 2)))
    a, b = x.chunk(2, dim=1)
    return (torch.tanh(a) if gate == "tanh" else a) * torch.sigmoid(b)


def concat_elu(x: torch.Tensor, padding=None) -> torch.Tensor:
    """elu(cat([x, -x], 1)): PixelCNN++'s nonlinearity, [B, C, *spatial] -> [B, 2C, *spatial], then
    F.pad'ed by ``padding`` = (left, right, top, bottom) where given."""
    out = F.elu(torch.cat([x, -x], 1))
    return out if padding is None else F.pad(out, padding)


def gated_pixelcnn_layer(layer, v: torch.Tensor, h: torch.Tensor, cond: torch.Tensor | None = None):
    """:class:`vaekernels.nn.GatedPixelCNNLayer` built the pytorch-generative way from the same
    parameters: dense k x k (vertical) and 1 x k (horizontal) kernels times their masks, the link
    on a shifted copy of the vertical pre-activation, unfused gates. Returns (v_out, h_out, skip)."""
    k, half, channels = layer.kernel_size, layer.kernel_size // 2, layer.channels
    v_dense = F.pad(layer.v_weight, (0, 0, 0, half))  # rows below the centre, masked
    v_mask = torch.zeros_like(v_dense)
    v_mask[:, :, : half + 1] = 1
    h_dense = F.pad(layer.h_weight, (0, k - layer.h_weight.shape[-1]))
    h_mask = torch.zeros_like(h_dense)
    h_mask[..., : layer.h_weight.shape[-1]] = 1
    cond_v = cond_h = None
    if cond is not None:
        cond_v, cond_h = layer.cond(cond).chunk(2, dim=1)
    v_pre = F.conv2d(v, v_dense * v_mask, layer.v_bias, padding=half)
    v_out = gated_activation(v_pre, cond_v, layer.gate)
    v_shifted = F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1]
    h_pre = F.conv2d(h, h_dense * h_mask, layer.h_bias, padding=(0, half)) + F.conv2d(v_shifted, layer.link_weight)
    out = F.conv2d(gated_activation(h_pre, cond_h, layer.gate), layer.out_weight, layer.out_bias)
    res, skip = out[:, :channels], out[:, channels:]
    return v_out, (h + res if layer.residual else res), (skip if layer.skip_channels else None)
