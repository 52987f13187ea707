"""Modules of the PixelCNN family: masked convolution and the Gated PixelCNN layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._checks import check_float, check_int, fail
from ..ops.pixelcnn import (
    GATES,
    MASK_TYPES,
    causal_conv2d,
    gated_activation,
    gated_conv1x1,
    linked_horizontal,
    masked_conv2d,
)
from ..reference.pixelcnn import causal_mask

_LAYER, _MODEL, _CONV = "nn.GatedPixelCNNLayer", "nn.GatedPixelCNN", "nn.MaskedConv2d"


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _int_or_pair(fn: str, arg: str, value) -> tuple[int, int]:
    """``value`` as a pair of ints, from an int or a pair of ints."""
    if not (isinstance(value, int) or isinstance(value, (tuple, list)) and len(value) == 2) or isinstance(value, bool):
        fail(fn, f"{arg} must be an int or a pair of ints, got {value!r}", TypeError)
    for item in _pair(value):
        check_int(fn, arg, item, minimum=0)
    return _pair(value)


class MaskedConv2d(nn.Conv2d):
    """A drop-in ``nn.Conv2d`` for PixelCNNs: "same" padding, stride 1, causal mask "A" or "B".

    The weight keeps ``nn.Conv2d``'s dense shape (state dicts load either way), but only its
    causal taps are ever read (:func:`vaekernels.masked_conv2d`): masked taps start at zero, get
    exactly zero gradient, and so stay zero through any optimiser step, weight decay included.
    ``channel_groups`` (e.g. 3 for RGB) masks the centre pixel between channel blocks.

    Example:
        >>> import torch, vaekernels
        >>> conv = vaekernels.nn.MaskedConv2d(3, 6, 5, mask_type="A", channel_groups=3)
        >>> conv(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 6, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        mask_type: str = "B",
        *,
        channel_groups: int = 1,
        bias: bool = True,
        stride=1,
        padding="same",
        dilation=1,
        groups: int = 1,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ):
        name = "vaekernels.nn.MaskedConv2d"
        for arg, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("channel_groups", channel_groups),
            ("groups", groups),
        ):
            check_int(_CONV, arg, value)
        kh, kw = _int_or_pair(_CONV, "kernel_size", kernel_size)
        for arg, value in (("kernel_size", kh), ("kernel_size", kw)):
            check_int(_CONV, arg, value)
        stride, dilation = _int_or_pair(_CONV, "stride", stride), _int_or_pair(_CONV, "dilation", dilation)
        if padding != "same":
            padding = _int_or_pair(_CONV, "padding", padding)
        if mask_type not in MASK_TYPES:
            raise ValueError(f"{name}: mask_type must be 'A' or 'B', got {mask_type!r}")
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"{name}: kernel_size must be odd (a centre tap), got {(kh, kw)}")
        if _pair(stride) != (1, 1) or _pair(dilation) != (1, 1) or groups != 1 or padding_mode != "zeros":
            raise ValueError(
                f"{name}: only stride=1, dilation=1, groups=1, padding_mode='zeros' keep the mask "
                f"causal, got stride={stride}, dilation={dilation}, groups={groups}, "
                f"padding_mode={padding_mode!r}"
            )
        if padding != "same" and _pair(padding) != (kh // 2, kw // 2):
            raise ValueError(f"{name}: padding must be 'same' = {(kh // 2, kw // 2)}, got {padding}")
        if channel_groups < 1 or in_channels % channel_groups or out_channels % channel_groups:
            raise ValueError(
                f"{name}: channel_groups must divide in_channels and out_channels, got {channel_groups} "
                f"for {in_channels} -> {out_channels}"
            )
        super().__init__(
            in_channels, out_channels, (kh, kw), padding=(kh // 2, kw // 2), bias=bias, device=device, dtype=dtype
        )
        self.mask_type, self.channel_groups = mask_type, channel_groups
        with torch.no_grad():
            self.weight.mul_(
                causal_mask(
                    out_channels,
                    in_channels,
                    (kh, kw),
                    mask_type,
                    channel_groups,
                    dtype=self.weight.dtype,
                    device=self.weight.device,
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Checked against the module, not as masked_conv2d would (naming a weight the caller did not pass).
        check_float(_CONV, "x", x, self.weight, "the module's parameters")
        if x.dim() != 4 or x.shape[1] != self.in_channels or 0 in x.shape:
            fail(
                _CONV,
                f"x must have shape [B, in_channels = {self.in_channels}, H, W] with B, H, W >= 1, got {list(x.shape)}",
            )
        return masked_conv2d(x, self.weight, self.bias, self.mask_type, channel_groups=self.channel_groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask_type={self.mask_type!r}, channel_groups={self.channel_groups}"


class GatedPixelCNNLayer(nn.Module):
    """One Gated PixelCNN layer (van den Oord et al., 2016): a vertical and a horizontal stack
    without a blind spot, the vertical-to-horizontal link, residual and skip outputs, and an
    optional condition (e.g. a class embedding) added inside the gate.

    - vertical: ``v_pre = conv(v)`` over rows i - k//2 .. i (all columns within k//2);
      ``v_out = gate(v_pre + V_v cond)``. Row i of the vertical stack may see row i of the
      image; the horizontal stack reads it shifted down one row, so nothing of row i reaches it.
    - horizontal: ``h_pre = conv(h)`` over columns j - k//2 .. j of row i (type "A", the first
      layer: .. j - 1) plus a 1x1 link of ``v_pre`` from row i - 1; ``[res, skip] =
      conv1x1(gate(h_pre + V_h cond))``; ``h_out = h + res`` (type "B" with matching channels)
      or ``res``.

    Only causal taps exist as parameters: the vertical kernel is (k//2 + 1) x k, the horizontal
    one 1 x (k//2 + 1) (type "A": 1 x k//2). The gate is :func:`vaekernels.gated_activation`;
    the output convolution recomputes the gated tensor in backward instead of keeping it.
    ``forward(v, h, cond=None)`` returns ``(v_out, h_out, skip)`` (skip is None without skip channels).

    Example:
        >>> import torch, vaekernels
        >>> layer = vaekernels.nn.GatedPixelCNNLayer(1, 8, 3, mask_type="A", skip_channels=4, cond_features=10)
        >>> v, h, skip = layer(torch.rand(2, 1, 6, 6), torch.rand(2, 1, 6, 6), torch.eye(10)[:2])
        >>> v.shape, h.shape, skip.shape
        (torch.Size([2, 8, 6, 6]), torch.Size([2, 8, 6, 6]), torch.Size([2, 4, 6, 6]))
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        kernel_size: int = 3,
        mask_type: str = "B",
        *,
        skip_channels: int = 0,
        cond_features: int = 0,
        gate: str = "tanh",
        residual: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        name = "vaekernels.nn.GatedPixelCNNLayer"
        if mask_type not in MASK_TYPES:
            raise ValueError(f"{name}: mask_type must be 'A' or 'B', got {mask_type!r}")
        if gate not in GATES:
            raise ValueError(f"{name}: gate must be one of {GATES}, got {gate!r}")
        if not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"{name}: kernel_size must be an odd int >= 3, got {kernel_size!r}")
        for arg, value, minimum in (
            ("in_channels", in_channels, 1),
            ("channels", channels, 1),
            ("skip_channels", skip_channels, 0),
            ("cond_features", cond_features, 0),
        ):
            check_int(_LAYER, arg, value, minimum)
        factory = {"device": device, "dtype": dtype}
        half = kernel_size // 2
        self.in_channels, self.channels, self.kernel_size = in_channels, channels, kernel_size
        self.mask_type, self.gate, self.skip_channels = mask_type, gate, skip_channels
        # A type-A layer's input holds the pixel being predicted, so it must not pass through.
        self.residual = residual and mask_type == "B" and in_channels == channels
        self.v_weight = nn.Parameter(torch.empty(2 * channels, in_channels, half + 1, kernel_size, **factory))
        self.v_bias = nn.Parameter(torch.empty(2 * channels, **factory))
        width = half + (mask_type == "B")
        self.h_weight = nn.Parameter(torch.empty(2 * channels, in_channels, 1, width, **factory))
        self.h_bias = nn.Parameter(torch.empty(2 * channels, **factory))
        self.link_weight = nn.Parameter(torch.empty(2 * channels, 2 * channels, 1, 1, **factory))
        self.out_weight = nn.Parameter(torch.empty(channels + skip_channels, channels, 1, 1, **factory))
        self.out_bias = nn.Parameter(torch.empty(channels + skip_channels, **factory))
        self.cond = nn.Linear(cond_features, 4 * channels, bias=False, **factory) if cond_features else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's default, with the fan-in of the causal taps that exist.
        for weight, bias in (
            (self.v_weight, self.v_bias),
            (self.h_weight, self.h_bias),
            (self.link_weight, None),
            (self.out_weight, self.out_bias),
        ):
            bound = 1 / math.sqrt(weight[0].numel())
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)

    def conditions(self, cond: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The [B, 2C] condition terms of the vertical and the horizontal gate."""
        if self.cond is None or cond is None:
            if (self.cond is None) != (cond is None):
                raise ValueError(
                    f"vaekernels.nn.GatedPixelCNNLayer: cond must be given exactly when the layer has "
                    f"cond_features ({self.cond.in_features if self.cond else 0}), got "
                    f"{None if cond is None else list(cond.shape)}"
                )
            return None, None
        check_float(_LAYER, "cond", cond, self.cond.weight, "the layer's parameters")
        if cond.dim() != 2 or cond.shape[1] != self.cond.in_features:
            fail(
                _LAYER,
                f"cond must have shape [B, cond_features] = [B, {self.cond.in_features}], got {list(cond.shape)}",
            )
        return self.cond(cond).chunk(2, dim=1)

    def _check_inputs(self, v: torch.Tensor, h: torch.Tensor, cond: torch.Tensor | None) -> None:
        for arg, t in (("v", v), ("h", h)):
            check_float(_LAYER, arg, t, self.v_weight, "the layer's parameters")
            if t.dim() != 4 or t.shape[1] != self.in_channels or 0 in t.shape:
                fail(
                    _LAYER,
                    f"{arg} must have shape [B, in_channels = {self.in_channels}, H, W] with B, H, W >= 1, "
                    f"got {list(t.shape)}",
                )
        if h.shape != v.shape:
            fail(_LAYER, f"h must have v's shape {list(v.shape)}, got {list(h.shape)}")
        if cond is not None and cond.shape[0] != v.shape[0]:
            fail(_LAYER, f"cond must have v's batch size {v.shape[0]}, got shape {list(cond.shape)}")

    def forward(self, v: torch.Tensor, h: torch.Tensor, cond: torch.Tensor | None = None):
        self._check_inputs(v, h, cond)
        half = self.kernel_size // 2
        cond_v, cond_h = self.conditions(cond)
        # Row i of the vertical output reads rows i - k//2 .. i; column j of the horizontal one
        # columns j - k//2 .. j (type "A": .. j - 1). Padded on the causal sides only, the inputs
        # rather than cropped outputs: the [B, 2C] tensors all have one size, which glibc's malloc
        # reuses from step to step, where outputs a row or a column larger left holes and page
        # faults; the padded [B, C] copies are smaller than the holes.
        v_pre = causal_conv2d(v, [(self.v_weight, half, half)], self.v_bias)
        v_out = gated_activation(v_pre, cond_v, self.gate)
        # The link reads the vertical pre-activation one row up (an unpadded 1x1 convolution: a
        # plain matrix product; a padded one takes a slower convolution path).
        h_pre = linked_horizontal(
            causal_conv2d(h, [(self.h_weight, 0, half)], self.h_bias), F.conv2d(v_pre, self.link_weight)
        )
        out = gated_conv1x1(h_pre, cond_h, self.out_weight, self.out_bias, self.gate)
        res, skip = out.split([self.channels, self.skip_channels], dim=1)
        h_out = h + res if self.residual else res
        return v_out, h_out, (skip if self.skip_channels else None)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.channels}, kernel_size={self.kernel_size}, mask_type={self.mask_type!r}, "
            f"skip_channels={self.skip_channels}, gate={self.gate!r}, residual={self.residual}"
        )


class GatedPixelCNN(nn.Module):
    """A (class-)conditional Gated PixelCNN: a type-A layer of kernel ``first_kernel``, then
    ``layers - 1`` type-B layers of kernel ``kernel_size``, their skip outputs summed into a
    1x1-convolution head. ``levels=2`` models binary pixels (one Bernoulli logit per channel),
    ``levels=256`` bytes (a 256-way softmax per channel). The channels of one pixel are modelled
    independently given the pixels before it.

    :meth:`sample` draws images pixel by pixel; with ``cached=True`` each layer computes only what
    the new pixel changes (one horizontal-stack pixel per layer and pixel, one vertical-stack row
    per layer and row), giving the same images as the naive full forward per pixel under the
    same random numbers.

    Example:
        >>> import torch, vaekernels
        >>> model = vaekernels.nn.GatedPixelCNN(channels=8, layers=2, num_classes=10)
        >>> x, y = torch.rand(2, 1, 5, 5).round(), torch.tensor([3, 7])
        >>> model.nll(x, y).shape, model.sample(2, (5, 5), y).shape
        (torch.Size([2]), torch.Size([2, 1, 5, 5]))
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 64,
        layers: int = 8,
        *,
        kernel_size: int = 3,
        first_kernel: int = 7,
        levels: int = 2,
        num_classes: int = 0,
        head_channels: int | None = None,
        gate: str = "tanh",
    ):
        super().__init__()
        for arg, value, minimum in (
            ("in_channels", in_channels, 1),
            ("channels", channels, 1),
            ("layers", layers, 1),
            ("levels", levels, 2),
            ("num_classes", num_classes, 0),
        ):
            check_int(_MODEL, arg, value, minimum)
        if head_channels is not None:
            check_int(_MODEL, "head_channels", head_channels)
        if gate not in GATES:
            fail(_MODEL, f"gate must be one of {GATES}, got {gate!r}")
        for arg, value in (("kernel_size", kernel_size), ("first_kernel", first_kernel)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 3 or value % 2 == 0:
                fail(_MODEL, f"{arg} must be an odd int >= 3, got {value!r}")
        self.in_channels, self.levels, self.num_classes = in_channels, levels, num_classes
        self.layers = nn.ModuleList(
            GatedPixelCNNLayer(
                in_channels if i == 0 else channels,
                channels,
                first_kernel if i == 0 else kernel_size,
                "A" if i == 0 else "B",
                skip_channels=channels,
                cond_features=num_classes,
                gate=gate,
            )
            for i in range(layers)
        )
        head_channels = head_channels or channels
        self.head = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, head_channels, 1),
            nn.ReLU(),
            nn.Conv2d(head_channels, in_channels * self.outputs, 1),
        )

    @property
    def outputs(self) -> int:
        """Logits per channel and pixel."""
        return 1 if self.levels == 2 else self.levels

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.levels == 2 else x * (2.0 / (self.levels - 1)) - 1.0

    def _condition(
        self, y: torch.Tensor | None, batch: int, like: torch.Tensor, fn: str = _MODEL
    ) -> torch.Tensor | None:
        """The one-hot condition [B, num_classes] of labels y, its errors naming ``fn``, the method called."""
        if not self.num_classes:
            return None
        if y is None:
            fail(
                fn,
                f"y must be given: the model is class-conditional ({self.num_classes} classes); pass the labels y [B]",
            )
        if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            got = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
            fail(fn, f"y must be an integer tensor of class labels, got {got}", TypeError)
        if y.dim() > 1 or (y.dim() == 1 and y.shape[0] != batch):
            fail(fn, f"y must have shape [B] = [{batch}] (or be a scalar), got {list(y.shape)}")
        if y.device != like.device:
            fail(fn, f"y must be on the model's device ({like.device}), got {y.device}")
        # On the CPU only: reading the range back from a GPU would synchronise every forward.
        if (
            y.device.type == "cpu"
            and y.numel()
            and not torch.compiler.is_compiling()
            and (int(y.min()) < 0 or int(y.max()) >= self.num_classes)
        ):
            fail(
                fn,
                f"y must hold class labels in [0, {self.num_classes - 1}], got values in "
                f"[{int(y.min())}, {int(y.max())}]",
            )
        return F.one_hot(y.expand(batch) if y.dim() == 0 else y, self.num_classes).to(like.dtype)

    def _check_images(self, x: torch.Tensor) -> None:
        param = self.head[1].weight
        check_float(_MODEL, "x", x, param, "the model's parameters")
        if x.dim() != 4 or x.shape[1] != self.in_channels or 0 in x.shape:
            fail(
                _MODEL,
                f"x must have shape [B, in_channels = {self.in_channels}, H, W] with B, H, W >= 1, got {list(x.shape)}",
            )

    def _logits(self, skips: torch.Tensor) -> torch.Tensor:
        out = self.head(skips)
        return out if self.levels == 2 else out.unflatten(1, (self.in_channels, self.levels))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, C, H, W] (levels=2) or [B, C, levels, H, W] for x [B, C, H, W] (pixel values
        0..levels-1) and labels y [B]."""
        self._check_images(x)
        cond = self._condition(y, x.shape[0], x)
        v = h = self._inputs(x)
        skips = 0
        for layer in self.layers:
            v, h, skip = layer(v, h, cond)
            skips = skips + skip
        return self._logits(skips)

    def nll(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """-log p(x | y) in nats per image, [B]."""
        logits = self(x, y)
        if self.levels == 2:
            return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        return F.cross_entropy(logits.transpose(1, 2), x.long(), reduction="none").flatten(1).sum(1)

    def _draw(self, logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Pixel values for logits [n, C] or [n, C, levels] by inverse-CDF with uniforms u [n, C]."""
        if self.levels == 2:
            return (u < torch.sigmoid(logits)).to(logits.dtype)
        below = (torch.softmax(logits, -1).cumsum(-1) < u.unsqueeze(-1)).sum(-1)
        return below.clamp(max=self.levels - 1).to(logits.dtype)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        size: tuple[int, int],
        y: torch.Tensor | None = None,
        *,
        cached: bool = True,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
    ):
        """n images [n, C, H, W] of pixel values, drawn in raster order (labels y [n] or a scalar).

        Every pixel's value is the inverse CDF of its predicted distribution at one uniform number
        drawn up front, so the cached and the naive sampler agree under the same generator. With
        ``return_logits`` also returns the logits each pixel was drawn from."""
        check_int(_MODEL + ".sample", "n", n)
        if not (isinstance(size, (tuple, list)) and len(size) == 2):
            fail(_MODEL + ".sample", f"size must be a (height, width) pair, got {size!r}", TypeError)
        for arg, value in zip(("size[0] (height)", "size[1] (width)"), size):
            check_int(_MODEL + ".sample", arg, value)
        param = self.head[1].weight
        height, width = size
        u = torch.rand(n, self.in_channels, height, width, generator=generator, dtype=param.dtype).to(param.device)
        x = torch.zeros(n, self.in_channels, height, width, dtype=param.dtype, device=param.device)
        logits = torch.zeros(
            n,
            self.in_channels,
            *((self.levels,) if self.levels > 2 else ()),
            height,
            width,
            dtype=param.dtype,
            device=param.device,
        )
        cond = self._condition(y, n, x, _MODEL + ".sample")
        step = self._cached_sampler(x, cond) if cached else None
        # The cached steps are products of a few thousand elements, too small to share across
        # threads: on a busy machine the hand-offs would cost a hundred times their arithmetic.
        threads = torch.get_num_threads()
        if cached and x.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            for i in range(height):
                for j in range(width):
                    pixel = step(i, j) if cached else self(x, y)[..., i, j]
                    logits[..., i, j] = pixel
                    x[..., i, j] = self._draw(pixel, u[..., i, j])
        finally:
            torch.set_num_threads(threads)
        return (x, logits) if return_logits else x

    def _cached_sampler(self, x: torch.Tensor, cond: torch.Tensor | None):
        """step(i, j) -> the logits of pixel (i, j), given that every pixel before it is in x.

        Keeps each layer's inputs in zero-padded buffers: the horizontal stack advances one pixel
        per step (a few [n, *] matrix products per layer); when a row of x is complete, each
        layer's vertical stack advances one row, and its pre-activation row feeds the next row's
        link. The horizontal buffers are pixel-major, so a layer's window is one contiguous slice."""
        n, _, height, width = x.shape
        layers = list(self.layers)
        halves = [layer.kernel_size // 2 for layer in layers]
        conds = [layer.conditions(cond) for layer in layers]
        v_in = [
            x.new_zeros(n, layer.in_channels, height + half, width + 2 * half) for layer, half in zip(layers, halves)
        ]
        h_in = [x.new_zeros(n, height, width + half, layer.in_channels) for layer, half in zip(layers, halves)]
        link = [x.new_zeros(n, width, 2 * layer.channels) for layer in layers]
        # Weights as [inputs, outputs] matrices, the horizontal one in the buffers' (column, channel) order.
        h_weights = [layer.h_weight.permute(0, 2, 3, 1).flatten(1).t() for layer in layers]
        link_weights = [layer.link_weight.flatten(1).t() for layer in layers]
        out_weights = [layer.out_weight.flatten(1).t() for layer in layers]
        done = [-1]  # the last row of x whose vertical stacks have advanced

        def advance_vertical(row):
            first = halves[0]
            v_in[0][:, :, row + first, first : first + width] = self._inputs(x[:, :, row])
            for index, (layer, half) in enumerate(zip(layers, halves)):
                v_pre = F.conv2d(v_in[index][:, :, row : row + half + 1], layer.v_weight, layer.v_bias)
                link[index] = v_pre[:, :, 0].transpose(1, 2)
                if index + 1 < len(layers):
                    after = halves[index + 1]
                    v_in[index + 1][:, :, row + after, after : after + width] = gated_activation(
                        v_pre, conds[index][0], layer.gate
                    )[:, :, 0]

        def step(i, j):
            for row in range(done[0] + 1, i):
                advance_vertical(row)
            done[0] = max(done[0], i - 1)
            if j > 0:
                h_in[0][:, i, halves[0] + j - 1] = self._inputs(x[:, :, i, j - 1])
            skips = 0
            for index, (layer, half) in enumerate(zip(layers, halves)):
                window = h_in[index][:, i, j : j + layer.h_weight.shape[-1]].flatten(1)
                h_pre = torch.addmm(layer.h_bias, window, h_weights[index]).addmm_(
                    link[index][:, j], link_weights[index]
                )
                out = torch.addmm(
                    layer.out_bias, gated_activation(h_pre, conds[index][1], layer.gate), out_weights[index]
                )
                res, skip = out[:, : layer.channels], out[:, layer.channels :]
                h_out = h_in[index][:, i, j + half] + res if layer.residual else res
                if index + 1 < len(layers):
                    h_in[index + 1][:, i, j + halves[index + 1]] = h_out
                skips = skips + skip
            # The head's 1x1 convolutions as matrix products: a convolution call on one pixel costs
            # far more than its arithmetic.
            out = skips
            for module in self.head:
                is_conv = isinstance(module, nn.Conv2d)
                out = F.linear(out, module.weight.flatten(1), module.bias) if is_conv else module(out)
            return out if self.levels == 2 else out.unflatten(1, (self.in_channels, self.levels))

        return step
