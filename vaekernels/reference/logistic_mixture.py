"""The PixelCNN++ discretised logistic mixture in plain PyTorch: the test oracle and the bench
baseline, written to be read. Same signatures as :mod:`vaekernels.ops.logistic_mixture`.

Layout of ``params`` [B, P, H, W] for M components (PixelCNN++, Salimans et al. 2017, in the
channel order of openai/pixel-cnn): the M mixture logits, then per colour channel c a block of
M means, M log-scales and, for 3 channels, M coefficients (tanh-squashed) that shift the
means of later channels by earlier channels' values. P = 10 M for 3 channels, 3 M for one.
Data ``x`` [B, C, H, W] lies in [-1, 1] on the 256-level grid (pixel / 127.5 - 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_SCALE_MIN = -7.0
HALF_BIN = 1.0 / 255.0
EDGE = 0.999
# The probability below which a bin's mass is taken as density times width (openai's 1e-5).
TINY_LOG_PROB = math.log(1e-5)
LOG_HALF_LEVELS = math.log(127.5)


def num_params(channels: int, num_mixtures: int) -> int:
    """P, the number of parameter channels of a mixture over ``channels`` colour channels."""
    return num_mixtures * (1 + 3 * channels) if channels == 3 else 3 * num_mixtures


def unpack(params: torch.Tensor, channels: int, num_mixtures: int):
    """logits [B, M, H, W] and means, raw log-scales, coefficients [B, C, M, H, W] (views)."""
    B, _, H, W = params.shape
    M = num_mixtures
    logits = params[:, :M]
    per_channel = params[:, M:].reshape(B, channels, -1, M, H, W)
    coeffs = per_channel[:, :, 2] if channels == 3 else None
    return logits, per_channel[:, :, 0], per_channel[:, :, 1], coeffs


def log_one_minus_exp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-d)) for d >= 0, accurate for small and large d (-inf at 0).

    Each branch sees only the values it is chosen for: log1p(-exp(-d)) at a tiny d (a log-scale
    past ~20 in float32) is -inf with an infinite derivative, which torch.where's backward would
    turn into 0 * inf = NaN in the gradient although the other branch's value is taken."""
    small = d < math.log(2)
    d_small = torch.where(small, d, math.log(2))
    d_large = torch.where(small, math.log(2), d)
    return torch.where(small, torch.log(-torch.expm1(-d_small)), torch.log1p(-torch.exp(-d_large)))


def bin_log_probs(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x | one logistic component) of each value ``x`` under the discretisation, elementwise.

    The bin of x is [x - 1/255, x + 1/255], widened to -inf at the lower edge (x = -1) and +inf
    at the upper edge (x = 1). Its mass sigma(p) - sigma(m) (p, m the standardised bin ends) is
    taken in the log domain as log sigma(p) + log sigma(-m) + log(1 - exp(m - p)), which has no
    cancellation in either tail. Where that mass is below 1e-5, the density at x times the bin
    width is used instead, as openai/pixel-cnn does.
    """
    log_scales = torch.clamp(log_scales, min=LOG_SCALE_MIN)
    inv_scale = torch.exp(-log_scales)
    centred = x - means
    plus = inv_scale * (centred + HALF_BIN)
    minus = inv_scale * (centred - HALF_BIN)
    mid = inv_scale * centred
    log_cdf_plus = F.logsigmoid(plus)
    log_survival_minus = F.logsigmoid(-minus)
    # Floored so that a vanishing width (log-scale past ~88) leaves a finite -69 (whose mass falls
    # to the density branch anyway) and no inf * 0 in the backward of the unselected branch.
    width = torch.clamp(2 * HALF_BIN * inv_scale, min=1e-30)
    log_mass = log_cdf_plus + log_survival_minus + log_one_minus_exp(width)
    log_density = mid - log_scales - 2 * F.softplus(mid) - LOG_HALF_LEVELS
    inner = torch.where(log_mass > TINY_LOG_PROB, log_mass, log_density)
    return torch.where(x < -EDGE, log_cdf_plus, torch.where(x > EDGE, log_survival_minus, inner))


def component_means(x: torch.Tensor, means: torch.Tensor, coeffs: torch.Tensor | None) -> torch.Tensor:
    """The channel-autoregressive means: green shifted by red, blue by red and green (x's values)."""
    if coeffs is None:
        return means
    coeffs = torch.tanh(coeffs)
    r, g = x[:, 0:1], x[:, 1:2]
    return torch.cat(
        [means[:, 0:1], means[:, 1:2] + coeffs[:, 0:1] * r, means[:, 2:3] + coeffs[:, 1:2] * r + coeffs[:, 2:3] * g],
        dim=1,
    )


def discretized_logistic_mixture_nll(
    params: torch.Tensor, x: torch.Tensor, num_mixtures: int, reduction: str = "sum"
) -> torch.Tensor:
    """-log p(x) per pixel (summed over channels), then reduced; see the fused op. float16 and
    bfloat16 are computed in float32 and rounded once at the end, as the kernels do: carried through
    in bfloat16, the log-domain bin masses drift by a quarter of the NLL."""
    if params.dtype in (torch.float16, torch.bfloat16):
        nll = discretized_logistic_mixture_nll(params.float(), x.float(), num_mixtures, reduction)
        return nll.to(params.dtype)
    channels = x.shape[1]
    logits, means, log_scales, coeffs = unpack(params, channels, num_mixtures)
    xs = x.unsqueeze(2)  # [B, C, 1, H, W] against the M components
    log_probs = bin_log_probs(xs, component_means(xs, means, coeffs), log_scales).sum(1)
    nll = -torch.logsumexp(torch.log_softmax(logits, dim=1) + log_probs, dim=1)
    return {"none": nll, "sum": nll.sum(), "mean": nll.sum((1, 2)).mean()}[reduction]


def discretized_logistic_mixture_sample(
    params: torch.Tensor,
    channels: int,
    num_mixtures: int,
    generator: torch.Generator | None = None,
    quantize: bool = True,
):
    """A draw x [B, C, H, W] in [-1, 1]: a component by the Gumbel-max trick, then each channel
    from its logistic (means shifted by the channels drawn before it), clamped to [-1, 1] and,
    with ``quantize``, rounded to the 256-level grid."""
    B, _, H, W = params.shape
    logits, means, log_scales, coeffs = unpack(params, channels, num_mixtures)
    uniform = torch.rand(logits.shape, generator=generator, device=params.device, dtype=params.dtype)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-5, 1 - 1e-5)))
    choice = (logits + gumbel).argmax(1, keepdim=True).unsqueeze(1).expand(B, channels, 1, H, W)

    def pick(t):
        return t.gather(2, choice).squeeze(2)

    mean, scale = pick(means), torch.exp(pick(log_scales).clamp(min=LOG_SCALE_MIN))
    u = torch.rand(mean.shape, generator=generator, device=params.device, dtype=params.dtype).clamp(1e-5, 1 - 1e-5)
    noise = mean + scale * (torch.log(u) - torch.log1p(-u))
    coeff = torch.tanh(pick(coeffs)) if coeffs is not None else None
    out = []
    for c in range(channels):
        value = noise[:, c]
        if c == 1:
            value = value + coeff[:, 0] * out[0]
        elif c == 2:
            value = value + coeff[:, 1] * out[0] + coeff[:, 2] * out[1]
        value = value.clamp(-1.0, 1.0)
        if quantize:
            value = torch.round((value + 1) * 127.5) / 127.5 - 1
        out.append(value)
    return torch.stack(out, 1)
