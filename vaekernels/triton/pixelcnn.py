"""Triton kernels of the PixelCNN gated activation and of PixelCNN++'s concat-ELU, and their launchers.

x is viewed as [B, 2C, N] with contiguous rows of N pixels (its batch and channel strides are
free, so a channel or batch slice of a larger tensor is read in place); the condition [B, 2C] is broadcast over
the row inside the kernel. One program per (batch, channel) row loops over the row in blocks,
computing in float32 (float64 for float64 inputs); the backward recomputes the gate and sums the
condition's gradient over the row in registers.

The launchers are pure (tensors in, new tensors out) so that the op layer can register them as
custom-op implementations; on CPU tensors they run through the Triton interpreter::

    >>> x = torch.randn(2, 8, 16, device="cuda")
    >>> gated_activation_fwd(x, None, "tanh").shape
    torch.Size([2, 4, 16])

Concat-ELU views x as [B, M] (an example's channels and pixels, last dim contiguous) and takes
one program per block of an example's M values, writing both halves [elu(x), elu(-x)] of its
[B, 2M] output.
"""

import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..ops._checks import is_channels_last

_MAX_BLOCK = 1024


def _acc_dtype(x: torch.Tensor) -> tl.dtype:
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device, which need not be the tensor's.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def _sigmoid(v):
    # From exp(-|v|) <= 1: no overflow, and full relative precision for very negative v.
    e = tl.exp(-tl.abs(v))
    return tl.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _gate_terms(
    x_ptr,
    cond_ptr,
    row,
    cols,
    mask,
    C,
    stride_b,
    stride_c,
    HAS_COND: tl.constexpr,
    LINEAR: tl.constexpr,
    ACC: tl.constexpr,
):
    """(t, s): the (tanh of the) first half plus its condition, and the sigmoid of the second."""
    b = row // C
    c = row % C
    a_ptr = x_ptr + b * stride_b + c * stride_c
    pre_a = tl.load(a_ptr + cols, mask=mask, other=0.0).to(ACC)
    pre_b = tl.load(a_ptr + C * stride_c + cols, mask=mask, other=0.0).to(ACC)
    if HAS_COND:
        pre_a += tl.load(cond_ptr + b * 2 * C + c).to(ACC)
        pre_b += tl.load(cond_ptr + b * 2 * C + C + c).to(ACC)
    if LINEAR:
        t = pre_a
    else:
        # tanh(|a|) = (1 - e) / (1 + e) with e = exp(-2|a|) <= 1: no overflow, exact limits.
        e = tl.exp(-2.0 * tl.abs(pre_a))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(pre_a < 0, -t, t)
    return t, _sigmoid(pre_b)


@triton.jit
def _gated_activation_fwd_kernel(
    x_ptr,
    cond_ptr,
    out_ptr,
    C,
    N,
    stride_b,
    stride_c,
    HAS_COND: tl.constexpr,
    LINEAR: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N
        t, s = _gate_terms(x_ptr, cond_ptr, row, cols, mask, C, stride_b, stride_c, HAS_COND, LINEAR, ACC)
        tl.store(out_ptr + row * N + cols, (t * s).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_activation_bwd_kernel(
    grad_ptr,
    x_ptr,
    cond_ptr,
    grad_x_ptr,
    grad_cond_ptr,
    C,
    N,
    stride_b,
    stride_c,
    grad_stride_b,
    grad_stride_c,
    grad_stride_n,
    HAS_COND: tl.constexpr,
    LINEAR: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // C
    c = row % C
    ga_ptr = grad_x_ptr + (b * 2 * C + c) * N
    sum_a = tl.zeros([BLOCK], ACC)
    sum_b = tl.zeros([BLOCK], ACC)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N
        t, s = _gate_terms(x_ptr, cond_ptr, row, cols, mask, C, stride_b, stride_c, HAS_COND, LINEAR, ACC)
        g_ptrs = grad_ptr + b * grad_stride_b + c * grad_stride_c + cols * grad_stride_n
        gs = tl.load(g_ptrs, mask=mask, other=0.0).to(ACC) * s
        if LINEAR:
            ga = gs
        else:
            ga = gs * (1.0 - t * t)
        gb = gs * t * (1.0 - s)
        tl.store(ga_ptr + cols, ga.to(grad_x_ptr.dtype.element_ty), mask=mask)
        tl.store(ga_ptr + C * N + cols, gb.to(grad_x_ptr.dtype.element_ty), mask=mask)
        sum_a += tl.where(mask, ga, 0.0)
        sum_b += tl.where(mask, gb, 0.0)
    if HAS_COND:
        tl.store(grad_cond_ptr + b * 2 * C + c, tl.sum(sum_a, 0).to(grad_cond_ptr.dtype.element_ty))
        tl.store(grad_cond_ptr + b * 2 * C + C + c, tl.sum(sum_b, 0).to(grad_cond_ptr.dtype.element_ty))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[2] <= 1 or x.stride(2) == 1 else x.contiguous()


def _launch(
    kernel, leading: tuple, x: torch.Tensor, cond: torch.Tensor | None, gate: str, trailing: tuple, extra: tuple = ()
) -> None:
    """kernel(*leading, x, cond, *trailing, C, N, x's strides, *extra) over one program per (batch, channel) row."""
    batch, channels, n = x.shape
    block = min(triton.next_power_of_2(max(n, 1)), _MAX_BLOCK)
    # Without a condition the pointer is never read; x stands in for it.
    cond_arg = cond.contiguous() if cond is not None else x
    with _on_device(x):
        kernel[(batch * (channels // 2),)](
            *leading,
            x,
            cond_arg,
            *trailing,
            channels // 2,
            n,
            x.stride(0),
            x.stride(1),
            *extra,
            HAS_COND=cond is not None,
            LINEAR=gate == "linear",
            ACC=_acc_dtype(x),
            BLOCK=block,
            num_warps=4 if block >= 512 else 1,
        )


def gated_activation_fwd(x: torch.Tensor, cond: torch.Tensor | None, gate: str) -> torch.Tensor:
    """tanh(a + c_a) * sigmoid(b + c_b) (``gate="linear"``: without the tanh) for x [B, 2C, N], cond [B, 2C]."""
    x = _rows(x)
    out = torch.empty(x.shape[0], x.shape[1] // 2, x.shape[2], device=x.device, dtype=x.dtype)
    if out.numel():
        _launch(_gated_activation_fwd_kernel, (), x, cond, gate, (out,))
    return out


def gated_activation_bwd(
    grad: torch.Tensor, x: torch.Tensor, cond: torch.Tensor | None, gate: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x [B, 2C, N], grad_cond [B, 2C] or an empty [0] tensor without a condition), recomputing the gate."""
    x = _rows(x)
    # Any strides: the gradient of a sum arrives expanded (stride 0) and is read in place.
    grad = grad.to(x.dtype)
    grad_x = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    grad_cond = torch.empty(cond.shape if cond is not None else (0,), device=x.device, dtype=x.dtype)
    if x.numel():
        trailing = (grad_x, grad_cond if cond is not None else grad_x)
        _launch(_gated_activation_bwd_kernel, (grad,), x, cond, gate, trailing, tuple(grad.stride()))
    elif cond is not None:
        grad_cond.zero_()
    return grad_x, grad_cond


@triton.jit
def _expm1_of_nonpositive(d):
    """exp(d) - 1 for d <= 0: Kahan's (u - 1) d / log(u) near 0, where u - 1 cancels; u - 1 below -1,
    where it does not, and where u underflows to 0 (log(0) would make the quotient 0)."""
    u = tl.exp(d)
    near_zero = tl.where(u == 1.0, d, (u - 1.0) * (d / tl.log(u)))
    return tl.where(d < -1.0, u - 1.0, near_zero)


@triton.jit
def _concat_elu_fwd_kernel(
    x_ptr, out_ptr, C, H, W, left, top, Hp, Wp, total, stride_b, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    # One program per block of the B C Hp Wp elements of the outputs' first halves, across examples,
    # so that many short examples (70001 of 12) still fill a block. The padding loads 0, whose
    # concat-ELU is (0, 0): the zeros of F.pad.
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    q = index % Wp
    r = index // Wp % Hp
    c = index // (Wp * Hp) % C
    b = index // (Wp * Hp * C)
    h = r - top
    w = q - left
    inside = (index < total) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    v = tl.load(x_ptr + b * stride_b + (c * H + h) * W + w, mask=inside, other=0.0).to(ACC)
    # Of elu(v) and elu(-v) one is linear, the other expm1(-|v|); a NaN fails v > 0 and reaches both.
    curved = _expm1_of_nonpositive(-tl.abs(v))
    positive = v > 0.0
    first = out_ptr + index + b * C * Hp * Wp
    mask = index < total
    tl.store(first, tl.where(positive, v, curved).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(first + C * Hp * Wp, tl.where(positive, curved, -v).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _concat_elu_bwd_kernel(
    grad_ptr, x_ptr, grad_x_ptr, C, H, W, left, top, Hp, Wp, total, stride_b, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    # One program per block of the B C H W elements of x, reading the gradient's interior.
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < total
    w = index % W
    h = index // W % H
    c = index // (W * H) % C
    b = index // (W * H * C)
    v = tl.load(x_ptr + b * stride_b + index % (C * H * W), mask=mask, other=0.0).to(ACC)
    g_first = grad_ptr + b * 2 * C * Hp * Wp + (c * Hp + h + top) * Wp + left + w
    g1 = tl.load(g_first, mask=mask, other=0.0).to(ACC)
    g2 = tl.load(g_first + C * Hp * Wp, mask=mask, other=0.0).to(ACC)
    # g1 elu'(v) - g2 elu'(-v), with elu'(u) = 1 for u > 0 and exp(u) otherwise: NaN at a NaN, as
    # the C++ kernel and torch's vectorised ELU.
    e = tl.exp(-tl.abs(v))
    grad_x = g1 * tl.where(v > 0.0, 1.0, e) - g2 * tl.where(v < 0.0, 1.0, e)
    tl.store(grad_x_ptr + index, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _concat_elu_launch(kernel, x: torch.Tensor, padding: list[int], total: int, *tensors: torch.Tensor) -> None:
    """kernel(*tensors, C, H, W, left, top, Hp, Wp, total, x's batch stride) over one program per
    block of ``total`` elements."""
    _, C, H, W = x.shape
    left, right, top, bottom = padding or (0, 0, 0, 0)
    block = min(triton.next_power_of_2(total), _MAX_BLOCK)
    with _on_device(x):
        kernel[(triton.cdiv(total, block),)](
            *tensors,
            C,
            H,
            W,
            left,
            top,
            H + top + bottom,
            W + left + right,
            total,
            x.stride(0),
            ACC=_acc_dtype(x),
            BLOCK=block,
            num_warps=4 if block >= 512 else 1,
        )


def _examples(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[0] == 0 or x[0].is_contiguous() else x.contiguous()


def concat_elu_fwd(x: torch.Tensor, padding: list[int]) -> torch.Tensor:
    """[elu(x), elu(-x)] [B, 2C, H + top + bottom, W + left + right] for x [B, C, H, W], zero-padded
    by ``padding`` = [left, right, top, bottom] ([] for none)."""
    if is_channels_last(x):  # each pixel's channels as one example's row; the padding by F.pad
        pixels = concat_elu_fwd(x.permute(0, 2, 3, 1).reshape(-1, 1, 1, x.shape[1]), [])
        out = pixels.view(x.shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2)
        return F.pad(out, padding) if any(padding) else out
    x = _examples(x)
    B, C, H, W = x.shape
    left, right, top, bottom = padding or (0, 0, 0, 0)
    out = torch.empty(B, 2 * C, H + top + bottom, W + left + right, device=x.device, dtype=x.dtype)
    if out.numel():
        _concat_elu_launch(_concat_elu_fwd_kernel, x, padding, out.numel() // 2, x, out)
    return out


def concat_elu_bwd(grad: torch.Tensor, x: torch.Tensor, padding: list[int]) -> torch.Tensor:
    """The gradient of :func:`concat_elu_fwd` at x [B, C, H, W] for ``grad`` (any layout)."""
    if is_channels_last(x):
        B, C, H, W = x.shape
        left, right, top, bottom = padding or (0, 0, 0, 0)
        interior = grad[:, :, top : top + H, left : left + W].permute(0, 2, 3, 1).reshape(-1, 2, 1, C)
        pixels = concat_elu_bwd(interior, x.permute(0, 2, 3, 1).reshape(-1, 1, 1, C), [])
        return pixels.view(B, H, W, C).permute(0, 3, 1, 2)
    x = _examples(x)
    grad = grad.to(x.dtype).contiguous()
    grad_x = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if grad_x.numel():
        _concat_elu_launch(_concat_elu_bwd_kernel, x, padding, grad_x.numel(), grad, x, grad_x)
    return grad_x
