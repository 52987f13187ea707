"""Triton kernels of the decoder-Jacobian family, and their launchers.

- ``jacobian_tangent_step``: one program per (example, block of h units) computes act, act' (and
  act'' in backward) once and streams the k tangent rows of that example through them.
- ``jacobian_gram_reduce``: T M Tᵀ, or its diagonal, with each block of T M reduced against T
  in registers as it is built (and stored once, for the backward).

Loads in the input dtype, computes in float32 (float64 for float64 inputs). On CPU tensors they run
through the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported)::

    >>> pre, tangent = torch.randn(4, 32, device="cuda"), torch.randn(4, 3, 32, device="cuda")
    >>> jacobian_tangent_step_fwd(pre, tangent, "tanh", 0.0, 0.0)[1].shape
    torch.Size([4, 3, 32])
"""

import contextlib
import math

import torch
import triton
import triton.language as tl

_ACTIVATION_CODES = {"tanh": 0, "sigmoid": 1, "relu": 2, "leaky_relu": 3, "softplus": 4, "elu": 5, "gelu": 6}
_MAX_BLOCK_H = 256
# tl.dot needs blocks of at least 16 in every dim.
_MIN_DOT = 16
# The gram reduction's programs: 8 warps, and a stated register budget of 128 (two programs per
# multiprocessor's 64K registers). Left to its own heuristic, ptxas settled on 32 or 64 registers
# for some of these kernels and spilled (8.7 KB of spill traffic per thread on sm_80 at 4 warps,
# 12 bytes at 8 warps for float16); with the budget stated it uses it and spills nothing.
_GRAM_WARPS = 8
_GRAM_REGISTERS = 128
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_INV_SQRT2 = tl.constexpr(1.0 / math.sqrt(2.0))


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device, which need not be the tensor's.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _activation_code(activation: str) -> int:
    if activation not in _ACTIVATION_CODES:
        raise ValueError(
            f"vaekernels_triton::jacobian_tangent_step: activation must be one of "
            f"{', '.join(_ACTIVATION_CODES)}, got {activation!r}"
        )
    return _ACTIVATION_CODES[activation]


@triton.jit
def _sigmoid(x):
    # exp(-x) overflows to inf for very negative x and the quotient to 0: never NaN.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _activation(x, p0, p1, ACT: tl.constexpr):
    """(act(x), act'(x), act''(x)) for the activation coded ACT (see _ACTIVATION_CODES)."""
    zero = tl.zeros_like(x)
    if ACT == 0:  # tanh, through exp(-2|x|) so neither end overflows
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        out = tl.where(x < 0, -t, t)
        d1 = 1.0 - out * out
        d2 = -2.0 * out * d1
    elif ACT == 1:  # sigmoid
        out = _sigmoid(x)
        d1 = out * (1.0 - out)
        d2 = d1 * (1.0 - 2.0 * out)
    elif ACT == 2:  # relu; a NaN stays NaN, as in torch.relu (x > 0 is false for it)
        out = tl.where((x > 0) | (x != x), x, zero)
        d1 = tl.where(x > 0, 1.0, 0.0) + zero
        d2 = zero
    elif ACT == 3:  # leaky_relu(p0)
        out = tl.where(x > 0, x, x * p0)
        d1 = tl.where(x > 0, 1.0, p0) + zero
        d2 = zero
    elif ACT == 4:  # softplus(beta=p0, threshold=p1)
        bx = x * p0
        s = _sigmoid(bx)
        linear = bx > p1
        out = tl.where(linear, x, (tl.maximum(bx, zero) + tl.log(1.0 + tl.exp(-tl.abs(bx)))) / p0)
        d1 = tl.where(linear, 1.0, s)
        d2 = tl.where(linear, zero, p0 * s * (1.0 - s))
    elif ACT == 5:  # elu(alpha=p0)
        # tl.minimum would drop a NaN (a finite 0 for it): propagated, as torch.nn.functional.elu does.
        e = tl.exp(tl.minimum(x, zero, propagate_nan=tl.PropagateNan.ALL)) * p0
        out = tl.where(x > 0, x, e - p0)
        d1 = tl.where(x > 0, 1.0, e)
        d2 = tl.where(x > 0, zero, e)
    else:  # gelu, exact (erf)
        cdf = 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT2))
        pdf = tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
        out = x * cdf
        d1 = cdf + x * pdf
        d2 = pdf * (2.0 - x * x)
    return out, d1, d2


def _params(pre: torch.Tensor, p0: float, p1: float) -> torch.Tensor:
    # A float kernel argument is a float32 scalar; in a tensor the parameters keep the compute
    # precision (float64 for float64 pre, float32 otherwise).
    dtype = torch.float64 if pre.dtype == torch.float64 else torch.float32
    return torch.tensor([p0, p1], dtype=dtype).to(pre.device, non_blocking=True)


def _step_grid(pre: torch.Tensor) -> tuple[tuple[int, int], int]:
    h = pre.shape[1]
    block_h = min(triton.next_power_of_2(max(h, 1)), _MAX_BLOCK_H)
    return (pre.shape[0], triton.cdiv(h, block_h)), block_h


@triton.jit
def _step_block(pre_ptr, params_ptr, h, ACT: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's example b, its block of h units (cols, mask), and act, act', act'' of pre there."""
    b = tl.program_id(0).to(tl.int64)
    p0, p1 = tl.load(params_ptr), tl.load(params_ptr + 1)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < h
    # float16 and bfloat16 in float32: Triton's exp, log and erf take float32 or float64 only.
    acc = tl.float64 if pre_ptr.dtype.element_ty == tl.float64 else tl.float32
    pre = tl.load(pre_ptr + b * h + cols, mask=mask, other=0.0).to(acc)
    out, d1, d2 = _activation(pre, p0.to(acc), p1.to(acc), ACT)
    return b, cols, mask, out, d1, d2


@triton.jit
def _jacobian_tangent_step_fwd_kernel(
    pre_ptr,
    tangent_ptr,
    out_ptr,
    tangent_out_ptr,
    h,
    k,
    tangent_batch_stride,
    params_ptr,
    ACT: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    b, cols, mask, out, d1, _ = _step_block(pre_ptr, params_ptr, h, ACT, BLOCK_H)
    tl.store(out_ptr + b * h + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
    src = tangent_ptr + b * tangent_batch_stride + cols
    dst = tangent_out_ptr + b * k * h + cols
    for i in range(k):
        t = tl.load(src + i * h, mask=mask, other=0.0)
        tl.store(dst + i * h, (d1 * t).to(tangent_out_ptr.dtype.element_ty), mask=mask)


def jacobian_tangent_step_fwd(
    pre: torch.Tensor, tangent: torch.Tensor, activation: str, p0: float, p1: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(pre) [B, h], act'(pre)[:, None, :] * tangent [B, k, h]); tangent [B or 1, k, h]."""
    code = _activation_code(activation)
    pre, tangent = pre.contiguous(), tangent.contiguous()
    batch, h = pre.shape
    k = tangent.shape[1]
    out = torch.empty_like(pre)
    tangent_out = pre.new_empty(batch, k, h)
    grid, block_h = _step_grid(pre)
    stride = 0 if tangent.shape[0] == 1 else k * h
    with _on_device(pre):
        _jacobian_tangent_step_fwd_kernel[grid](
            pre, tangent, out, tangent_out, h, k, stride, _params(pre, p0, p1), ACT=code, BLOCK_H=block_h
        )
    return out, tangent_out


@triton.jit
def _jacobian_tangent_step_bwd_kernel(
    grad_out_ptr,
    grad_tangent_ptr,
    pre_ptr,
    tangent_ptr,
    grad_pre_ptr,
    grad_tangent_in_ptr,
    h,
    k,
    tangent_batch_stride,
    params_ptr,
    ACT: tl.constexpr,
    HAS_GRAD_OUT: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    b, cols, mask, _, d1, d2 = _step_block(pre_ptr, params_ptr, h, ACT, BLOCK_H)
    acc = tl.zeros_like(d1)
    src = tangent_ptr + b * tangent_batch_stride + cols
    grads = grad_tangent_ptr + b * k * h + cols
    dst = grad_tangent_in_ptr + b * k * h + cols
    for i in range(k):
        g = tl.load(grads + i * h, mask=mask, other=0.0).to(d1.dtype)
        t = tl.load(src + i * h, mask=mask, other=0.0)
        tl.store(dst + i * h, (d1 * g).to(grad_tangent_in_ptr.dtype.element_ty), mask=mask)
        acc += g * t
    grad_pre = d2 * acc
    if HAS_GRAD_OUT:
        grad_pre += tl.load(grad_out_ptr + b * h + cols, mask=mask, other=0.0).to(d1.dtype) * d1
    tl.store(grad_pre_ptr + b * h + cols, grad_pre.to(grad_pre_ptr.dtype.element_ty), mask=mask)


def jacobian_tangent_step_bwd(
    grad_out: torch.Tensor | None,
    grad_tangent: torch.Tensor,
    pre: torch.Tensor,
    tangent: torch.Tensor,
    activation: str,
    p0: float,
    p1: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of pre [B, h], grad of tangent: [B, k, h], or for a shared tangent [1, k, h] its sum over the batch)."""
    code = _activation_code(activation)
    pre, tangent, grad_tangent = pre.contiguous(), tangent.contiguous(), grad_tangent.contiguous()
    batch, h = pre.shape
    k = tangent.shape[1]
    grad_pre = torch.empty_like(pre)
    grad_tangent_in = pre.new_empty(batch, k, h)
    has_grad_out = grad_out is not None
    grad_out = grad_out.contiguous() if has_grad_out else pre
    grid, block_h = _step_grid(pre)
    stride = 0 if tangent.shape[0] == 1 else k * h
    with _on_device(pre):
        _jacobian_tangent_step_bwd_kernel[grid](
            grad_out,
            grad_tangent,
            pre,
            tangent,
            grad_pre,
            grad_tangent_in,
            h,
            k,
            stride,
            _params(pre, p0, p1),
            ACT=code,
            HAS_GRAD_OUT=has_grad_out,
            BLOCK_H=block_h,
        )
    return grad_pre, (grad_tangent_in.sum(0, keepdim=True) if stride == 0 and batch != 1 else grad_tangent_in)


@triton.jit
def _tile_times_metric(
    t_ptr,
    rows,
    row_mask,
    metric_ptr,
    kc,
    h,
    IS_FP64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(T M)[rows, kc : kc + BLOCK_K] for row-major T [*, h] and M [h, h], accumulated over h in
    blocks of BLOCK_J."""
    k_cols = kc + tl.arange(0, BLOCK_K)
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    acc = tl.zeros((BLOCK_ROWS, BLOCK_K), dtype=ACC)
    for jc in range(0, h, BLOCK_J):
        j_cols = jc + tl.arange(0, BLOCK_J)
        # Half-precision tiles are widened before the product, which then runs as the float32 one
        # (and the interpreter's bfloat16 tl.dot, which multiplies the raw bits, is never used).
        t = tl.load(
            t_ptr + rows[:, None] * h + j_cols[None, :], mask=row_mask[:, None] & (j_cols[None, :] < h), other=0.0
        ).to(ACC)
        m = tl.load(
            metric_ptr + j_cols[:, None] * h + k_cols[None, :],
            mask=(j_cols[:, None] < h) & (k_cols[None, :] < h),
            other=0.0,
        ).to(ACC)
        if IS_FP64:
            acc += tl.sum(t[:, :, None] * m[None, :, :], axis=1)
        else:
            acc += tl.dot(t, m, input_precision="ieee")
    return acc


@triton.jit
def _jacobian_gram_reduce_fwd_kernel(
    tangent_ptr,
    metric_ptr,
    out_ptr,
    tm_ptr,
    rows_total,
    k,
    h,
    DIAGONAL: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """DIAGONAL: one program per BLOCK_ROWS rows of T viewed as [B·k, h], out[r] = (T M)_r · T_r.
    Otherwise one program per example b, out[b] = T_b M T_bᵀ with its k rows in one block. Either
    way T M is written out too, block by block, for the backward."""
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_ROWS)
    if DIAGONAL:
        rows = pid * BLOCK_ROWS + offs
        row_mask = rows < rows_total
    else:
        rows = pid * k + offs
        row_mask = offs < k
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    diag = tl.zeros((BLOCK_ROWS,), dtype=acc_dtype)
    gram = tl.zeros((BLOCK_ROWS, BLOCK_ROWS), dtype=acc_dtype)
    for kc in range(0, h, BLOCK_K):
        tm = _tile_times_metric(tangent_ptr, rows, row_mask, metric_ptr, kc, h, IS_FP64, BLOCK_ROWS, BLOCK_J, BLOCK_K)
        k_cols = kc + tl.arange(0, BLOCK_K)
        tile = rows[:, None] * h + k_cols[None, :]
        tile_mask = row_mask[:, None] & (k_cols[None, :] < h)
        tl.store(tm_ptr + tile, tm.to(tm_ptr.dtype.element_ty), mask=tile_mask)
        t = tl.load(tangent_ptr + tile, mask=tile_mask, other=0.0).to(acc_dtype)
        if DIAGONAL:
            diag += tl.sum(tm * t, axis=1)
        elif IS_FP64:
            gram += tl.sum(tm[:, None, :] * t[None, :, :], axis=2)
        else:
            gram += tl.dot(tm, tl.trans(t), input_precision="ieee")
    if DIAGONAL:
        tl.store(out_ptr + rows, diag.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        pairs = pid * k * k + offs[:, None] * k + offs[None, :]
        tl.store(out_ptr + pairs, gram.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & row_mask[None, :])


def _gram_blocks(h: int, block_rows: int, is_fp64: bool) -> tuple[int, int]:
    """(BLOCK_J, BLOCK_K) of the gram reduction for blocks of ``block_rows`` rows.

    Sized by ptxas's register counts (tests/test_triton_compile.py): float32 (and widened half)
    products of [rows, BLOCK_J] x [BLOCK_J, BLOCK_K] with rows x BLOCK_K <= 2048, and float64
    broadcast temporaries [rows, rows, BLOCK_K] (the Gram's) of at most 4096 elements, fit in
    _GRAM_REGISTERS at _GRAM_WARPS warps at the bench shapes (up to 64 rows) on sm_80 and sm_90.
    """
    if is_fp64:
        # float64 contracts by broadcast-multiply-sum (no tl.dot), which needs no block of 16.
        return 8, max(1, min(8, 4096 // (block_rows * block_rows)))
    block = max(_MIN_DOT, min(64, 2048 // block_rows, triton.next_power_of_2(h)))
    return block, block


def jacobian_gram_reduce_fwd(
    tangent: torch.Tensor, metric: torch.Tensor, diagonal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T M Tᵀ per example [B, k, k], or its diagonal [B, k]; T M [B, k, h]) for T [B, k, h], M [h, h]."""
    tangent, metric = tangent.contiguous(), metric.contiguous()
    batch, k, h = tangent.shape
    is_fp64 = tangent.dtype == torch.float64
    if diagonal:
        block_rows, grid = 32, triton.cdiv(batch * k, 32)
        out = tangent.new_empty(batch, k)
    else:
        block_rows, grid = max(_MIN_DOT, triton.next_power_of_2(k)), batch
        out = tangent.new_empty(batch, k, k)
    block_j, block_k = _gram_blocks(h, block_rows, is_fp64)
    tm = torch.empty_like(tangent)
    if tm.numel() == 0:
        return out.zero_(), tm
    with _on_device(tangent):
        _jacobian_gram_reduce_fwd_kernel[(grid,)](
            tangent,
            metric,
            out,
            tm,
            batch * k,
            k,
            h,
            DIAGONAL=diagonal,
            IS_FP64=is_fp64,
            BLOCK_ROWS=block_rows,
            BLOCK_J=block_j,
            BLOCK_K=block_k,
            num_warps=_GRAM_WARPS,
            maxnreg=_GRAM_REGISTERS,
        )
    return out, tm
