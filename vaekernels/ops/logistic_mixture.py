"""The PixelCNN++ discretised logistic mixture likelihood (Salimans et al. 2017), fused per pixel.

Custom op registration (fake + autograd) -> public function. Kernels: csrc/cpu/logistic_mixture.cpp
and vaekernels/triton/logistic_mixture.py; the readable oracle with the same signatures is
:mod:`vaekernels.reference.logistic_mixture` (layout of ``params`` in its docstring).
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import logistic_mixture as reference
from ._checks import check_choice, check_float, check_shape, fail
from ._registry import define_triton_op, register

REDUCTIONS = ("none", "mean", "sum")

if _backend.triton_available():
    from ..triton import logistic_mixture as _triton

    define_triton_op("discretized_logistic_mixture_nll", _triton.discretized_logistic_mixture_nll_fwd)
    define_triton_op("discretized_logistic_mixture_nll_backward", _triton.discretized_logistic_mixture_nll_bwd)


def _nll_fake(params, x, num_mixtures):
    return params.new_empty((params.shape[0], params.shape[2], params.shape[3]))


def _nll_backward_fake(grad, params, x, nll, num_mixtures):
    return params.new_empty(params.shape)


def _save_for_backward(ctx, inputs, output):
    params, x, num_mixtures = inputs
    ctx.num_mixtures = num_mixtures
    ctx.save_for_backward(params, x, output)


def _make_nll_backward(ops):
    def backward(ctx, grad):
        params, x, nll = ctx.saved_tensors
        grad_params = ops.discretized_logistic_mixture_nll_backward(grad, params, x, nll, ctx.num_mixtures)
        # x is data on the 256-level grid: the likelihood is piecewise in it, and has no gradient there.
        return grad_params, None, None

    return backward


register("discretized_logistic_mixture_nll", _nll_fake, _save_for_backward, _make_nll_backward)
register("discretized_logistic_mixture_nll_backward", _nll_backward_fake)


def _check_mixture(fn: str, params, channels: int, num_mixtures) -> None:
    check_float(fn, "params", params)
    if params.dim() != 4:
        fail(fn, f"params must have shape [B, P, H, W], got {list(params.shape)}")
    if isinstance(num_mixtures, bool) or not isinstance(num_mixtures, int) or num_mixtures < 1:
        fail(fn, f"num_mixtures must be an int >= 1, got {num_mixtures!r}")
    if channels not in (1, 3):
        fail(fn, f"the data must have 1 or 3 channels, got {channels}")
    expected = reference.num_params(channels, num_mixtures)
    if params.shape[1] != expected:
        layout = "10 * num_mixtures" if channels == 3 else "3 * num_mixtures"
        fail(
            fn,
            f"params must have P = {layout} = {expected} channels for {channels}-channel data and "
            f"num_mixtures={num_mixtures}, got {params.shape[1]}",
        )


def discretized_logistic_mixture_nll(
    params: torch.Tensor, x: torch.Tensor, num_mixtures: int, reduction: str = "sum"
) -> torch.Tensor:
    """-log p(x) under the PixelCNN++ discretised mixture of logistics, in nats.

    Args:
        params: [B, P, H, W] network output: M mixture logits, then per colour channel M means,
            M log-scales (clamped below at -7) and, for 3 channels, M coefficients whose tanh
            shifts green's means by red and blue's by red and green (openai/pixel-cnn's order;
            P = 10 M for 3 channels, 3 M for 1).
        x: [B, C, H, W] data in [-1, 1] on the 256-level grid (pixel / 127.5 - 1), C = 1 or 3.
            x is data: no gradient flows to it.
        num_mixtures: M.
        reduction: ``"none"`` (the per-pixel NLL [B, H, W], summed over channels), ``"sum"``
            (over everything, as openai/pixel-cnn's loss) or ``"mean"`` (per-image NLL, averaged
            over the batch). Bits per dim: the sum / (B * C * H * W * log 2).

    Values 0 and 255 take the logistic tails (-inf, x + 1/255] and [x - 1/255, +inf); other bins
    have their mass computed in the log domain, without the cancellation of sigmoid(p) -
    sigmoid(m); a bin of mass below 1e-5 takes the density at its centre times its width, as
    in openai/pixel-cnn. Each pixel's whole mixture is computed in registers: nothing of size
    B*C*M*H*W is written, and backward keeps only ``params``, ``x`` and the [B, H, W] result. A
    NaN among a pixel's parameters makes that pixel's NLL NaN and its gradient NaN wherever
    autograd through the reference has it (a NaN log-scale's own gradient is 0, as torch.clamp's);
    the other pixels are unaffected. A component that gives the pixel no mass (a log-scale of
    +inf, a logit of -inf) weighs 0, with a zero gradient; a pixel no component gives mass to has
    NLL +inf (and a non-finite gradient). The logits are normalised (log pi = logit - log sum exp
    logits) before a component's log-probability is added, so a logit of 1e30 gives its
    component weight 1 and the NLL that component's, not 1e30 - 1e30 = 0; a logit of +inf has no
    normalisation (inf - inf): NaN. float16 and bfloat16 are computed in float32.

    Example:
        >>> import torch, vaekernels
        >>> params = torch.zeros(2, 30, 4, 4)  # M = 3 components over RGB
        >>> x = torch.zeros(2, 3, 4, 4)
        >>> vaekernels.discretized_logistic_mixture_nll(params, x, 3, reduction="none").shape
        torch.Size([2, 4, 4])
    """
    fn = "discretized_logistic_mixture_nll"
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    check_float(fn, "x", x)
    if x.dim() != 4:
        fail(fn, f"x must have shape [B, C, H, W], got {list(x.shape)}")
    _check_mixture(fn, params, x.shape[1], num_mixtures)
    check_float(fn, "x", x, params, "params")
    B, _, H, W = params.shape
    check_shape(fn, "x", x, (B, x.shape[1], H, W), "[B, C, H, W] with params' B, H, W")
    if B == 0:
        fail(fn, "params must have a non-empty batch (B >= 1), got B = 0")
    backend = _backend.choose(fn, params.device, params.dtype)
    if backend == "reference":
        return reference.discretized_logistic_mixture_nll(params, x, num_mixtures, reduction)
    nll = _backend.ops(backend).discretized_logistic_mixture_nll(params.contiguous(), x.contiguous(), num_mixtures)
    return {"none": nll, "sum": nll.sum(), "mean": nll.sum((1, 2)).mean()}[reduction]


def discretized_logistic_mixture_sample(
    params: torch.Tensor,
    channels: int,
    num_mixtures: int,
    generator: torch.Generator | None = None,
    quantize: bool = True,
) -> torch.Tensor:
    """A draw x [B, C, H, W] in [-1, 1] from the mixture of :func:`discretized_logistic_mixture_nll`.

    A component per pixel by the Gumbel-max trick, then each channel from its logistic, with the
    means of later channels shifted by the values drawn before them; clamped to [-1, 1] and,
    with ``quantize``, rounded to the 256-level grid. (A few elementwise PyTorch ops: sampling
    runs once per pixel of an autoregressive model, its cost is the network's.) NaN parameters
    give NaN values in the pixels they reach; infinite means and scales are clamped to [-1, 1].

    Example:
        >>> import torch, vaekernels
        >>> x = vaekernels.discretized_logistic_mixture_sample(torch.zeros(2, 30, 4, 4), 3, 3)
        >>> x.shape, bool(x.abs().max() <= 1)
        (torch.Size([2, 3, 4, 4]), True)
    """
    fn = "discretized_logistic_mixture_sample"
    _check_mixture(fn, params, channels, num_mixtures)
    if 0 in params.shape:
        fail(fn, f"params must have non-empty dims (B, P, H, W >= 1), got shape {list(params.shape)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        fail(fn, f"generator must be a torch.Generator or None, got {type(generator).__name__}", TypeError)
    return reference.discretized_logistic_mixture_sample(params, channels, num_mixtures, generator, quantize)
