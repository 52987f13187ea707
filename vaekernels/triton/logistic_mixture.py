"""Triton kernels of the PixelCNN++ discretised logistic mixture, and their launchers.

A program takes a block of pixels of one image; for each of them the whole mixture (every
component, every colour channel) is evaluated in registers, with a running log-sum-exp over the
components, so nothing of size B*C*M*H*W is written. The backward recomputes each pixel's
terms from the inputs and the forward's per-pixel NLL. Formula and branches:
:func:`vaekernels.reference.logistic_mixture.bin_log_probs`. Loads in the input dtype, computes
in float32 (float64 for float64), 64-bit offsets.
"""

import torch
import triton
import triton.language as tl

from .iwae import _acc_dtype, _on_device

_BLOCK = 128
_EDGE = tl.constexpr(0.999)
_TINY_LOG_PROB = tl.constexpr(-11.512925464970229)  # log(1e-5)
_MIN_WIDTH = tl.constexpr(1e-30)
_LOG_SCALE_MIN = tl.constexpr(-7.0)


@triton.jit
def _log1p(e):
    """log(1 + e) for e >= 0, accurate when 1 + e rounds to 1 (Goldberg's correction)."""
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))


@triton.jit
def _expm1(d):
    """exp(d) - 1 for d >= 0, accurate for small d."""
    u = tl.exp(d)
    return tl.where(u == 1.0, d, (u - 1.0) * (d / tl.log(u)))


@triton.jit
def _log_sigmoid(y):
    """log sigmoid(y), and exp(-|y|) for the sigmoids of the backward."""
    e = tl.exp(-tl.abs(y))
    return tl.minimum(y, 0.0) - _log1p(e), e


@triton.jit
def _tanh(a):
    e = tl.exp(-2.0 * tl.abs(a))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(a < 0, -t, t)


@triton.jit
def _bin_term(x, centred, log_scale, HALF_BIN, LOG_HALF_LEVELS):
    """log P(x) under one logistic component and its derivatives in the centred value and the
    clamped log-scale (the compiler drops the derivatives where the forward ignores them)."""
    inv_scale = tl.exp(-log_scale)
    plus = inv_scale * (centred + HALF_BIN)
    minus = inv_scale * (centred - HALF_BIN)
    mid = inv_scale * centred
    log_cdf_plus, e_plus = _log_sigmoid(plus)
    log_survival_minus, e_minus = _log_sigmoid(-minus)
    width = tl.maximum(2.0 * HALF_BIN * inv_scale, _MIN_WIDTH)
    expm1_width = _expm1(width)
    log_mass = log_cdf_plus + log_survival_minus + tl.log(expm1_width) - width
    e_mid = tl.exp(-tl.abs(mid))
    log_density = mid - log_scale - 2.0 * (tl.maximum(mid, 0.0) + _log1p(e_mid)) - LOG_HALF_LEVELS
    use_mass = log_mass > _TINY_LOG_PROB
    lower = x < -_EDGE
    upper = x > _EDGE
    log_prob = tl.where(
        lower, log_cdf_plus, tl.where(upper, log_survival_minus, tl.where(use_mass, log_mass, log_density))
    )
    sig_neg_plus = tl.where(plus > 0, e_plus / (1.0 + e_plus), 1.0 / (1.0 + e_plus))
    sig_minus = tl.where(minus > 0, 1.0 / (1.0 + e_minus), e_minus / (1.0 + e_minus))
    slope = (1.0 - e_mid) / (1.0 + e_mid)
    density_slope = tl.where(mid > 0, -slope, slope)  # 1 - 2 sigmoid(mid)
    d_centred = tl.where(use_mass, inv_scale * (sig_neg_plus - sig_minus), inv_scale * density_slope)
    d_log_scale = tl.where(
        use_mass, -(plus * sig_neg_plus - minus * sig_minus + width / expm1_width), -mid * density_slope - 1.0
    )
    d_centred = tl.where(lower, inv_scale * sig_neg_plus, tl.where(upper, -inv_scale * sig_minus, d_centred))
    d_log_scale = tl.where(lower, -plus * sig_neg_plus, tl.where(upper, minus * sig_minus, d_log_scale))
    return log_prob, d_centred, d_log_scale


@triton.jit
def _channel(pb, HW, M, base, m, x, mean_shift, mask, ACC: tl.constexpr, HALF_BIN, LOG_HALF_LEVELS):
    """Channel c's term of component m; base = M + c * (per-channel block) indexes its means."""
    mean = tl.load(pb + (base + m) * HW, mask=mask, other=0.0).to(ACC) + mean_shift
    raw = tl.load(pb + (base + M + m) * HW, mask=mask, other=0.0).to(ACC)
    # A NaN log-scale stays NaN through the clamp, as in torch.clamp (tl.maximum drops it).
    log_scale = tl.maximum(raw, _LOG_SCALE_MIN, propagate_nan=tl.PropagateNan.ALL)
    log_prob, d_centred, d_log_scale = _bin_term(x, x - mean, log_scale, HALF_BIN, LOG_HALF_LEVELS)
    # The clamp passes the gradient where the raw log-scale is at or above -7.
    return log_prob, d_centred, tl.where(raw >= _LOG_SCALE_MIN, d_log_scale, 0.0)


@triton.jit
def _component(pb, HW, M, m, x0, x1, x2, mask, C: tl.constexpr, ACC: tl.constexpr, HALF_BIN, LOG_HALF_LEVELS):
    """The summed log-probability of component m over the channels, each channel's derivatives,
    and tanh of the three coefficients (zeros for one channel)."""
    block = 3 * M if C == 3 else 2 * M
    t0 = tl.zeros_like(x0)
    t1 = tl.zeros_like(x0)
    t2 = tl.zeros_like(x0)
    if C == 3:
        t0 = _tanh(tl.load(pb + (M + 2 * M + m) * HW, mask=mask, other=0.0).to(ACC))
        t1 = _tanh(tl.load(pb + (M + block + 2 * M + m) * HW, mask=mask, other=0.0).to(ACC))
        t2 = _tanh(tl.load(pb + (M + 2 * block + 2 * M + m) * HW, mask=mask, other=0.0).to(ACC))
    lp, du0, dl0 = _channel(pb, HW, M, M, m, x0, 0.0, mask, ACC, HALF_BIN, LOG_HALF_LEVELS)
    du1 = tl.zeros_like(x0)
    dl1 = tl.zeros_like(x0)
    du2 = tl.zeros_like(x0)
    dl2 = tl.zeros_like(x0)
    if C == 3:
        lp1, du1, dl1 = _channel(pb, HW, M, M + block, m, x1, t0 * x0, mask, ACC, HALF_BIN, LOG_HALF_LEVELS)
        lp2, du2, dl2 = _channel(
            pb, HW, M, M + 2 * block, m, x2, t1 * x0 + t2 * x1, mask, ACC, HALF_BIN, LOG_HALF_LEVELS
        )
        lp = lp + lp1 + lp2
    return lp, du0, dl0, du1, dl1, du2, dl2, t0, t1, t2


@triton.jit
def _pixels(p_ptr, x_ptr, HW, P, C: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """This program's pixels: their offsets, mask, parameter base pointers and the data."""
    b = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = pix < HW
    xb = x_ptr + b * C * HW + pix
    x0 = tl.load(xb, mask=mask, other=0.0).to(ACC)
    x1 = x0
    x2 = x0
    if C == 3:
        x1 = tl.load(xb + HW, mask=mask, other=0.0).to(ACC)
        x2 = tl.load(xb + 2 * HW, mask=mask, other=0.0).to(ACC)
    return b, pix, mask, p_ptr + b * P * HW + pix, x0, x1, x2


@triton.jit
def _constants(ACC: tl.constexpr):
    # Made in the compute dtype: a float literal is a float32 constant, 1e-8 off in float64.
    half_bin = 1.0 / tl.full([], 255.0, ACC)
    log_half_levels = tl.log(tl.full([], 127.5, ACC))
    return half_bin, log_half_levels


@triton.jit
def _log_sum_exp_step(top, total, value):
    """One more value in a running log-sum-exp (top, total): the sum is total * exp(top). While
    every value is -inf (all components give the pixel zero mass, as a log-scale of +inf does)
    the shift is 0, not -inf, whose exp(-inf - -inf) would be NaN; the sum stays 0."""
    new_top = tl.maximum(top, value)
    shift = tl.where(new_top == float("-inf"), 0.0, new_top)
    return new_top, total * tl.exp(top - shift) + tl.exp(value - shift)


@triton.jit
def _log_scale_grad(pb, offset, gr, d_log_scale, mask, ACC: tl.constexpr):
    """-gr d_log_scale where the raw log-scale at pb + offset is at or above the clamp's -7, else 0
    (as torch.clamp's backward, also where gr is NaN, or the raw log-scale is)."""
    raw = tl.load(pb + offset, mask=mask, other=0.0).to(ACC)
    return tl.where(raw >= _LOG_SCALE_MIN, -gr * d_log_scale, 0.0)


@triton.jit
def _log_norm(pb, HW, M, mask, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """log sum_m exp(logit_m) of the program's pixels."""
    top = tl.load(pb, mask=mask, other=0.0).to(ACC)
    total = tl.full([BLOCK], 1.0, ACC)
    for m in range(1, M):
        logit = tl.load(pb + m * HW, mask=mask, other=0.0).to(ACC)
        top, total = _log_sum_exp_step(top, total, logit)
    return top + tl.log(total)


@triton.jit
def _discretized_logistic_mixture_nll_fwd_kernel(
    p_ptr,
    x_ptr,
    out_ptr,
    HW,
    M,
    P,
    C: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    half_bin, log_half_levels = _constants(ACC)
    b, pix, mask, pb, x0, x1, x2 = _pixels(p_ptr, x_ptr, HW, P, C, ACC, BLOCK)
    # The logits' max first, so that each component adds its log-probability to logit_m - max
    # (<= 0): logit_m + log p_m(x) would lose log p_m(x) to a logit of 1e30. Then running sums of
    # exp(logit_m - max) and of the joint terms (a log-sum-exp started from component 0, so that
    # no -inf - -inf arises): nll = log sum exp(logit - max) - log sum exp(logit - max + log p).
    top = tl.load(pb, mask=mask, other=0.0).to(ACC)
    for m in range(1, M):
        top = tl.maximum(top, tl.load(pb + m * HW, mask=mask, other=0.0).to(ACC))
    logit = tl.load(pb, mask=mask, other=0.0).to(ACC) - top
    sum_norm = tl.exp(logit)
    top_joint = logit + _component(pb, HW, M, 0, x0, x1, x2, mask, C, ACC, half_bin, log_half_levels)[0]
    sum_joint = tl.full([BLOCK], 1.0, ACC)
    for m in range(1, M):
        logit = tl.load(pb + m * HW, mask=mask, other=0.0).to(ACC) - top
        sum_norm += tl.exp(logit)
        joint = logit + _component(pb, HW, M, m, x0, x1, x2, mask, C, ACC, half_bin, log_half_levels)[0]
        top_joint, sum_joint = _log_sum_exp_step(top_joint, sum_joint, joint)
    nll = tl.log(sum_norm) - (top_joint + tl.log(sum_joint))
    tl.store(out_ptr + b * HW + pix, nll.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _discretized_logistic_mixture_nll_bwd_kernel(
    grad_ptr,
    p_ptr,
    x_ptr,
    nll_ptr,
    gp_ptr,
    HW,
    M,
    P,
    C: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    half_bin, log_half_levels = _constants(ACC)
    b, pix, mask, pb, x0, x1, x2 = _pixels(p_ptr, x_ptr, HW, P, C, ACC, BLOCK)
    gb = gp_ptr + b * P * HW + pix
    log_norm = _log_norm(pb, HW, M, mask, ACC, BLOCK)
    g = tl.load(grad_ptr + b * HW + pix, mask=mask, other=0.0).to(ACC)
    # The forward's NLL, -log sum_m pi_m p_m(x).
    nll = tl.load(nll_ptr + b * HW + pix, mask=mask, other=0.0).to(ACC)
    block = 3 * M if C == 3 else 2 * M
    for m in range(0, M):
        logit = tl.load(pb + m * HW, mask=mask, other=0.0).to(ACC)
        lp, du0, dl0, du1, dl1, du2, dl2, t0, t1, t2 = _component(
            pb, HW, M, m, x0, x1, x2, mask, C, ACC, half_bin, log_half_levels
        )
        # d nll / d logit_m = pi_m - r_m; d nll / d log p_cm(x) = -r_m (r: the posterior of m).
        # log pi_m first, as in the forward (a logit of 1e30 would swallow lp).
        log_pi = logit - log_norm
        r = tl.exp(log_pi + lp + nll)
        ty = gp_ptr.dtype.element_ty
        tl.store(gb + m * HW, (g * (tl.exp(log_pi) - r)).to(ty), mask=mask)
        gr = g * r
        tl.store(gb + (M + m) * HW, (gr * du0).to(ty), mask=mask)
        tl.store(gb + (2 * M + m) * HW, _log_scale_grad(pb, (2 * M + m) * HW, gr, dl0, mask, ACC).to(ty), mask=mask)
        if C == 3:
            tl.store(gb + (M + block + m) * HW, (gr * du1).to(ty), mask=mask)
            idx1 = (2 * M + block + m) * HW
            tl.store(gb + idx1, _log_scale_grad(pb, idx1, gr, dl1, mask, ACC).to(ty), mask=mask)
            tl.store(gb + (M + 2 * block + m) * HW, (gr * du2).to(ty), mask=mask)
            idx2 = (2 * M + 2 * block + m) * HW
            tl.store(gb + idx2, _log_scale_grad(pb, idx2, gr, dl2, mask, ACC).to(ty), mask=mask)
            tl.store(gb + (3 * M + m) * HW, (gr * du1 * x0 * (1.0 - t0 * t0)).to(ty), mask=mask)
            tl.store(gb + (3 * M + block + m) * HW, (gr * du2 * x0 * (1.0 - t1 * t1)).to(ty), mask=mask)
            tl.store(gb + (3 * M + 2 * block + m) * HW, (gr * du2 * x1 * (1.0 - t2 * t2)).to(ty), mask=mask)


def _grid(params: torch.Tensor):
    B, _, H, W = params.shape
    return (triton.cdiv(H * W, _BLOCK), B)


def discretized_logistic_mixture_nll_fwd(params: torch.Tensor, x: torch.Tensor, num_mixtures: int) -> torch.Tensor:
    """The per-pixel NLL [B, H, W] of x [B, C, H, W] (C = 1 or 3) under the mixture params [B, P, H, W]."""
    params, x = params.contiguous(), x.contiguous()
    B, P, H, W = params.shape
    nll = torch.empty((B, H, W), dtype=params.dtype, device=params.device)
    if nll.numel() == 0:
        return nll
    with _on_device(params):
        _discretized_logistic_mixture_nll_fwd_kernel[_grid(params)](
            params, x, nll, H * W, num_mixtures, P, C=x.shape[1], ACC=_acc_dtype(params), BLOCK=_BLOCK
        )
    return nll


def discretized_logistic_mixture_nll_bwd(
    grad: torch.Tensor, params: torch.Tensor, x: torch.Tensor, nll: torch.Tensor, num_mixtures: int
) -> torch.Tensor:
    """The gradient [B, P, H, W] of sum(grad * nll) with respect to params, recomputed per pixel."""
    params, x, grad, nll = params.contiguous(), x.contiguous(), grad.contiguous(), nll.contiguous()
    B, P, H, W = params.shape
    grad_params = torch.empty_like(params)
    if grad_params.numel() == 0:
        return grad_params
    with _on_device(params):
        _discretized_logistic_mixture_nll_bwd_kernel[_grid(params)](
            grad,
            params,
            x,
            nll,
            grad_params,
            H * W,
            num_mixtures,
            P,
            C=x.shape[1],
            ACC=_acc_dtype(params),
            BLOCK=_BLOCK,
        )
    return grad_params
