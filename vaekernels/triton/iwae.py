"""Triton kernels of the importance-weighted bound family, and their launchers.

Row-reduction launchers take rank-3 ``[P, Q, D]`` views whose leading strides may be zero (``x``
broadcast over the K samples is read in place, never copied); every kernel loads in the input
dtype, computes and accumulates in float32 (float64 for float64 inputs) and stores in the input
dtype. Offsets are 64-bit so tensors past 2**31 elements do not wrap.

The launchers are pure (tensors in, new tensors out) so that the op layer can register them as
custom-op implementations. On CPU tensors they run through the Triton interpreter, which needs
``TRITON_INTERPRET=1`` in the environment before triton is imported::

    >>> logits = torch.randn(4, 8, 784, device="cuda")
    >>> x = torch.rand(4, 1, 784, device="cuda").bernoulli()
    >>> bernoulli_log_prob_fwd(logits, x.expand(4, 8, 784)).shape
    torch.Size([4, 8])
"""

import contextlib
import math

import torch
import triton
import triton.language as tl

_LOG_2PI = tl.constexpr(math.log(2.0 * math.pi))
_SQRT_HALF = tl.constexpr(math.sqrt(0.5))

# Elements of one register tile per accumulation dtype: about 8 per thread at the warp counts of
# `_num_warps`, which keeps every kernel's temporaries in registers (ptxas, sm_90: no spills)
# while leaving enough of them to keep the memory system busy.
_TILE = {tl.float32: 2048, tl.float64: 1024}
_MAX_BLOCK_D = 1024
# Rows (or i) per program in the pairwise kernels: at most 16, and fewer for small batches so that
# a batch of a few hundred still spreads over a GPU's hundred-odd multiprocessors.
_MAX_PAIR_ROWS = 16
_MIN_PAIR_PROGRAMS = 256


def _acc_dtype(*tensors: torch.Tensor) -> tl.dtype:
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device, which need not be the tensor's.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _row_blocks(rows: int, cols: int, acc: tl.dtype) -> tuple[int, int]:
    """Block sizes for a [rows, cols] reduction: a power-of-two column block looped over the row,
    and as many rows per program as fill one tile (short rows, e.g. K samples, share a program)."""
    block_cols = min(triton.next_power_of_2(max(cols, 1)), _MAX_BLOCK_D)
    block_rows = max(1, min(_TILE[acc] // block_cols, triton.next_power_of_2(max(rows, 1))))
    return block_rows, block_cols


def _pair_blocks(outer: int, inner: int, dim: int, acc: tl.dtype) -> tuple[int, int, int]:
    """Block sizes for a pairwise kernel over [outer, inner, dim] tiles: the whole latent dim in
    one block (joint terms sum over it before any exp), `outer` rows per program, `inner` rows per
    loop step."""
    block_k = triton.next_power_of_2(max(dim, 1))
    pairs = max(1, _TILE[acc] // block_k)
    block_outer = min(_MAX_PAIR_ROWS, pairs, triton.next_power_of_2(max(outer // _MIN_PAIR_PROGRAMS, 1)))
    block_inner = min(max(1, pairs // block_outer), triton.next_power_of_2(max(inner, 1)))
    return block_outer, block_inner, block_k


def _num_warps(tile: int) -> int:
    return 8 if tile >= 2048 else 4 if tile >= 1024 else 2 if tile >= 256 else 1


# ---------------------------------------------------------------------------------------------
# Tiles shared by the kernels: a block of rows, a block of columns, their loads and stores.


@triton.jit
def _row_block(R, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    return rows, rows < R


@triton.jit
def _col_block(start, D, row_mask, BLOCK_D: tl.constexpr):
    cols = (start + tl.arange(0, BLOCK_D)).to(tl.int64)
    return cols, row_mask[:, None] & (cols < D)[None, :]


@triton.jit
def _load_tile(row_ptrs, cols, stride_d, mask, ACC: tl.constexpr, other=0.0):
    return tl.load(row_ptrs[:, None] + cols[None, :] * stride_d, mask=mask, other=other).to(ACC)


@triton.jit
def _load_rows(row_ptrs, row_mask, ACC: tl.constexpr):
    return tl.load(row_ptrs, mask=row_mask, other=0.0).to(ACC)


@triton.jit
def _store_tile(ptr, rows, cols, D, values, mask):
    # Outputs are fresh contiguous tensors: row stride D, column stride 1.
    tl.store(ptr + rows[:, None] * D + cols[None, :], values.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_rows(ptr, rows, values, row_mask):
    tl.store(ptr + rows, values.to(ptr.dtype.element_ty), mask=row_mask)


# ---------------------------------------------------------------------------------------------
# log_mean_exp


@triton.jit
def _log_mean_exp_fwd_kernel(
    x_ptr,
    out_ptr,
    log_sum_ptr,
    R,
    N,
    stride_r,
    stride_n,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STATS: tl.constexpr,
):
    # STATS: the backward's row statistics instead, the max into out_ptr and log sum exp(x - max)
    # into log_sum_ptr.
    rows, row_mask = _row_block(R, BLOCK_R)
    x_rows = x_ptr + rows * stride_r
    running_max = tl.full([BLOCK_R], float("-inf"), ACC)
    running_sum = tl.zeros([BLOCK_R], ACC)
    # Sum of the NaN inputs only (0 when there are none): added to the result, it keeps a NaN
    # visible even in a row whose +inf maximum overrides the sum.
    nan_probe = tl.zeros([BLOCK_R], ACC)
    inf_count = tl.zeros([BLOCK_R], ACC)
    for n0 in range(0, N, BLOCK_N):
        cols, mask = _col_block(n0, N, row_mask, BLOCK_N)
        x = _load_tile(x_rows, cols, stride_n, mask, ACC, other=float("-inf"))
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        # Shifting by -inf would give exp(-inf - -inf) = NaN; a row still all -inf has nothing
        # to rescale, so shift it by 0 and its exps stay exactly 0.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        running_max = new_max
        nan_probe += tl.sum(tl.where(x != x, x, 0.0), axis=1)
        if STATS:
            inf_count += tl.sum(tl.where(x == float("inf"), 1.0, 0.0), axis=1)
    if STATS:
        # The max with the NaN probe added: a row holding NaN (all NaN, say, whose max over the
        # non-NaN entries is -inf, like an empty row's) gets NaN weights, as the reference's, not
        # an empty row's zeros.
        _store_rows(out_ptr, rows, running_max + nan_probe, row_mask)
        # A row holding +inf: its sum is exp(inf - inf) = NaN, but the softmax's limit is 1 / count
        # on its +inf entries, kept as log count (NaN still, with a NaN in the row).
        log_sum = tl.where(running_max == float("inf"), tl.log(inf_count) + nan_probe, tl.log(running_sum))
        _store_rows(log_sum_ptr, rows, log_sum, row_mask)
    else:
        # N may arrive as the constexpr 1 (Triton specialises it), which has no .to(); adding it to
        # an ACC zero converts either form.
        out = running_max + (tl.log(running_sum) - tl.log(tl.zeros([BLOCK_R], ACC) + N))
        # With a +inf maximum the sum holds exp(inf - inf) = NaN, but the mean is +inf.
        _store_rows(out_ptr, rows, tl.where(running_max == float("inf"), running_max, out) + nan_probe, row_mask)


@triton.jit
def _log_mean_exp_bwd_kernel(
    grad_ptr,
    x_ptr,
    max_ptr,
    log_sum_ptr,
    grad_x_ptr,
    R,
    N,
    stride_g,
    stride_r,
    stride_n,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Elementwise, so each program takes one [BLOCK_R, BLOCK_N] tile (grid axis 1 over the
    # columns): a short batch with many samples still spreads over the whole GPU.
    rows, row_mask = _row_block(R, BLOCK_R)
    cols, mask = _col_block(tl.program_id(1) * BLOCK_N, N, row_mask, BLOCK_N)
    grad = _load_rows(grad_ptr + rows * stride_g, row_mask, ACC)
    # The weights exp(x - max - log sum exp(x - max)), not exp(x - out) / N: the forward's out is
    # rounded to the output dtype (a whole unit at out = -1e7 in float32), and those would sum to
    # anything between 1/e and e. A row of all -inf (max = -inf) has no weight anywhere, where
    # x - max would be -inf - -inf = NaN.
    row_max = _load_rows(max_ptr + rows, row_mask, ACC)
    log_sum = _load_rows(log_sum_ptr + rows, row_mask, ACC)
    empty = row_max == float("-inf")
    shift = tl.where(empty, 0.0, row_max)
    x = _load_tile(x_ptr + rows * stride_r, cols, stride_n, mask, ACC)
    weights = tl.where(empty[:, None], 0.0, tl.exp((x - shift[:, None]) - log_sum[:, None]))
    # A row holding +inf (max = +inf): 1 / count on its +inf entries, 0 elsewhere (x - max is NaN
    # and -inf there); log_sum is log count, or NaN with a NaN in the row.
    infinite = row_max == float("inf")
    top = tl.where(x == float("inf"), 1.0, 0.0) * tl.exp(-log_sum[:, None])
    weights = tl.where(infinite[:, None], top, weights)
    _store_tile(grad_x_ptr, rows, cols, N, grad[:, None] * weights, mask)


def _log_mean_exp(x: torch.Tensor, dtype: torch.dtype, stats: bool = False):
    """The [R] output in ``dtype``; with ``stats``, the backward's row max and log sum exp(x - max)
    in the accumulation dtype instead."""
    R, N = x.shape
    acc = _acc_dtype(x)
    if stats:
        dtype = torch.float64 if acc == tl.float64 else torch.float32
    out = torch.empty(R, dtype=dtype, device=x.device)
    log_sum = torch.empty(R, dtype=dtype, device=x.device) if stats else out
    if R == 0:
        return (out, log_sum) if stats else out
    block_r, block_n = _row_blocks(R, N, acc)
    with _on_device(x):
        _log_mean_exp_fwd_kernel[(triton.cdiv(R, block_r),)](
            x,
            out,
            log_sum,
            R,
            N,
            x.stride(0),
            x.stride(1),
            ACC=acc,
            BLOCK_R=block_r,
            BLOCK_N=block_n,
            STATS=stats,
            num_warps=_num_warps(block_r * block_n),
        )
    return (out, log_sum) if stats else out


def log_mean_exp_fwd(x: torch.Tensor) -> torch.Tensor:
    """log(mean(exp(x))) over the last dim of a [R, N] tensor (N >= 1) -> [R].

    A row of all -inf gives -inf, a row holding +inf gives +inf, a row holding NaN gives NaN.

    >>> log_mean_exp_fwd(torch.zeros(3, 5, device="cuda"))
    tensor([0., 0., 0.], device='cuda:0')
    """
    return _log_mean_exp(x, x.dtype)


def log_mean_exp_bwd(grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Gradient of `log_mean_exp_fwd` with respect to x: grad [R] times the weights
    softmax(x) -> a contiguous [R, N] tensor, exactly 0 on a row of all -inf. ``out`` (the forward's
    output) is not used: the weights come from the row's max and sum, recomputed in a pass over x,
    so that they sum to 1 whatever the rounding of ``out``.

    >>> x = torch.tensor([[0.0, 0.0], [float("-inf"), float("-inf")]], device="cuda")
    >>> log_mean_exp_bwd(torch.ones(2, device="cuda"), x, log_mean_exp_fwd(x))
    tensor([[0.5000, 0.5000],
            [0.0000, 0.0000]], device='cuda:0')
    """
    R, N = x.shape
    grad_x = torch.empty((R, N), dtype=x.dtype, device=x.device)
    if grad_x.numel() == 0:
        return grad_x
    row_max, log_sum = _log_mean_exp(x, x.dtype, stats=True)
    acc = _acc_dtype(x)
    block_r, block_n = _row_blocks(R, N, acc)
    with _on_device(x):
        _log_mean_exp_bwd_kernel[(triton.cdiv(R, block_r), triton.cdiv(N, block_n))](
            grad,
            x,
            row_max,
            log_sum,
            grad_x,
            R,
            N,
            grad.stride(0),
            *x.stride(),
            ACC=acc,
            BLOCK_R=block_r,
            BLOCK_N=block_n,
            num_warps=_num_warps(block_r * block_n),
        )
    return grad_x


# ---------------------------------------------------------------------------------------------
# Row reductions over [P, Q, D] views


@triton.jit
def _row_ptrs(ptr, rows, Q, stride_p, stride_q):
    # Leading strides may be 0 (a broadcast input), so each input gets its own row pointers.
    return ptr + (rows // Q) * stride_p + (rows % Q) * stride_q


@triton.jit
def _softplus(logits):
    # max(l, 0) + log1p(exp(-|l|)): exp never overflows, so |l| = 1e4 stays finite. log1p(t) is
    # log(u) * t / (u - 1) with u = 1 + t (exact where u rounds to 1, where it is t), which keeps
    # full relative precision for the tiny t of large |l|, where log(1 + t) would give 0.
    t = tl.exp(-tl.abs(logits))
    u = 1.0 + t
    log1p_t = tl.where(u == 1.0, t, tl.log(u) * (t / (u - 1.0)))
    return tl.maximum(logits, 0.0) + log1p_t


@triton.jit
def _bernoulli_term(logits, x):
    # x log sigmoid(l) + (1 - x) log sigmoid(-l), a term of weight 0 counting 0 where its log is
    # -inf (logits of +-inf), as in xlogy: x l - softplus(l) is inf - inf or 0 * inf there, where
    # the answer is 0 or -inf. A NaN logit stays NaN through log1p(exp(-|l|)).
    log1p_exp = _softplus(-tl.abs(logits))
    positive = tl.where(x == 0.0, 0.0, x * (tl.minimum(logits, 0.0) - log1p_exp))
    negative = tl.where(x == 1.0, 0.0, (1.0 - x) * (-tl.maximum(logits, 0.0) - log1p_exp))
    return positive + negative


@triton.jit
def _times_unless_zero(a, b):
    # a * b, but 0 where a is 0 even if b is inf: a zero difference or weight times a term that
    # overflowed (1 / std for log_var < -176 in float32, or w far from the mean of a tiny variance).
    return tl.where(a == 0.0, 0.0, a * b)


@triton.jit
def _standardised(diff, log_var):
    # (x - mean) / std, exactly 0 at x = mean, as vaekernels.reference.iwae.standardised: 1 / std as
    # exp(-log_var / 4) twice keeps a tiny difference over a tiny std finite while the quotient is.
    root = tl.exp(-0.25 * log_var)
    return _times_unless_zero(_times_unless_zero(diff, root), root)


@triton.jit
def _log_var_plus_square(log_var, w):
    # log_var + w^2, +inf where a variance of 0 (log_var = -inf) meets an infinite w (any x away
    # from the mean): the density is 0, as w^2 outgrows log_var, not -inf + inf = NaN.
    square = w * w
    return tl.where((log_var == float("-inf")) & (square == float("inf")), float("inf"), log_var + square)


@triton.jit
def _bernoulli_log_prob_fwd_kernel(
    logits_ptr,
    x_ptr,
    out_ptr,
    R,
    Q,
    D,
    sl_p,
    sl_q,
    sl_d,
    sx_p,
    sx_q,
    sx_d,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, row_mask = _row_block(R, BLOCK_R)
    l_rows = _row_ptrs(logits_ptr, rows, Q, sl_p, sl_q)
    x_rows = _row_ptrs(x_ptr, rows, Q, sx_p, sx_q)
    acc = tl.zeros([BLOCK_R, BLOCK_D], ACC)
    for d0 in range(0, D, BLOCK_D):
        cols, mask = _col_block(d0, D, row_mask, BLOCK_D)
        logits = _load_tile(l_rows, cols, sl_d, mask, ACC)
        x = _load_tile(x_rows, cols, sx_d, mask, ACC)
        acc += tl.where(mask, _bernoulli_term(logits, x), 0.0)
    _store_rows(out_ptr, rows, tl.sum(acc, axis=1), row_mask)


@triton.jit
def _bernoulli_log_prob_bwd_kernel(
    grad_ptr,
    logits_ptr,
    x_ptr,
    out_ptr,
    R,
    Q,
    D,
    sg_p,
    sg_q,
    sl_p,
    sl_q,
    sl_d,
    sx_p,
    sx_q,
    sx_d,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, row_mask = _row_block(R, BLOCK_R)
    grad = _load_rows(_row_ptrs(grad_ptr, rows, Q, sg_p, sg_q), row_mask, ACC)
    l_rows = _row_ptrs(logits_ptr, rows, Q, sl_p, sl_q)
    x_rows = _row_ptrs(x_ptr, rows, Q, sx_p, sx_q)
    for d0 in range(0, D, BLOCK_D):
        cols, mask = _col_block(d0, D, row_mask, BLOCK_D)
        logits = _load_tile(l_rows, cols, sl_d, mask, ACC)
        x = _load_tile(x_rows, cols, sx_d, mask, ACC)
        # 1 / (1 + exp(-l)): for l = -1e4 the exp overflows to inf and the quotient to 0, never NaN.
        sigmoid = 1.0 / (1.0 + tl.exp(-logits))
        _store_tile(out_ptr, rows, cols, D, grad[:, None] * (x - sigmoid), mask)


@triton.jit
def _gaussian_log_prob_fwd_kernel(
    x_ptr,
    mean_ptr,
    log_var_ptr,
    out_ptr,
    R,
    Q,
    D,
    sx_p,
    sx_q,
    sx_d,
    sm_p,
    sm_q,
    sm_d,
    sv_p,
    sv_q,
    sv_d,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, row_mask = _row_block(R, BLOCK_R)
    x_rows = _row_ptrs(x_ptr, rows, Q, sx_p, sx_q)
    m_rows = _row_ptrs(mean_ptr, rows, Q, sm_p, sm_q)
    v_rows = _row_ptrs(log_var_ptr, rows, Q, sv_p, sv_q)
    acc = tl.zeros([BLOCK_R, BLOCK_D], ACC)
    for d0 in range(0, D, BLOCK_D):
        cols, mask = _col_block(d0, D, row_mask, BLOCK_D)
        # Masked lanes load 0 everywhere, where the summand lv + ((x - m) / std)^2 is exactly 0.
        # Squaring after scaling: (x - m)^2 exp(-lv) would be 0 * inf = NaN at x = m once exp(-lv)
        # overflows (lv < -88 in float32).
        diff = _load_tile(x_rows, cols, sx_d, mask, ACC) - _load_tile(m_rows, cols, sm_d, mask, ACC)
        log_var = _load_tile(v_rows, cols, sv_d, mask, ACC)
        scaled_diff = _standardised(diff, log_var)
        acc += _log_var_plus_square(log_var, scaled_diff)
    # log(2 pi) as an ACC scalar: a Python float literal would be rounded to float32 first.
    log_2pi = tl.full([], _LOG_2PI, ACC)
    _store_rows(out_ptr, rows, -0.5 * (D * log_2pi + tl.sum(acc, axis=1)), row_mask)


@triton.jit
def _exp_minus_one_minus(x, ACC: tl.constexpr):
    # exp(x) - 1 - x. Near 0 it is about x^2 / 2, below the rounding of exp(x) itself (5e-9
    # against 6e-8 at x = 1e-4 in float32), and tl has no expm1. So |x| < 1 takes the series
    # x^2 / 2 (1 + x / 3 (1 + x / 4 (...))), through the x^n / n! past which terms fall below
    # the dtype's epsilon.
    LAST_TERM: tl.constexpr = 18 if ACC == tl.float64 else 11
    series = 1.0 + x * tl.full([], 1.0 / LAST_TERM, ACC)
    for n in tl.static_range(LAST_TERM - 1, 2, -1):
        series = 1.0 + x * series * tl.full([], 1.0 / n, ACC)
    # exp(x) - 1 - x is inf - inf at x = +inf, where the answer is +inf.
    return tl.where(tl.abs(x) < 1.0, 0.5 * x * x * series, tl.where(x == float("inf"), x, tl.exp(x) - 1.0 - x))


@triton.jit
def _gaussian_kl_fwd_kernel(
    mean_ptr,
    log_var_ptr,
    out_ptr,
    R,
    Q,
    D,
    sm_p,
    sm_q,
    sm_d,
    sv_p,
    sv_q,
    sv_d,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, row_mask = _row_block(R, BLOCK_R)
    m_rows = _row_ptrs(mean_ptr, rows, Q, sm_p, sm_q)
    v_rows = _row_ptrs(log_var_ptr, rows, Q, sv_p, sv_q)
    acc = tl.zeros([BLOCK_R, BLOCK_D], ACC)
    for d0 in range(0, D, BLOCK_D):
        cols, mask = _col_block(d0, D, row_mask, BLOCK_D)
        # Masked lanes load 0, where exp(lv) - 1 - lv + m^2 is exactly 0.
        mean = _load_tile(m_rows, cols, sm_d, mask, ACC)
        log_var = _load_tile(v_rows, cols, sv_d, mask, ACC)
        acc += _exp_minus_one_minus(log_var, ACC) + mean * mean
    _store_rows(out_ptr, rows, 0.5 * tl.sum(acc, axis=1), row_mask)


def _launch_rows(kernel: triton.JITFunction, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
    """Runs a row kernel over ``inputs`` ([P, Q, D] views, bar a leading [P, Q] grad) into ``out``;
    the kernel takes the inputs, ``out``, R = P * Q, Q, D and every input's strides."""
    P, Q, D = inputs[-1].shape
    if out.numel() == 0:
        return out
    acc = _acc_dtype(*inputs)
    block_r, block_d = _row_blocks(P * Q, D, acc)
    with _on_device(out):
        kernel[(triton.cdiv(P * Q, block_r),)](
            *inputs,
            out,
            P * Q,
            Q,
            D,
            *(stride for t in inputs for stride in t.stride()),
            ACC=acc,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
            num_warps=_num_warps(block_r * block_d),
        )
    return out


def bernoulli_log_prob_fwd(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_d x * l - softplus(l) over [P, Q, D] views -> [P, Q]; finite for logits of +-1e4.

    >>> logits = torch.zeros(2, 3, 4, device="cuda")
    >>> bernoulli_log_prob_fwd(logits, torch.ones(2, 1, 4, device="cuda").expand(2, 3, 4))
    tensor([[-2.7726, -2.7726, -2.7726],
            [-2.7726, -2.7726, -2.7726]], device='cuda:0')
    """
    out = torch.empty(logits.shape[:2], dtype=logits.dtype, device=logits.device)
    return _launch_rows(_bernoulli_log_prob_fwd_kernel, (logits, x), out)


def bernoulli_log_prob_bwd(grad: torch.Tensor, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gradient of `bernoulli_log_prob_fwd` with respect to the logits: grad [P, Q] times
    x - sigmoid(l) -> a contiguous [P, Q, D] tensor; no NaN for logits of +-1e4.

    >>> logits = torch.zeros(1, 2, 3, device="cuda")
    >>> bernoulli_log_prob_bwd(torch.ones(1, 2, device="cuda"), logits, torch.ones_like(logits))
    tensor([[[0.5000, 0.5000, 0.5000],
             [0.5000, 0.5000, 0.5000]]], device='cuda:0')
    """
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return _launch_rows(_bernoulli_log_prob_bwd_kernel, (grad, logits, x), out)


def gaussian_log_prob_fwd(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """sum_d log N(x; mean, exp(log_var)) over [P, Q, D] views -> [P, Q].

    >>> zeros = torch.zeros(1, 1, 2, device="cuda")
    >>> gaussian_log_prob_fwd(zeros, zeros, zeros)
    tensor([[-1.8379]], device='cuda:0')
    """
    out = torch.empty(x.shape[:2], dtype=x.dtype, device=x.device)
    return _launch_rows(_gaussian_log_prob_fwd_kernel, (x, mean, log_var), out)


def gaussian_kl_fwd(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)) summed over the last dim of [P, Q, D] views -> [P, Q].

    >>> gaussian_kl_fwd(torch.ones(1, 1, 10, device="cuda"), torch.zeros(1, 1, 10, device="cuda"))
    tensor([[5.]], device='cuda:0')
    """
    out = torch.empty(mean.shape[:2], dtype=mean.dtype, device=mean.device)
    return _launch_rows(_gaussian_kl_fwd_kernel, (mean, log_var), out)


# ---------------------------------------------------------------------------------------------
# Aggregate posterior: pairwise log q(z_i | x_j) reduced over j, never materialised as [B, N, d]


@triton.jit
def _posterior_tile(mean_ptr, log_var_ptr, j, k, mask, sm_n, sm_d, sv_n, sv_d, ACC: tl.constexpr):
    """mean, log_var and 1 / std [BJ, BK] of the posteriors j. Never 1 / var: it overflows for a
    tiny variance (log_var < -88 in float32), where 1 / std stays finite down to log_var = -176
    (below, the products with it go through `_times_unless_zero`)."""
    mean = _load_tile(mean_ptr + j * sm_n, k, sm_d, mask, ACC)
    log_var = _load_tile(log_var_ptr + j * sv_n, k, sv_d, mask, ACC)
    return mean, log_var, tl.exp(-0.5 * log_var)


@triton.jit
def _pairwise_distance(z, mean, inv_std):
    """([BI, BJ, BK] w = (z - mean) / std, |w| / sqrt(2)) for a [BI, BK] z tile and [BJ, BK]
    posterior tiles. With w, z = mean gives 0 where (z - mean)^2 / var would be 0 * inf for a tiny
    variance; |w| / sqrt(2) is the distance whose minimum over j is the op's `nearest`."""
    w = _times_unless_zero(z[:, None, :] - mean[None, :, :], inv_std[None, :, :])
    return w, tl.abs(w) * _SQRT_HALF


@triton.jit
def _nearest(z, mean_ptr, log_var_ptr, k, k_mask, N, sm_n, sm_d, sv_n, sv_d, ACC: tl.constexpr, BLOCK_J: tl.constexpr):
    """nearest[i, k] = min_j |z_ik - mean_jk| / sqrt(2 var_jk) [BI, BK], 0 where every one is inf:
    the shift of the terms (csrc/ops.cpp). A NaN among them is left to the terms, which it makes NaN."""
    nearest = tl.full([z.shape[0], z.shape[1]], float("inf"), ACC)
    for j0 in range(0, N, BLOCK_J):
        j = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
        j_mask = j < N
        mean, _, inv_std = _posterior_tile(
            mean_ptr, log_var_ptr, j, k, j_mask[:, None] & k_mask[None, :], sm_n, sm_d, sv_n, sv_d, ACC
        )
        _, distance = _pairwise_distance(z, mean, inv_std)
        nearest = tl.minimum(nearest, tl.min(tl.where(j_mask[None, :, None], distance, float("inf")), axis=1))
    return tl.where(nearest == float("inf"), 0.0, nearest)


@triton.jit
def _pairwise_log_density(z, mean, log_var, inv_std, nearest, ACC: tl.constexpr):
    """l[i, j, k] + nearest[i, k]^2, l = log N(z_ik; mean_jk, exp(log_var_jk)), for a [BI, BK] z
    tile and [BJ, BK] posterior tiles -> ([BI, BJ, BK] shifted terms, [BI, BJ, BK] w = (z - mean) / std).
    The square enters as (d - nearest)(d + nearest), d = |w| / sqrt(2): exactly 0 for the nearest
    posterior even where w^2 overflows; a variance of 0 away from its mean gives -inf."""
    w, distance = _pairwise_distance(z, mean, inv_std)
    excess = _times_unless_zero(distance - nearest[:, None, :], distance + nearest[:, None, :])
    log_var = log_var[None, :, :]
    density_zero = (log_var == float("-inf")) & (excess == float("inf"))
    log_2pi = tl.full([], _LOG_2PI, ACC)
    return tl.where(density_zero, float("-inf"), -0.5 * (log_2pi + log_var) - excess), w


@triton.jit
def _aggregate_posterior_fwd_kernel(
    z_ptr,
    mean_ptr,
    log_var_ptr,
    joint_ptr,
    marginal_ptr,
    nearest_ptr,
    B,
    N,
    d,
    sz_b,
    sz_d,
    sm_n,
    sm_d,
    sv_n,
    sv_d,
    ACC: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WITH_MARGINAL: tl.constexpr,
):
    i, i_mask = _row_block(B, BLOCK_I)
    k = tl.arange(0, BLOCK_K).to(tl.int64)
    k_mask = k < d
    z_mask = i_mask[:, None] & k_mask[None, :]
    z = _load_tile(z_ptr + i * sz_b, k, sz_d, z_mask, ACC)
    nearest = _nearest(z, mean_ptr, log_var_ptr, k, k_mask, N, sm_n, sm_d, sv_n, sv_d, ACC, BLOCK_J)
    _store_tile(nearest_ptr, i, k, d, nearest, z_mask)
    joint_max = tl.full([BLOCK_I], float("-inf"), ACC)
    joint_sum = tl.zeros([BLOCK_I], ACC)
    if WITH_MARGINAL:
        marginal_max = tl.full([BLOCK_I, BLOCK_K], float("-inf"), ACC)
        marginal_sum = tl.zeros([BLOCK_I, BLOCK_K], ACC)
    for j0 in range(0, N, BLOCK_J):
        j = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
        j_mask = j < N
        mean, log_var, inv_std = _posterior_tile(
            mean_ptr, log_var_ptr, j, k, j_mask[:, None] & k_mask[None, :], sm_n, sm_d, sv_n, sv_d, ACC
        )
        l, _ = _pairwise_log_density(z, mean, log_var, inv_std, nearest, ACC)

        # Online logsumexp over j; an all -inf prefix is shifted by 0 instead of -inf (which
        # would make exp(-inf - -inf) = NaN) and keeps a sum of exactly 0.
        joint_l = tl.where(j_mask[None, :], tl.sum(tl.where(k_mask[None, None, :], l, 0.0), axis=2), float("-inf"))
        new_max = tl.maximum(joint_max, tl.max(joint_l, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        joint_sum = joint_sum * tl.exp(joint_max - shift) + tl.sum(tl.exp(joint_l - shift[:, None]), axis=1)
        joint_max = new_max

        if WITH_MARGINAL:
            marginal_l = tl.where(j_mask[None, :, None], l, float("-inf"))
            new_max = tl.maximum(marginal_max, tl.max(marginal_l, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            marginal_sum = marginal_sum * tl.exp(marginal_max - shift) + tl.sum(
                tl.exp(marginal_l - shift[:, None, :]), axis=1
            )
            marginal_max = new_max
    # An all -inf row ends with max -inf and sum 0: -inf + log(0) = -inf, not NaN.
    _store_rows(joint_ptr, i, joint_max + tl.log(joint_sum), i_mask)
    if WITH_MARGINAL:
        _store_tile(marginal_ptr, i, k, d, marginal_max + tl.log(marginal_sum), z_mask)


@triton.jit
def _sample_tile(
    z_ptr,
    joint_ptr,
    marginal_ptr,
    nearest_ptr,
    grad_joint_ptr,
    grad_marginal_ptr,
    i,
    k,
    i_mask,
    ik_mask,
    sz_b,
    sz_d,
    sj_b,
    smg_b,
    smg_d,
    sgj_b,
    sgm_b,
    sgm_d,
    d,
    ACC: tl.constexpr,
    WITH_MARGINAL: tl.constexpr,
):
    """What the backward needs of the samples i: z, the saved log_joint, log_marginal and the
    (contiguous) nearest, and the incoming gradients."""
    z = _load_tile(z_ptr + i * sz_b, k, sz_d, ik_mask, ACC)
    nearest = _load_tile(nearest_ptr + i * d, k, 1, ik_mask, ACC)
    log_joint = _load_rows(joint_ptr + i * sj_b, i_mask, ACC)
    grad_joint = _load_rows(grad_joint_ptr + i * sgj_b, i_mask, ACC)
    if WITH_MARGINAL:
        log_marginal = _load_tile(marginal_ptr + i * smg_b, k, smg_d, ik_mask, ACC)
        grad_marginal = _load_tile(grad_marginal_ptr + i * sgm_b, k, sgm_d, ik_mask, ACC)
    else:
        # A joint-only forward saved a [B, 0] marginal: nothing to read, and `_pair_weights`
        # leaves these stand-ins unread.
        log_marginal = tl.zeros([1, 1], ACC)
        grad_marginal = tl.zeros([1, 1], ACC)
    return z, nearest, log_joint, log_marginal, grad_joint, grad_marginal


@triton.jit
def _pair_weights(
    z,
    nearest,
    mean,
    log_var,
    inv_std,
    log_joint,
    log_marginal,
    grad_joint,
    grad_marginal,
    pair_mask,
    k_mask,
    ACC: tl.constexpr,
    WITH_MARGINAL: tl.constexpr,
):
    """c[i, j, k] = grad_joint[i] a[i, j] + grad_marginal[i, k] b[i, j, k] and c w, w = (z - m) / std,
    with the softmax weights a and b set to 0 where their log-density is -inf (or the pair is a
    padding lane) rather than exp(-inf - -inf) = NaN when the whole row is -inf. Without the
    marginal there is no b term, and no exp per (i, j, k). The gradients take r = (z - m) / var
    as (c w) / std and r (z - m) as (c w) w: a zero weight then gives 0 even where w / std or w^2
    overflows for a tiny variance."""
    l, w = _pairwise_log_density(z, mean, log_var, inv_std, nearest, ACC)
    l = tl.where(k_mask[None, None, :], l, 0.0)
    joint_l = tl.sum(l, axis=2)
    a = tl.where(pair_mask & (joint_l != float("-inf")), tl.exp(joint_l - log_joint[:, None]), 0.0)
    c = grad_joint[:, None, None] * a[:, :, None]
    if WITH_MARGINAL:
        b = tl.where(pair_mask[:, :, None] & (l != float("-inf")), tl.exp(l - log_marginal[:, None, :]), 0.0)
        c += grad_marginal[:, None, :] * b
    return c, _times_unless_zero(c, w), w


@triton.jit
def _aggregate_posterior_bwd_z_kernel(
    grad_joint_ptr,
    grad_marginal_ptr,
    z_ptr,
    mean_ptr,
    log_var_ptr,
    joint_ptr,
    marginal_ptr,
    nearest_ptr,
    grad_z_ptr,
    B,
    N,
    d,
    sgj_b,
    sgm_b,
    sgm_d,
    sz_b,
    sz_d,
    sm_n,
    sm_d,
    sv_n,
    sv_d,
    sj_b,
    smg_b,
    smg_d,
    ACC: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WITH_MARGINAL: tl.constexpr,
):
    i, i_mask = _row_block(B, BLOCK_I)
    k = tl.arange(0, BLOCK_K).to(tl.int64)
    k_mask = k < d
    ik_mask = i_mask[:, None] & k_mask[None, :]
    z, nearest, log_joint, log_marginal, grad_joint, grad_marginal = _sample_tile(
        z_ptr,
        joint_ptr,
        marginal_ptr,
        nearest_ptr,
        grad_joint_ptr,
        grad_marginal_ptr,
        i,
        k,
        i_mask,
        ik_mask,
        sz_b,
        sz_d,
        sj_b,
        smg_b,
        smg_d,
        sgj_b,
        sgm_b,
        sgm_d,
        d,
        ACC,
        WITH_MARGINAL,
    )
    grad_z = tl.zeros([BLOCK_I, BLOCK_K], ACC)
    for j0 in range(0, N, BLOCK_J):
        j = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
        j_mask = j < N
        mean, log_var, inv_std = _posterior_tile(
            mean_ptr, log_var_ptr, j, k, j_mask[:, None] & k_mask[None, :], sm_n, sm_d, sv_n, sv_d, ACC
        )
        _, c_w, _ = _pair_weights(
            z,
            nearest,
            mean,
            log_var,
            inv_std,
            log_joint,
            log_marginal,
            grad_joint,
            grad_marginal,
            i_mask[:, None] & j_mask[None, :],
            k_mask,
            ACC,
            WITH_MARGINAL,
        )
        grad_z -= tl.sum(_times_unless_zero(c_w, inv_std[None, :, :]), axis=1)
    _store_tile(grad_z_ptr, i, k, d, grad_z, ik_mask)


@triton.jit
def _aggregate_posterior_bwd_posterior_kernel(
    grad_joint_ptr,
    grad_marginal_ptr,
    z_ptr,
    mean_ptr,
    log_var_ptr,
    joint_ptr,
    marginal_ptr,
    nearest_ptr,
    grad_mean_ptr,
    grad_log_var_ptr,
    B,
    N,
    d,
    sgj_b,
    sgm_b,
    sgm_d,
    sz_b,
    sz_d,
    sm_n,
    sm_d,
    sv_n,
    sv_d,
    sj_b,
    smg_b,
    smg_d,
    ACC: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WITH_MARGINAL: tl.constexpr,
):
    j, j_mask = _row_block(N, BLOCK_J)
    k = tl.arange(0, BLOCK_K).to(tl.int64)
    k_mask = k < d
    jk_mask = j_mask[:, None] & k_mask[None, :]
    mean, log_var, inv_std = _posterior_tile(mean_ptr, log_var_ptr, j, k, jk_mask, sm_n, sm_d, sv_n, sv_d, ACC)
    grad_mean = tl.zeros([BLOCK_J, BLOCK_K], ACC)
    grad_log_var = tl.zeros([BLOCK_J, BLOCK_K], ACC)
    for i0 in range(0, B, BLOCK_I):
        i = (i0 + tl.arange(0, BLOCK_I)).to(tl.int64)
        i_mask = i < B
        z, nearest, log_joint, log_marginal, grad_joint, grad_marginal = _sample_tile(
            z_ptr,
            joint_ptr,
            marginal_ptr,
            nearest_ptr,
            grad_joint_ptr,
            grad_marginal_ptr,
            i,
            k,
            i_mask,
            i_mask[:, None] & k_mask[None, :],
            sz_b,
            sz_d,
            sj_b,
            smg_b,
            smg_d,
            sgj_b,
            sgm_b,
            sgm_d,
            d,
            ACC,
            WITH_MARGINAL,
        )
        c, c_w, w = _pair_weights(
            z,
            nearest,
            mean,
            log_var,
            inv_std,
            log_joint,
            log_marginal,
            grad_joint,
            grad_marginal,
            i_mask[:, None] & j_mask[None, :],
            k_mask,
            ACC,
            WITH_MARGINAL,
        )
        grad_mean += tl.sum(_times_unless_zero(c_w, inv_std[None, :, :]), axis=0)
        grad_log_var += tl.sum(0.5 * (_times_unless_zero(c_w, w) - c), axis=0)
    _store_tile(grad_mean_ptr, j, k, d, grad_mean, jk_mask)
    _store_tile(grad_log_var_ptr, j, k, d, grad_log_var, jk_mask)


def _aggregate_posterior(
    z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor, with_marginal: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, d = z.shape
    N = mean.shape[0]
    joint = torch.empty(B, dtype=dtype, device=z.device)
    marginal = torch.empty((B, d if with_marginal else 0), dtype=dtype, device=z.device)
    nearest = torch.empty((B, d), dtype=dtype, device=z.device)
    if B == 0:
        return joint, marginal, nearest
    acc = _acc_dtype(z, mean, log_var)
    block_i, block_j, block_k = _pair_blocks(B, N, d, acc)
    with _on_device(z):
        _aggregate_posterior_fwd_kernel[(triton.cdiv(B, block_i),)](
            z,
            mean,
            log_var,
            joint,
            marginal,
            nearest,
            B,
            N,
            d,
            *z.stride(),
            *mean.stride(),
            *log_var.stride(),
            ACC=acc,
            BLOCK_I=block_i,
            BLOCK_J=block_j,
            BLOCK_K=block_k,
            WITH_MARGINAL=with_marginal,
            num_warps=_num_warps(block_i * block_j * block_k),
        )
    return joint, marginal, nearest


def aggregate_posterior_fwd(
    z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor, with_marginal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For z [B, d] and posteriors (mean, log_var) [N, d], with l[i, j, k] = log N(z_ik; mean_jk,
    exp(log_var_jk)) shifted by nearest[i, k]^2 (csrc/ops.cpp): joint[i] = logsumexp_j sum_k l [B],
    marginal[i, k] = logsumexp_j l [B, d] and nearest [B, d], streamed over j (no [B, N, d]
    tensor). The marginal takes an exp per (i, j, k), the joint one per (i, j): with
    ``with_marginal=False`` the marginal is skipped and comes back empty, [B, 0].

    >>> z = torch.zeros(2, 3, device="cuda")
    >>> joint, marginal, nearest = aggregate_posterior_fwd(z, z, z, with_marginal=False)  # log 2 + 3 log N(0; 0, 1)
    >>> joint, marginal.shape, nearest.abs().max().item()
    (tensor([-2.0637, -2.0637], device='cuda:0'), torch.Size([2, 0]), 0.0)
    """
    return _aggregate_posterior(z, mean, log_var, with_marginal, z.dtype)


def aggregate_posterior_bwd(
    grad_joint: torch.Tensor,
    grad_marginal: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    log_var: torch.Tensor,
    joint: torch.Tensor,
    marginal: torch.Tensor,
    nearest: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (grad_z [B, d], grad_mean [N, d], grad_log_var [N, d]) of `aggregate_posterior_fwd`
    given those of its outputs, recomputing l block by block from the saved joint, marginal and nearest
    (recomputed in float32 for float16/bfloat16 inputs, whose rounding the weights would magnify).
    A [B, 0] marginal and grad_marginal (a joint-only forward) leave out the marginal's term. One
    kernel reduces over j for grad_z, one over i for the posterior parameters, so no two programs
    write the same element.

    >>> z = torch.zeros(2, 3, device="cuda")
    >>> joint, marginal, nearest = aggregate_posterior_fwd(z, z, z, with_marginal=True)
    >>> grad_joint, grad_marginal = torch.ones_like(joint), torch.zeros_like(marginal)
    >>> grads = aggregate_posterior_bwd(grad_joint, grad_marginal, z, z, z, joint, marginal, nearest)
    >>> grads[2]  # two z_i, each with weight a = 1/2 on every j, times 0.5 * (r (z - m) - 1) = -0.5
    tensor([[-0.5000, -0.5000, -0.5000],
            [-0.5000, -0.5000, -0.5000]], device='cuda:0')
    """
    B, d = z.shape
    N = mean.shape[0]
    with_marginal = marginal.shape[1] > 0
    grad_z = torch.empty((B, d), dtype=z.dtype, device=z.device)
    grad_mean = torch.empty((N, d), dtype=mean.dtype, device=mean.device)
    grad_log_var = torch.empty((N, d), dtype=log_var.dtype, device=log_var.device)
    if z.dtype in (torch.float16, torch.bfloat16):
        # The weights exp(l - logsumexp) magnify the absolute rounding of a saved half-precision
        # logsumexp (0.06 at |joint| = 20 in bfloat16, a 6% error in every gradient); one extra
        # forward pass gives them in float32.
        joint, marginal, nearest = _aggregate_posterior(z, mean, log_var, with_marginal, torch.float32)
    tensors = (grad_joint, grad_marginal, z, mean, log_var, joint, marginal, nearest.contiguous())
    strides = (
        grad_joint.stride(0),
        *grad_marginal.stride(),
        *z.stride(),
        *mean.stride(),
        *log_var.stride(),
        joint.stride(0),
        *marginal.stride(),
    )
    acc = _acc_dtype(z, mean, log_var)
    with _on_device(z):
        if B > 0:
            block_i, block_j, block_k = _pair_blocks(B, N, d, acc)
            _aggregate_posterior_bwd_z_kernel[(triton.cdiv(B, block_i),)](
                *tensors,
                grad_z,
                B,
                N,
                d,
                *strides,
                ACC=acc,
                BLOCK_I=block_i,
                BLOCK_J=block_j,
                BLOCK_K=block_k,
                WITH_MARGINAL=with_marginal,
                num_warps=_num_warps(block_i * block_j * block_k),
            )
        if N > 0:
            block_j, block_i, block_k = _pair_blocks(N, B, d, acc)
            # At most 4 warps: at 8, ptxas (sm_90, half inputs, B256 d10) held 48 registers and
            # spilled; 4 warps keep the same tile in registers on sm_80 and sm_90.
            _aggregate_posterior_bwd_posterior_kernel[(triton.cdiv(N, block_j),)](
                *tensors,
                grad_mean,
                grad_log_var,
                B,
                N,
                d,
                *strides,
                ACC=acc,
                BLOCK_I=block_i,
                BLOCK_J=block_j,
                BLOCK_K=block_k,
                WITH_MARGINAL=with_marginal,
                num_warps=min(4, _num_warps(block_i * block_j * block_k)),
            )
    return grad_z, grad_mean, grad_log_var
