"""The decoder's output layer fused into the Bernoulli likelihood and the bound.

An MLP decoder ends in ``logits = h W^T + b`` [B, K, D], which the bound reads once and its
backward once more, and which autograd keeps alive between them. Here the logits are made a chunk
of rows at a time (a few examples' K samples together, small enough to stay in cache), reduced to
log p(x | z) and the bound at once, and, when gradients are wanted, turned into the gradient of
the chunk's logits and multiplied into d(h), d(W) and d(b) before the next chunk: the [B, K, D]
logits never exist and nothing of that size is kept for backward. Liger-Kernel's fused
linear cross-entropy does the same for language models. The gradient is computed in the forward
pass for a bound whose examples all get the same gradient (a mean or a sum, as training does); any
other upstream gradient recomputes the chunks in the backward. (That choice reads two booleans in
the backward: a wait for the device on CUDA.)

The chunk loop runs the family's fused row kernels (``bernoulli_log_prob``, ``log_mean_exp`` and
their backwards) and the BLAS matrix products, on the C++ kernels for CPU tensors and the Triton
ones for CUDA tensors. The readable twin is :mod:`vaekernels.reference.linear_iwae`.
"""

from __future__ import annotations

import functools
import math

import torch

from .. import _backend
from ..reference import linear_iwae as reference
from ._checks import check_choice, check_float, check_shape, fail
from ._registry import define_triton_op, register
from .iwae import ESTIMATORS, REDUCTIONS, _checked_log_qz, _estimated

# Logit elements made at once: 1 MiB in float32, which stays in a core's L2 cache.
CHUNK_ELEMENTS = 1 << 18


def _chunk_examples(chunk_rows: int, samples: int) -> int:
    return max(1, chunk_rows // samples)


def _chunks(batch: int, samples: int, chunk_rows: int):
    """(first example, examples) of each chunk: whole examples, so a chunk holds all K of each."""
    step = _chunk_examples(chunk_rows, samples)
    return [(start, min(step, batch - start)) for start in range(0, batch, step)]


def _chunk_logits(buffer, flat_h, weight, bias, start, count, samples):
    """logits of examples [start, start + count) into ``buffer``, viewed [count, K, D]."""
    rows = flat_h[start * samples : (start + count) * samples]
    logits = buffer[: rows.shape[0]]
    if bias is None:
        torch.mm(rows, weight.t(), out=logits)
    else:
        torch.addmm(bias, rows, weight.t(), out=logits)
    return rows, logits.view(count, samples, -1)


def _accumulate_grads(ops, coefficients, logits, x_rows, rows, weight, grad_h_rows, grad_weight, grad_bias, first):
    """d(logits) = coefficients * (x - sigmoid(logits)) for one chunk, multiplied into d(h), d(W), d(b).
    d(W) and d(b) sum over the chunks in their own dtype: float32 at least (see :func:`_sum_buffer`);
    the ``first`` chunk writes them (their buffers are not zeroed first), the others add to them."""
    grad_logits = ops.bernoulli_log_prob_backward(coefficients, logits, x_rows).view(rows.shape[0], -1)
    torch.mm(grad_logits, weight, out=grad_h_rows)
    if grad_weight.dtype != rows.dtype:  # a float32 sum of half-precision products
        product = torch.mm(grad_logits.t(), rows)
        if first:
            grad_weight.copy_(product)
        else:
            grad_weight.add_(product)
    elif first:
        torch.mm(grad_logits.t(), rows, out=grad_weight)
    else:
        grad_weight.addmm_(grad_logits.t(), rows)
    if grad_bias.numel():
        if first:
            torch.sum(grad_logits, 0, dtype=grad_bias.dtype, out=grad_bias)
        else:
            grad_bias.add_(grad_logits.sum(0, dtype=grad_bias.dtype))


def _sum_buffer(like: torch.Tensor) -> torch.Tensor:
    """An unwritten tensor shaped like ``like`` to sum chunks into: float32 for half-precision parameters."""
    return torch.empty_like(like, dtype=torch.promote_types(like.dtype, torch.float32))


def _forward(ops, h, weight, bias, x, log_ratio, elbo: bool, with_grads: bool, chunk_rows: int):
    B, K, H = h.shape
    D = weight.shape[0]
    flat_h = h.reshape(B * K, H)
    bound, log_px, weights = h.new_empty(B), h.new_empty(B, K), h.new_empty(B, K)
    # Outputs never alias one another: each unused gradient is an empty tensor of its own.
    grad_h = h.new_empty(B * K, H) if with_grads else h.new_empty(0)
    grad_weight = _sum_buffer(weight) if with_grads else h.new_empty(0)
    grad_bias = _sum_buffer(bias) if with_grads and bias is not None else h.new_empty(0)
    buffer = h.new_empty(min(_chunk_examples(chunk_rows, K), B) * K, D)
    for start, count in _chunks(B, K, chunk_rows):
        rows, logits = _chunk_logits(buffer, flat_h, weight, bias, start, count, K)
        x_rows = x[start : start + count].unsqueeze(1).expand(count, K, D)
        chunk_log_px = ops.bernoulli_log_prob(logits, x_rows)
        log_px[start : start + count] = chunk_log_px
        log_w = chunk_log_px + log_ratio[start : start + count]
        if elbo:
            bound[start : start + count] = log_w.mean(1)
            chunk_weights = torch.full_like(log_w, 1 / K)
        else:
            chunk_bound = ops.log_mean_exp(log_w)
            bound[start : start + count] = chunk_bound
            # The softmax over K, 0 on an example whose weights are all zero.
            chunk_weights = ops.log_mean_exp_backward(torch.ones_like(chunk_bound), log_w, chunk_bound)
        weights[start : start + count] = chunk_weights
        if with_grads:
            _accumulate_grads(
                ops,
                chunk_weights,
                logits,
                x_rows,
                rows,
                weight,
                grad_h[start * K : (start + count) * K],
                grad_weight,
                grad_bias,
                start == 0,
            )
    return (
        bound,
        log_px,
        weights,
        grad_h.view(B, K, H) if with_grads else grad_h,
        grad_weight.to(weight.dtype),
        grad_bias.to(h.dtype),
    )


def _backward(
    ops, grad_bound, grad_log_px, h, weight, bias, x, weights, grad_h, grad_weight, grad_bias, chunk_rows: int
):
    B, K, H = h.shape
    grad_ratio = weights * grad_bound.unsqueeze(1)
    # Each example's gradient is its forward one times its grad_bound, and the weight's and bias's
    # sums over examples are the forward's times a grad_bound shared by all (where the forward made
    # them: an empty grad_h says it did not).
    if grad_h.numel() and not bool(grad_log_px.any()) and bool((grad_bound == grad_bound[0]).all()):
        shared = grad_bound[0]
        return (
            grad_h * grad_bound.view(B, 1, 1),
            grad_weight * shared,
            grad_bias * shared if bias is not None else h.new_empty(0),
            grad_ratio,
        )
    coefficients = grad_ratio + grad_log_px  # what reaches log p(x | z_k)
    flat_h = h.reshape(B * K, H)
    new_grad_h = torch.empty_like(flat_h)
    new_grad_weight = _sum_buffer(weight)
    new_grad_bias = _sum_buffer(bias) if bias is not None else h.new_empty(0)
    buffer = h.new_empty(min(_chunk_examples(chunk_rows, K), B) * K, weight.shape[0])
    for start, count in _chunks(B, K, chunk_rows):
        rows, logits = _chunk_logits(buffer, flat_h, weight, bias, start, count, K)
        x_rows = x[start : start + count].unsqueeze(1).expand(count, K, weight.shape[0])
        _accumulate_grads(
            ops,
            coefficients[start : start + count].contiguous(),
            logits,
            x_rows,
            rows,
            weight,
            new_grad_h[start * K : (start + count) * K],
            new_grad_weight,
            new_grad_bias,
            start == 0,
        )
    return new_grad_h.view(B, K, H), new_grad_weight.to(weight.dtype), new_grad_bias.to(h.dtype), grad_ratio


# ----------------------------------------------------------------------------- registration


def _fake(h, weight, bias, x, log_ratio, elbo, with_grads, chunk_rows):
    B, K, H = h.shape
    D = weight.shape[0]
    return (
        h.new_empty(B),
        h.new_empty(B, K),
        h.new_empty(B, K),
        h.new_empty((B, K, H) if with_grads else (0,)),
        h.new_empty((D, H) if with_grads else (0,)),
        h.new_empty(D if with_grads and bias is not None else 0),
    )


def _backward_fake(grad_bound, grad_log_px, h, weight, bias, x, weights, grad_h, grad_weight, grad_bias, chunk_rows):
    return (
        h.new_empty(h.shape),
        weight.new_empty(weight.shape),
        h.new_empty(bias.shape if bias is not None else 0),
        weights.new_empty(weights.shape),
    )


def _setup_context(ctx, inputs, output):
    h, weight, bias, x, _, _, _, chunk_rows = inputs
    ctx.chunk_rows, ctx.has_bias = chunk_rows, bias is not None
    ctx.save_for_backward(h, weight, bias if bias is not None else h.new_empty(0), x, *output[2:])


def _make_backward(ops):
    def backward(ctx, grad_bound, grad_log_px, *_):
        h, weight, bias, x, weights, grad_h, grad_weight, grad_bias = ctx.saved_tensors
        if grad_bound is None:
            grad_bound = weights.new_zeros(weights.shape[0])
        if not any(ctx.needs_input_grad[:3]):  # log_ratio's gradient alone: no chunk to make
            return None, None, None, None, weights * grad_bound.unsqueeze(1), None, None, None
        if grad_log_px is None:
            grad_log_px = torch.zeros_like(weights)
        grads = ops.linear_bernoulli_iwae_backward(
            grad_bound.contiguous(),
            grad_log_px.contiguous(),
            h,
            weight,
            bias if ctx.has_bias else None,
            x,
            weights,
            grad_h,
            grad_weight,
            grad_bias,
            ctx.chunk_rows,
        )
        needed = (*ctx.needs_input_grad[:3], ctx.needs_input_grad[4])  # h, weight, bias, log_ratio
        grad_h_in, grad_weight_in, grad_bias_in, grad_ratio = (g if n else None for g, n in zip(grads, needed))
        return grad_h_in, grad_weight_in, grad_bias_in if ctx.has_bias else None, None, grad_ratio, None, None, None

    return backward


def _triton_forward(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x: torch.Tensor,
    log_ratio: torch.Tensor,
    elbo: bool,
    with_grads: bool,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(torch.ops.vaekernels_triton, h, weight, bias, x, log_ratio, elbo, with_grads, chunk_rows)


def _triton_backward(
    grad_bound: torch.Tensor,
    grad_log_px: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x: torch.Tensor,
    weights: torch.Tensor,
    grad_h: torch.Tensor,
    grad_weight: torch.Tensor,
    grad_bias: torch.Tensor,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(
        torch.ops.vaekernels_triton,
        grad_bound,
        grad_log_px,
        h,
        weight,
        bias,
        x,
        weights,
        grad_h,
        grad_weight,
        grad_bias,
        chunk_rows,
    )


if _backend.native()["schemas"]:
    # The chunk loop over the C++ row kernels and BLAS is the CPU kernel of the C++-declared op.
    torch.library.register_kernel(
        "vaekernels::linear_bernoulli_iwae", "cpu", functools.partial(_forward, torch.ops.vaekernels)
    )
    torch.library.register_kernel(
        "vaekernels::linear_bernoulli_iwae_backward", "cpu", functools.partial(_backward, torch.ops.vaekernels)
    )
if _backend.triton_available():
    define_triton_op("linear_bernoulli_iwae", _triton_forward)
    define_triton_op("linear_bernoulli_iwae_backward", _triton_backward)

register("linear_bernoulli_iwae", _fake, _setup_context, _make_backward)
register("linear_bernoulli_iwae_backward", _backward_fake)


# ----------------------------------------------------------------------------- public functions


def _check_layer(fn: str, h, weight, bias, x, chunk_size):
    """Checks the layer's arguments; returns (B, K, D) and the chunk's rows."""
    check_float(fn, "h", h)
    if h.dim() != 3 or 0 in h.shape:
        fail(fn, f"h must have shape [B, K, H] with B, K, H >= 1, got {list(h.shape)}")
    check_float(fn, "weight", weight, h, "h")
    if weight.dim() != 2 or weight.shape[1] != h.shape[2] or weight.shape[0] == 0:
        fail(
            fn,
            f"weight must have shape [D, H] with D >= 1 and H = {h.shape[2]} (h's last dim), got {list(weight.shape)}",
        )
    D = weight.shape[0]
    if bias is not None:
        check_float(fn, "bias", bias, h, "h")
        check_shape(fn, "bias", bias, (D,), "[D]")
    check_float(fn, "x", x, h, "h")
    if x.dim() < 2 or x.shape[0] != h.shape[0] or math.prod(x.shape[1:]) != D:
        fail(
            fn,
            f"x must have shape [B, *event] with B = {h.shape[0]} and D = {D} elements per example, "
            f"got {list(x.shape)}",
        )
    if x.requires_grad and torch.is_grad_enabled():
        fail(fn, "x must not require grad (the data's gradient is not computed); pass x.detach()")
    if chunk_size is None:
        chunk_size = max(h.shape[1], CHUNK_ELEMENTS // D)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        fail(fn, f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    return h.shape[0], h.shape[1], D, chunk_size


def _fused(h, weight, bias, x, log_ratio, elbo, chunk_rows, backend):
    """(bound [B], log p(x | z) [B, K]) through the fused op of ``backend``."""
    wants_grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
    bound, log_px, *_ = _backend.ops(backend).linear_bernoulli_iwae(
        h.contiguous(),
        weight.contiguous(),
        bias,
        x.reshape(x.shape[0], -1).contiguous(),
        log_ratio.contiguous(),
        elbo,
        wants_grads,
        chunk_rows,
    )
    return bound, log_px


def linear_iwae_bound(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x: torch.Tensor,
    log_pz: torch.Tensor,
    log_qz: torch.Tensor | None = None,
    *,
    estimator: str = "iwae",
    reduction: str = "none",
    z: torch.Tensor | None = None,
    q: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`vaekernels.iwae_bound` of ``linear(h, weight, bias)`` with the Bernoulli likelihood,
    without the [B, K, D] logits.

    Args:
        h: the decoder's last hidden layer [B, K, H] for K samples per example.
        weight, bias: the output layer's parameters, [D, H] and [D] (or None): the logits are
            ``h @ weight.T + bias``, as :class:`torch.nn.Linear` makes them.
        x: data [B, *event] with D values in [0, 1] per example; it gets no gradient.
        log_pz, log_qz, estimator, reduction, z, q: as in :func:`vaekernels.iwae_bound`.
        chunk_size: logit rows made at once (rounded down to whole examples, at least one);
            default: rows of 2^18 logits in all (1 MiB in float32).

    Saved for backward: the inputs and the gradients of h, weight and bias (computed in the
    forward pass), O(B K H + D H), where the unfused bound keeps the [B, K, D] logits. A NaN or
    infinite logit gives what :func:`vaekernels.bernoulli_log_prob` gives for it.

    Example:
        >>> import torch, vaekernels
        >>> B, K, H, D = 4, 5, 8, 6
        >>> layer = torch.nn.Linear(H, D)
        >>> h, x = torch.randn(B, K, H), torch.rand(B, D).round()
        >>> log_pz, log_qz = torch.randn(B, K), torch.randn(B, K)
        >>> bound = vaekernels.linear_iwae_bound(h, layer.weight, layer.bias, x, log_pz, log_qz)
        >>> torch.allclose(bound, vaekernels.iwae_bound(layer(h), x, log_pz, log_qz), atol=1e-5)
        True
    """
    return _linear_iwae_bound(
        "linear_iwae_bound", h, weight, bias, x, log_pz, log_qz, estimator, reduction, z, q, chunk_size
    )


def _linear_iwae_bound(fn: str, h, weight, bias, x, log_pz, log_qz, estimator, reduction, z, q, chunk_size):
    """:func:`linear_iwae_bound`, its errors naming ``fn``, the public caller (the function or a module)."""
    check_choice(fn, "estimator", estimator, ESTIMATORS)
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    _, _, _, chunk_rows = _check_layer(fn, h, weight, bias, x, chunk_size)
    # Checked on every backend: the reference would meet a bad log_pz or q as a raw torch error.
    checked_log_qz = _checked_log_qz(fn, log_pz, log_qz, z, q, estimator, h, "h")
    backend = _backend.choose("linear_iwae_bound", h.device, h.dtype)
    if backend == "reference":
        return reference.linear_iwae_bound(
            h, weight, bias, x, log_pz, log_qz, estimator=estimator, reduction=reduction, z=z, q=q
        )
    log_ratio = log_pz - checked_log_qz
    bound, log_px = _fused(h, weight, bias, x, log_ratio, False, chunk_rows, backend)
    return _estimated(bound, log_px + log_ratio, z, estimator, reduction)


def linear_expected_log_prob(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, *, chunk_size: int | None = None
) -> torch.Tensor:
    """(1/K) sum_k log p(x | z_k) per example [B], Bernoulli with logits ``linear(h, weight, bias)``:
    the ELBO's reconstruction term, without the [B, K, D] logits.

    Arguments as in :func:`linear_iwae_bound`; equals ``bernoulli_log_prob(linear(h), x).mean(1)``.

    Example:
        >>> import torch, vaekernels
        >>> layer = torch.nn.Linear(8, 6)
        >>> h, x = torch.randn(4, 1, 8), torch.rand(4, 6).round()
        >>> expected = vaekernels.linear_expected_log_prob(h, layer.weight, layer.bias, x)
        >>> torch.allclose(expected, vaekernels.bernoulli_log_prob(layer(h), x).mean(1), atol=1e-5)
        True
    """
    return _linear_expected_log_prob("linear_expected_log_prob", h, weight, bias, x, chunk_size)


def _linear_expected_log_prob(fn: str, h, weight, bias, x, chunk_size):
    """:func:`linear_expected_log_prob`, its errors naming ``fn``, the public caller."""
    batch, samples, _, chunk_rows = _check_layer(fn, h, weight, bias, x, chunk_size)
    backend = _backend.choose("linear_expected_log_prob", h.device, h.dtype)
    if backend == "reference":
        return reference.linear_expected_log_prob(h, weight, bias, x)
    return _fused(h, weight, bias, x, h.new_zeros(batch, samples), True, chunk_rows, backend)[0]
