"""PixelCNN: masked convolutions that touch only the causal taps, the fused gated activation and
PixelCNN++'s fused concat-ELU.

Masked convolutions are compositions of ATen convolutions over the causal taps only (the rows
above the centre as one convolution with a cropped kernel, the centre row's left part as
another), so a masked tap is never multiplied, its weight never read, and its gradient exactly
zero; ATen's convolutions (oneDNN on the CPU, cuDNN on CUDA) are the cheapest correct route on
either device. The gated activation is a custom op with C++ (csrc/cpu/pixelcnn.cpp) and Triton
(vaekernels/triton/pixelcnn.py) kernels whose backward recomputes the gate instead of saving it;
concat-ELU one with kernels in the same files that write both halves in one pass.
The readable oracle with the same signatures is :mod:`vaekernels.reference.pixelcnn`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend
from ..reference import pixelcnn as reference
from ._checks import check_choice, check_float, check_shape, fail, is_channels_last
from ._registry import define_triton_op, first_derivatives_only, register

MASK_TYPES = ("A", "B")
GATES = ("tanh", "linear")

if _backend.triton_available():
    from ..triton import pixelcnn as _triton

    define_triton_op("gated_activation", _triton.gated_activation_fwd)
    define_triton_op("gated_activation_backward", _triton.gated_activation_bwd)
    define_triton_op("concat_elu", _triton.concat_elu_fwd)
    define_triton_op("concat_elu_backward", _triton.concat_elu_bwd)


# ----------------------------------------------------------------------------- causal convolution


class _CausalConv(torch.autograd.Function):
    """sum over parts of conv(x shifted, weight_p) + bias, where part p's output pixel (i, j) reads
    input rows i - top_p .. i - top_p + kh_p - 1 and columns j - left_p .. j - left_p + kw_p - 1
    (zero outside the image); the output has x's height and width.

    Each part convolves its own zero-padded (or cropped) copy of x, dense in x's memory format so
    that oneDNN reads it without a reorder; the copies are rebuilt in backward instead of saved
    (only for the parts whose weight gradient is wanted: the input gradient needs the shape
    alone), so the graph keeps only x and the weights, as a convolution with built-in padding
    would."""

    @staticmethod
    def forward(x, bias, offsets, *weights):
        out = None
        for (top, left), weight in zip(offsets, weights):
            part = F.conv2d(_padded(x, _shift_pads(top, left, weight)), weight, bias if out is None else None)
            out = part if out is None else out.add_(part)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, offsets, *weights = inputs
        ctx.offsets, ctx.has_bias = offsets, bias is not None
        ctx.save_for_backward(x, *weights)

    @staticmethod
    def backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        # As autograd's convolution node: only the gradients this backward pass uses (slots count
        # the tensor inputs: x, the bias when there is one, the weights).
        first_weight_slot = 1 + ctx.has_bias
        need_x = _gradient_used(ctx, 0, 0)
        grad_x, grad_weights = None, []
        for index, ((top, left), weight) in enumerate(zip(ctx.offsets, weights)):
            pads = _shift_pads(top, left, weight)
            need_weight = _gradient_used(ctx, 3 + index, first_weight_slot + index)
            # The input gradient reads only the input's shape: without the weight's gradient, an
            # unwritten tensor of the padded shape stands in for the padded copy.
            shifted = _padded(x, pads) if need_weight else _empty_padded(x, pads)
            grad_in, grad_w, _ = torch.ops.aten.convolution_backward(
                grad, shifted, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [need_x, need_weight, False]
            )
            if need_x:
                # The inverse of the shift: crop what was padded, pad what was cropped.
                unpads = tuple(-amount for amount in pads)
                if grad_x is None:
                    grad_x = _padded(grad_in, unpads)
                else:
                    from_part, into = _overlap(grad_in, grad_x, pads)
                    into.add_(from_part)
            grad_weights.append(grad_w)
        grad_bias = grad.sum((0, 2, 3)) if ctx.has_bias and _gradient_used(ctx, 1, 1) else None
        return grad_x, grad_bias, None, *grad_weights


def _shift_pads(top: int, left: int, weight: torch.Tensor) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding (negative amounts crop) so that a valid convolution with
    weight reads rows from i - top and columns from j - left for output pixel (i, j)."""
    kh, kw = weight.shape[-2:]
    return left, kw - 1 - left, top, kh - 1 - top


def _padded_shape(x: torch.Tensor, pads: tuple[int, int, int, int]) -> tuple[int, ...]:
    left, right, top, bottom = pads
    return (*x.shape[:-2], x.shape[-2] + top + bottom, x.shape[-1] + left + right)


def _overlap(padded: torch.Tensor, x: torch.Tensor, pads: tuple[int, int, int, int]):
    """The views of ``padded`` (x padded by ``pads``) and of x that hold the same pixels."""
    left, right, top, bottom = pads
    rows, cols = x.shape[-2] - max(-top, 0) - max(-bottom, 0), x.shape[-1] - max(-left, 0) - max(-right, 0)
    return (
        padded[..., max(top, 0) : max(top, 0) + rows, max(left, 0) : max(left, 0) + cols],
        x[..., max(-top, 0) : max(-top, 0) + rows, max(-left, 0) : max(-left, 0) + cols],
    )


def _empty_padded(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty(
        _padded_shape(x, pads),
        dtype=x.dtype,
        device=x.device,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
    )


def _padded(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """``F.pad(x, pads)`` (negative amounts crop), in x's memory format, that writes each element
    once: the copied pixels, then zeros in the border strips only (the columns' strips between
    the rows' ones), where F.pad fills the whole tensor first. No padding returns x itself."""
    if not any(pads):
        return x
    out = _empty_padded(x, pads)
    inside, source = _overlap(out, x, pads)
    inside.copy_(source)
    left, right, top, bottom = (max(amount, 0) for amount in pads)
    height, width = out.shape[-2:]
    rows = slice(top, height - bottom)
    strips = (
        (top, out[..., :top, :]),
        (bottom, out[..., height - bottom :, :]),
        (left, out[..., rows, :left]),
        (right, out[..., rows, width - right :]),
    )
    # Empty strips are skipped, not zeroed: inductor's C++ for a zero-size buffer crashes the process.
    for amount, strip in strips:
        if amount:
            strip.zero_()
    return out


def causal_conv2d(x: torch.Tensor, parts, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of convolutions of ``x`` over windows at fixed offsets: ``parts`` is a list of
    ``(weight, top, left)``, where output pixel (i, j) reads input rows from i - top and columns
    from j - left, as far as the weight's kernel reaches; zero outside the image.

    The building block of :func:`masked_conv2d`: each part is a block of causal taps, so no
    masked tap is ever multiplied.

    Example:
        >>> import torch
        >>> x = torch.arange(4.0).view(1, 1, 1, 4)
        >>> causal_conv2d(x, [(torch.ones(1, 1, 1, 1), 0, 1)]).tolist()  # the left neighbour
        [[[[0.0, 0.0, 1.0, 2.0]]]]
    """
    weights = tuple(weight for weight, _, _ in parts)
    offsets = tuple((top, left) for _, top, left in parts)
    return _CausalConv.apply(x, bias, offsets, *weights)


class _LinkedHorizontal(torch.autograd.Function):
    """See :func:`linked_horizontal`. One new tensor forward and the link's moved-up gradient
    backward, where a pad, a slice and an add through autograd take two each way."""

    @staticmethod
    def forward(h_conv, link):
        h_pre = h_conv.clone()
        h_pre[:, :, 1:] += link[:, :, :-1]
        return h_pre

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, _padded(grad, (0, 0, -1, 1))


def linked_horizontal(h_conv: torch.Tensor, link: torch.Tensor) -> torch.Tensor:
    """The Gated PixelCNN layer's horizontal pre-activation: ``h_conv`` [B, 2C, H, W] plus row
    i - 1 of ``link`` [B, 2C, H, W] in row i (row 0 gets nothing), so that the horizontal stack
    sees the vertical one only from the rows above.

    Example:
        >>> import torch
        >>> linked_horizontal(torch.zeros(1, 1, 3, 1), torch.ones(1, 1, 3, 1)).flatten().tolist()
        [0.0, 1.0, 1.0]
    """
    return _LinkedHorizontal.apply(h_conv, link)


# ----------------------------------------------------------------------------- masked_conv2d


def _check_masked_conv(fn: str, x, weight, bias, mask_type: str, channel_groups: int) -> None:
    check_float(fn, "x", x)
    check_float(fn, "weight", weight, x, "x")
    check_choice(fn, "mask_type", mask_type, MASK_TYPES)
    if x.dim() != 4:
        fail(fn, f"x must have shape [B, C, H, W], got {list(x.shape)}")
    if 0 in x.shape:
        fail(fn, f"x must have non-empty dims (B, C, H, W >= 1), got shape {list(x.shape)}")
    if weight.dim() != 4:
        fail(fn, f"weight must have shape [out_channels, in_channels, kh, kw], got {list(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        fail(fn, f"weight must have in_channels = x.shape[1] = {x.shape[1]}, got weight shape {list(weight.shape)}")
    kh, kw = weight.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0:
        fail(fn, f"weight must have an odd kernel size (a centre tap), got {kh}x{kw}")
    if bias is not None:
        check_float(fn, "bias", bias, x, "x")
        if tuple(bias.shape) != (weight.shape[0],):
            fail(fn, f"bias must have shape [out_channels] = [{weight.shape[0]}], got {list(bias.shape)}")
    if not isinstance(channel_groups, int) or channel_groups < 1:
        fail(fn, f"channel_groups must be a positive int, got {channel_groups!r}")
    if weight.shape[0] % channel_groups or weight.shape[1] % channel_groups:
        fail(
            fn,
            f"channel_groups must divide in_channels and out_channels, got {channel_groups} for weight "
            f"shape {list(weight.shape)}",
        )


def masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask_type: str = "B",
    *,
    channel_groups: int = 1,
) -> torch.Tensor:
    """PixelCNN masked convolution ("same" padding, stride 1) that reads only the causal taps.

    Output pixel (i, j) sees the input rows above i and, in row i, the pixels left of j; type
    "B" adds the centre pixel, type "A" (the first layer) does not. With ``channel_groups`` G the
    channels form G contiguous blocks (e.g. R, G, B) and at the centre pixel output block g sees
    input blocks < g (type A) or <= g (type B). The weight has the dense ``[out, in, kh, kw]``
    shape of ``nn.Conv2d``, but its masked taps are never read: their gradient is exactly zero.
    Equal to :func:`vaekernels.reference.pixelcnn.masked_conv2d` (dense weight, masked taps zeroed).
    NaN and ±inf propagate as in a convolution through the taps that read them; in a masked tap
    they have no effect, since it is never read.

    Example:
        >>> import torch, vaekernels
        >>> x = torch.ones(1, 1, 2, 3)
        >>> vaekernels.masked_conv2d(x, torch.ones(1, 1, 3, 3), mask_type="A")[0, 0].tolist()
        [[0.0, 1.0, 1.0], [2.0, 4.0, 3.0]]
    """
    fn = "masked_conv2d"
    _check_masked_conv(fn, x, weight, bias, mask_type, channel_groups)
    kh, kw = weight.shape[-2:]
    ch, cw = kh // 2, kw // 2
    centre_in_row = mask_type == "B" and channel_groups == 1
    parts = []
    # Contiguous parts: a slice of a one-input-channel weight has strides that read as channels-last
    # to inductor's layout planning but not to the CPU convolution, which then fails its stride check.
    if ch:
        parts.append((weight[:, :, :ch].contiguous(), ch, cw))
    if cw or centre_in_row:
        parts.append((weight[:, :, ch : ch + 1, : cw + centre_in_row].contiguous(), 0, cw))
    if channel_groups > 1:
        out = _centre_taps(x, weight[:, :, ch, cw], mask_type, channel_groups)
        return out + causal_conv2d(x, parts, bias) if parts else _plus_bias(out, bias)
    if parts:
        return causal_conv2d(x, parts, bias)
    # A 1x1 type-A kernel with one channel group sees nothing.
    return _plus_bias(x.new_zeros(x.shape[0], weight.shape[0], *x.shape[2:]), bias)


def _plus_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out + bias.view(-1, 1, 1)


def _centre_taps(x: torch.Tensor, centre: torch.Tensor, mask_type: str, groups: int) -> torch.Tensor:
    """The centre-pixel term of a channel-grouped mask: output block g reads the input channels
    of blocks < g (type A) or <= g (type B), a prefix of them, as one 1x1 convolution."""
    out_block, in_block = centre.shape[0] // groups, centre.shape[1] // groups
    blocks = []
    for g in range(groups):
        seen = (g + (mask_type == "B")) * in_block
        rows = centre[g * out_block : (g + 1) * out_block]
        if seen == 0:
            blocks.append(x.new_zeros(x.shape[0], out_block, *x.shape[2:]))
        else:
            blocks.append(F.conv2d(x[:, :seen], rows[:, :seen, None, None]))
    return torch.cat(blocks, 1)


# ----------------------------------------------------------------------------- gated_activation


def _gated_activation_fake(x, cond, gate):
    return x.new_empty(x.shape[0], x.shape[1] // 2, x.shape[2])


def _gated_activation_backward_fake(grad, x, cond, gate):
    return x.new_empty(x.shape), x.new_empty(cond.shape if cond is not None else (0,))


def _gated_activation_setup(ctx, inputs, output):
    x, cond, gate = inputs
    ctx.gate, ctx.has_cond = gate, cond is not None
    ctx.save_for_backward(x, cond)


def _make_gated_activation_backward(ops):
    def backward(ctx, grad):
        x, cond = ctx.saved_tensors
        grad_x, grad_cond = ops.gated_activation_backward(grad, x, cond, ctx.gate)
        return grad_x, grad_cond if ctx.has_cond else None, None

    return backward


register("gated_activation", _gated_activation_fake, _gated_activation_setup, _make_gated_activation_backward)
register("gated_activation_backward", _gated_activation_backward_fake)


def _gate_rows(fn: str, x: torch.Tensor, cond: torch.Tensor | None, gate: str) -> torch.Tensor:
    """Checks the arguments and views x [B, 2C, *spatial] as [B, 2C, N] with contiguous rows,
    without a copy where its layout allows (a channel slice or batch slice of a larger tensor does)."""
    _check_gate(fn, x, cond, gate)
    rows = x.reshape(x.shape[0], x.shape[1], -1) if x.dim() != 3 else x
    return rows if rows.shape[2] <= 1 or rows.stride(2) == 1 else rows.contiguous()


def _check_gate(fn: str, x: torch.Tensor, cond: torch.Tensor | None, gate: str) -> None:
    check_float(fn, "x", x)
    check_choice(fn, "gate", gate, GATES)
    if x.dim() < 2 or x.shape[1] % 2:
        fail(fn, f"x must have shape [B, 2C, *spatial] with an even channel count, got {list(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        fail(fn, f"x must have B >= 1 examples and C >= 1 channel pairs, got shape {list(x.shape)}")
    if cond is not None:
        check_float(fn, "cond", cond, x, "x")
        check_shape(fn, "cond", cond, x.shape[:2], "[B, 2C]")


def _from_pixel_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Rows [B H W, C'] (a pixel each) of a channels-last tensor shaped as ``like`` [B, *, H, W]:
    the [B, C', H, W] channels-last view."""
    B, _, H, W = like.shape
    return rows.view(B, H, W, -1).permute(0, 3, 1, 2)


def gated_activation(x: torch.Tensor, cond: torch.Tensor | None = None, gate: str = "tanh") -> torch.Tensor:
    """The gated activation of the Gated PixelCNN, fused: tanh(a + c_a) * sigmoid(b + c_b).

    a, b are the channel halves of x [B, 2C, *spatial]; c_a, c_b the halves of the optional
    condition ``cond`` [B, 2C] (e.g. a class embedding), broadcast over the spatial dims inside
    the kernel. ``gate="linear"`` gives (a + c_a) * sigmoid(b + c_b). Returns [B, C, *spatial]
    (channels last for a channels-last x without ``cond``).
    The backward recomputes tanh and sigmoid from x, so only x is kept for it.
    NaN and ±inf: ±inf pre-activations saturate the gate (tanh to ±1, sigmoid to 0 or 1, with zero
    gradients), except a linear gate's (a + c_a) = ±inf against a sigmoid of 0, which is NaN as
    inf * 0; a NaN gives NaN where it is read.

    Example:
        >>> import torch, vaekernels
        >>> x = torch.zeros(1, 2, 3, 3)
        >>> vaekernels.gated_activation(x, torch.tensor([[20.0, 0.0]]))[0, 0, 0].tolist()
        [0.5, 0.5, 0.5]
    """
    fn = "gated_activation"
    if cond is None and is_channels_last(x):
        # A channels-last x (as convolutions run fastest on CPU) stays so, each pixel an example.
        _check_gate(fn, x, cond, gate)
        backend = _backend.choose(fn, x.device, x.dtype)
        if backend == "reference":
            return reference.gated_activation(x, cond, gate)
        # [B H W, 2, C]: one channel pair per pixel, its rows a and b the C channels of each half.
        pixels = x.permute(0, 2, 3, 1).reshape(-1, 2, x.shape[1] // 2)
        out = _backend.ops(backend).gated_activation(pixels, None, gate)
        return _from_pixel_rows(out.view(pixels.shape[0], -1), x)
    rows = _gate_rows(fn, x, cond, gate)
    backend = _backend.choose(fn, x.device, x.dtype)
    if backend == "reference":
        return reference.gated_activation(x, cond, gate)
    out = _backend.ops(backend).gated_activation(rows, None if cond is None else cond.contiguous(), gate)
    return out.view(x.shape[0], x.shape[1] // 2, *x.shape[2:])


def _gated_activation_vjp(grad: torch.Tensor, x: torch.Tensor, cond: torch.Tensor | None, gate: str):
    """(grad_x, grad_cond) of :func:`gated_activation` at (x, cond), recomputing the gate."""
    backend = _backend.choose("gated_activation", x.device, x.dtype)
    if backend == "reference":
        # Grad mode on here means a backward with create_graph=True: the vjp then stays on x's
        # graph, so that it can be differentiated again.
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            leaves = [
                t if t is None or (create_graph and t.requires_grad) else t.detach().requires_grad_() for t in (x, cond)
            ]
            out = reference.gated_activation(leaves[0], leaves[1], gate)
            found = torch.autograd.grad(out, [t for t in leaves if t is not None], grad, create_graph=create_graph)
        return found[0], (found[1] if cond is not None else None)
    rows = _gate_rows("gated_activation", x, cond, gate)
    grad_rows = grad.reshape(rows.shape[0], rows.shape[1] // 2, rows.shape[2])
    grad_x, grad_cond = _backend.ops(backend).gated_activation_backward(
        grad_rows, rows, None if cond is None else cond.contiguous(), gate
    )
    grads = (grad_x.view(x.shape), grad_cond if cond is not None else None)
    return first_derivatives_only("vaekernels.gated_activation", grads, (grad, x, cond))


# ----------------------------------------------------------------------------- concat_elu


def _concat_elu_fake(x, padding):
    B, C, H, W = x.shape
    left, right, top, bottom = padding or (0, 0, 0, 0)
    out = x.new_empty(B, 2 * C, H + top + bottom, W + left + right)
    return out.contiguous(memory_format=torch.channels_last) if is_channels_last(x) else out


def _concat_elu_backward_fake(grad, x, padding):
    return torch.empty_like(x, memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)


def _concat_elu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.padding = inputs[1]


def _make_concat_elu_backward(ops):
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ops.concat_elu_backward(grad, x, ctx.padding), None

    return backward


register("concat_elu", _concat_elu_fake, _concat_elu_setup, _make_concat_elu_backward)
register("concat_elu_backward", _concat_elu_backward_fake)


def concat_elu(x: torch.Tensor, padding: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """PixelCNN++'s concat-ELU, fused: ``elu(cat([x, -x], 1))``, [B, C, *spatial] -> [B, 2C, *spatial].

    One pass writes both halves: of elu(v) and elu(-v) one is linear and the other expm1(-|v|),
    so each element costs one expm1, and neither the negation nor the concatenation is made. The
    backward keeps x only (not the [B, 2C, ...] output) and reads the gradient once.

    ``padding`` = (left, right, top, bottom), for x [B, C, H, W], gives
    ``F.pad(concat_elu(x), padding)`` from the same pass: the zero-padded input of a shifted
    convolution (PixelCNN++'s down and down-right shifts), without F.pad's copy of the output and
    the slice of its gradient. A channels-last x (as convolutions run fastest on CPU) gives a
    channels-last output and gradient.

    NaN and ±inf: a NaN gives NaN in both halves and a NaN gradient (as torch's vectorised ELU; its
    scalar tail gives a NaN the slope 1); +inf gives (inf, -1) and -inf (-1, inf), with finite
    gradients (the ELU's slope is 1 on one side and exp(-inf) = 0 on the other).

    Example:
        >>> import torch, vaekernels
        >>> vaekernels.concat_elu(torch.tensor([[1.0, -2.0]])).tolist()
        [[1.0, -0.8646647334098816, -0.6321205496788025, 2.0]]
        >>> vaekernels.concat_elu(torch.ones(1, 1, 1, 1), padding=(1, 0, 0, 1)).flatten().tolist()
        [0.0, 1.0, 0.0, 0.0, 0.0, -0.6321205496788025, 0.0, 0.0]
    """
    fn = "concat_elu"
    check_float(fn, "x", x)
    if x.dim() < 2:
        fail(fn, f"x must have shape [B, C, *spatial], got {list(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        fail(fn, f"x must have B >= 1 examples and C >= 1 channels, got shape {list(x.shape)}")
    if padding is not None:
        if not (
            isinstance(padding, (tuple, list))
            and len(padding) == 4
            and all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in padding)
        ):
            fail(fn, f"padding must be None or (left, right, top, bottom), ints >= 0, got {padding!r}", TypeError)
        if x.dim() != 4:
            fail(fn, f"x must have shape [B, C, H, W] with padding, got {list(x.shape)}")
    backend = _backend.choose(fn, x.device, x.dtype)
    if backend == "reference":
        return reference.concat_elu(x, padding)
    if is_channels_last(x):  # as convolutions run fastest on CPU: the output is channels last too
        return _backend.ops(backend).concat_elu(x, list(padding or (0, 0, 0, 0)))
    if padding is not None:
        return _backend.ops(backend).concat_elu(x.contiguous(), list(padding))
    rows = x.reshape(x.shape[0], -1)
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    # Each example as one row of an image: [B, 1, 1, C N] -> [B, 2, 1, C N], the layout of [B, 2C, *spatial].
    out = _backend.ops(backend).concat_elu(rows[:, None, None, :], [])
    return out.view(x.shape[0], 2 * x.shape[1], *x.shape[2:])


def _gradient_used(ctx, index: int, slot: int) -> bool:
    """Whether the running backward pass uses the gradient of forward input ``index``, the
    ``slot``-th tensor among the forward's inputs (``ctx.next_functions`` skips non-tensors).

    ``ctx.needs_input_grad`` is fixed at forward and only says the gradient may be wanted;
    ``torch.autograd.grad(out, [x])`` wants none for the weights, and a convolution's weight
    gradient costs as many multiply-adds as its forward. The engine knows which nodes it will
    run (``torch._C._will_engine_execute_node``, private but there since torch 2.0: it is what
    ``torch.autograd.graph.register_multi_grad_hook`` asks); it answers for every node but a leaf
    that ``autograd.grad`` asked for, which is wanted. Under torch.compile the traced backward
    keeps ``needs_input_grad``'s answer.
    """
    if not ctx.needs_input_grad[index]:
        return False
    if torch.compiler.is_compiling():
        return True
    try:
        return torch._C._will_engine_execute_node(ctx.next_functions[slot][0])
    except RuntimeError:
        return True


class _GatedConv1x1(torch.autograd.Function):
    """conv1x1(gated_activation(x, cond), weight, bias), keeping only x (not the gated tensor)
    for backward: the gate is recomputed there, an elementwise pass, and only when the weight's
    gradient is wanted (the input's needs the weight, not the gated tensor)."""

    @staticmethod
    def forward(x, cond, weight, bias, gate):
        return F.conv2d(gated_activation(x, cond, gate), weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, cond, weight, bias, gate = inputs
        ctx.gate, ctx.bias_sizes = gate, (None if bias is None else list(bias.shape))
        ctx.weight_slot = 2 if cond is not None else 1
        ctx.save_for_backward(x, cond, weight)

    @staticmethod
    def backward(ctx, grad):
        x, cond, weight = ctx.saved_tensors
        need_input = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_weight = _gradient_used(ctx, 2, ctx.weight_slot)
        need_bias = ctx.bias_sizes is not None and _gradient_used(ctx, 3, ctx.weight_slot + 1)
        grad_weight = grad_bias = None
        if need_weight:
            gated = gated_activation(x, cond, ctx.gate)
            grad_gated, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad,
                gated,
                weight,
                ctx.bias_sizes,
                [1, 1],
                [0, 0],
                [1, 1],
                False,
                [0, 0],
                1,
                [need_input, True, need_bias],
            )
        else:
            # Without the weight's gradient the gated tensor is not needed at all: the input
            # gradient of a 1x1 convolution is the convolution by the transposed weight.
            grad_gated = F.conv2d(grad, weight.transpose(0, 1)) if need_input else None
            grad_bias = grad.sum((0, 2, 3)) if need_bias else None
        grad_x = grad_cond = None
        if need_input:
            grad_x, grad_cond = _gated_activation_vjp(grad_gated, x, cond, ctx.gate)
        return grad_x, grad_cond, grad_weight, grad_bias, None


def gated_conv1x1(
    x: torch.Tensor, cond: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, gate: str = "tanh"
) -> torch.Tensor:
    """A 1x1 convolution of :func:`gated_activation`, whose backward recomputes the gated tensor
    instead of keeping it: the output half of a Gated PixelCNN layer (residual and skip).

    Example:
        >>> import torch
        >>> gated_conv1x1(torch.zeros(1, 4, 2, 2), None, torch.ones(3, 2, 1, 1), None).shape
        torch.Size([1, 3, 2, 2])
    """
    return _GatedConv1x1.apply(x, cond, weight, bias, gate)
