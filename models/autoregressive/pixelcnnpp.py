"""A small PixelCNN++ (Salimans et al. 2017) on 256-level MNIST, with the discretised logistic
mixture likelihood of vaekernels.

As in openai/pixel-cnn, two streams avoid the blind spot without masks: ``u`` sees the rows above
(down-shifted 2x3 convolutions), ``ul`` the rows above and the pixels to the left (down-right
shifted 2x2 convolutions, fed ``u`` through 1x1 short-cuts); gated ResNet blocks with concat-ELU
(:func:`vaekernels.concat_elu`) and the gate a * sigmoid(b) (:func:`vaekernels.gated_activation`,
``gate="linear"``); the head gives a mixture of M logistics per pixel. This small version keeps
one resolution (no down/up-sampling) and no dropout or weight normalisation.

Train for a stated budget of CPU minutes, then evaluate the test NLL in bits/dim and draw samples::

    nice -n 10 python -m models train pixelcnn++ --minutes 2
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import vaekernels
from vaekernels.reference.logistic_mixture import num_params


def down_shift(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def right_shift(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class ShiftedConv2d(nn.Conv2d):
    """A convolution of its input zero-padded by ``shift`` = (left, right, top, bottom): ``forward``
    pads the input itself, ``forward_padded`` takes one already padded so (by
    ``vaekernels.concat_elu(x, padding=conv.shift)``, which writes the padding in its own pass)."""

    shift: tuple[int, int, int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_padded(F.pad(x, self.shift))

    def forward_padded(self, padded: torch.Tensor) -> torch.Tensor:
        return super().forward(padded)


class DownShiftedConv2d(ShiftedConv2d):
    """Output (i, j) reads rows i - kh + 1 .. i, columns j - kw//2 .. j + kw//2: nothing below."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        kh, kw = self.kernel_size
        self.shift = ((kw - 1) // 2, (kw - 1) // 2, kh - 1, 0)


class DownRightShiftedConv2d(ShiftedConv2d):
    """Output (i, j) reads rows i - kh + 1 .. i, columns j - kw + 1 .. j: nothing below or to the right."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        kh, kw = self.kernel_size
        self.shift = (kw - 1, 0, kh - 1, 0)


class GatedResnet(nn.Module):
    """x + a * sigmoid(b), [a, b] = conv(concat_elu(conv(concat_elu(x)) + nin(concat_elu(aux))))."""

    def __init__(self, filters: int, conv: type, kernel_size, aux_filters: int = 0):
        super().__init__()
        self.inner = conv(2 * filters, filters, kernel_size)
        self.aux = nn.Conv2d(2 * aux_filters, filters, 1) if aux_filters else None
        self.outer = conv(2 * filters, 2 * filters, kernel_size)

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
        c = self.inner.forward_padded(vaekernels.concat_elu(x, padding=self.inner.shift))
        if aux is not None:
            c = c + self.aux(vaekernels.concat_elu(aux))
        outer = self.outer.forward_padded(vaekernels.concat_elu(c, padding=self.outer.shift))
        return x + vaekernels.gated_activation(outer, gate="linear")


class PixelCNNPlusPlus(nn.Module):
    """The two-stream network; ``forward(x)`` maps x [B, C, H, W] in [-1, 1] to mixture params
    [B, P, H, W] of each pixel given the pixels before it in raster order."""

    def __init__(self, channels: int = 1, filters: int = 32, blocks: int = 3, mixtures: int = 5):
        super().__init__()
        self.channels, self.mixtures = channels, mixtures
        # The extra input channel of ones tells the network where the zero padding is.
        self.u_init = DownShiftedConv2d(channels + 1, filters, (2, 3))
        self.ul_init_up = DownShiftedConv2d(channels + 1, filters, (1, 3))
        self.ul_init_left = DownRightShiftedConv2d(channels + 1, filters, (2, 1))
        self.u_blocks = nn.ModuleList(GatedResnet(filters, DownShiftedConv2d, (2, 3)) for _ in range(blocks))
        self.ul_blocks = nn.ModuleList(
            GatedResnet(filters, DownRightShiftedConv2d, (2, 2), filters) for _ in range(blocks)
        )
        self.head = nn.Conv2d(filters, num_params(channels, mixtures), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels last from here on: oneDNN's convolutions run 1.2-1.6x faster so on CPU, and
        # concat_elu and gated_activation keep the layout.
        x = torch.cat([x, torch.ones_like(x[:, :1])], 1).contiguous(memory_format=torch.channels_last)
        u = down_shift(self.u_init(x))
        ul = down_shift(self.ul_init_up(x)) + right_shift(self.ul_init_left(x))
        for u_block, ul_block in zip(self.u_blocks, self.ul_blocks, strict=True):
            u = u_block(u)
            ul = ul_block(ul, u)
        return self.head(F.elu(ul))


@torch.no_grad()
def sample_autoregressively(
    step: Callable[[torch.Tensor, int, int], torch.Tensor], n: int, device, start: float = 0.0, size: int = 28
) -> torch.Tensor:
    """Fills an [n, 1, size, size] canvas pixel by pixel in raster order: ``step(canvas, i, j)``
    returns the values of pixel (i, j) for the whole batch (one full forward per pixel)."""
    canvas = torch.full((n, 1, size, size), start, device=device)
    for i in range(size):
        for j in range(size):
            canvas[:, :, i, j] = step(canvas, i, j)
    return canvas


class MixtureModel(nn.Module):
    """An autoregressive network over 256-level images with the logistic mixture likelihood:
    ``loss`` is the per-image NLL in nats, ``sample`` draws pixel by pixel."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        params = self.network(x)
        return vaekernels.discretized_logistic_mixture_nll(params, x, self.network.mixtures, "none").sum((1, 2))

    def sample(self, n: int, generator: torch.Generator, size: int = 28) -> torch.Tensor:
        device = next(self.parameters()).device
        net = self.network

        def step(canvas, i, j):
            params = net(canvas)[:, :, i : i + 1, j : j + 1]
            return vaekernels.discretized_logistic_mixture_sample(params, net.channels, net.mixtures, generator)[
                ..., 0, 0
            ]

        return (sample_autoregressively(step, n, device, start=-1.0, size=size) + 1) / 2
