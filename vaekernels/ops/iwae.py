"""Importance-weighted bounds: fused log-likelihoods, the IWAE bound and its estimators, NLL
evaluation, and the aggregate-posterior estimators (marginal KL, mutual information, total
correlation).

Each op reads top to bottom: custom op registration (fake + autograd) -> public function. The
kernels are in csrc/cpu/iwae.cpp, csrc/cuda/iwae.cu and vaekernels/triton/iwae.py; the
readable PyTorch oracle with the same signatures is :mod:`vaekernels.reference.iwae`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .. import _backend
from ..reference import iwae as reference
from ._checks import check_choice, check_float, check_shape, fail
from ._registry import define_triton_op, namespaces, register

LIKELIHOODS = ("bernoulli", "gaussian")
ESTIMATORS = ("iwae", "dreg", "stl")
REDUCTIONS = ("none", "mean", "sum")

if _backend.triton_available():
    from ..triton import iwae as _triton

    for _name, _launcher in {
        "log_mean_exp": _triton.log_mean_exp_fwd,
        "log_mean_exp_backward": _triton.log_mean_exp_bwd,
        "bernoulli_log_prob": _triton.bernoulli_log_prob_fwd,
        "bernoulli_log_prob_backward": _triton.bernoulli_log_prob_bwd,
        "gaussian_log_prob": _triton.gaussian_log_prob_fwd,
        "gaussian_kl": _triton.gaussian_kl_fwd,
        "aggregate_posterior": _triton.aggregate_posterior_fwd,
        "aggregate_posterior_backward": _triton.aggregate_posterior_bwd,
    }.items():
        define_triton_op(_name, _launcher)


# ----------------------------------------------------------------------------- [P, Q, D] views


def _mergeable(sizes, strides) -> bool:
    """Whether these dims of one tensor can be viewed as a single dim without a copy."""
    kept = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    return all(outer[1] == inner[1] * inner[0] for outer, inner in zip(kept, kept[1:]))


def _as_rows(tensors: list[torch.Tensor], shape: torch.Size) -> tuple[list[torch.Tensor], torch.Size]:
    """Views each tensor, broadcast to ``shape``, as [P, Q, D] over the leading dims, last dim contiguous.

    Dims broadcast by expansion keep stride 0, so a tensor shared across samples is read in
    place, never copied; only a tensor broadcast along the last dim is laid out at its own size.
    Returns the views and the leading (output) shape.
    """
    lead, size = shape[:-1], shape[-1]
    if all(t.shape == shape and t.is_contiguous() for t in tensors):
        return [t.view(1, math.prod(lead), size) for t in tensors], lead
    own = []
    for t in tensors:
        t = t.reshape((1,) * (len(shape) - t.dim()) + tuple(t.shape))
        if size > 1 and (t.shape[-1] != size or t.stride(-1) != 1):
            t = t.expand(*t.shape[:-1], size).contiguous()
        own.append(t if t.shape == shape else t.expand(shape))
    split = next(
        (
            s
            for s in range(len(lead) + 1)
            if all(_mergeable(t.shape[:s], t.stride()[:s]) and _mergeable(t.shape[s:-1], t.stride()[s:-1]) for t in own)
        ),
        None,
    )
    rows = (math.prod(lead), 1, size) if split is None else (math.prod(lead[:split]), math.prod(lead[split:]), size)
    # No view where none is needed: under torch.compile every view of a tensor that backward
    # keeps is a separate saved alias, and inductor (torch 2.13) may overwrite one alias's
    # storage in place while another is still to be read (DReG's z: wrong decoder gradients).
    return [t if t.shape == rows else t.reshape(rows) for t in own], lead


def _event_rows(fn: str, logits: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, K, *event] and x [B, *event] as [B, K, D] views; x is broadcast over K, not copied."""
    check_float(fn, "logits", logits)
    check_float(fn, "x", x, logits, "logits")
    if logits.dim() < 3:
        fail(fn, f"logits must have shape [B, K, *event] with at least one event dim, got {list(logits.shape)}")
    batch, samples, event = logits.shape[0], logits.shape[1], logits.shape[2:]
    if batch == 0:
        fail(fn, "logits must have a non-empty batch (B >= 1), got B = 0")
    if samples == 0:
        fail(fn, "logits must have K >= 1 samples, got K = 0")
    check_shape(fn, "x", x, (batch, *event), "[B, *event]")
    flat = logits.flatten(2)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    x_flat = x.flatten(1)
    if x_flat.stride(-1) != 1:
        x_flat = x_flat.contiguous()
    return flat, x_flat.unsqueeze(1).expand(flat.shape)


# ----------------------------------------------------------------------------- log_mean_exp


def _log_mean_exp_fake(x):
    return x.new_empty(x.shape[0])


def _save_input_and_output(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output)


def _make_log_mean_exp_backward(ops):
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        return ops.log_mean_exp_backward(grad.contiguous(), x, out)

    return backward


def _log_mean_exp_backward_fake(grad, x, out):
    return x.new_empty(x.shape)


register("log_mean_exp", _log_mean_exp_fake, _save_input_and_output, _make_log_mean_exp_backward)
register("log_mean_exp_backward", _log_mean_exp_backward_fake)


def log_mean_exp(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """log(mean(exp(x))) along ``dim``, computed stably.

    The gradient is the softmax of ``x`` along ``dim``, normalised by its own sum, so its weights
    sum to 1 however the output rounds (at magnitudes of 1e7 in float32 too).

    NaN and ±inf: ``-inf`` entries weigh 0, and a slice of all ``-inf`` gives ``-inf`` and a zero
    gradient; a slice holding ``+inf`` gives ``+inf``, its gradient shared evenly by the ``+inf``
    entries (the softmax's limit; 0 elsewhere); a NaN gives NaN.

    Example:
        >>> import torch, vaekernels
        >>> vaekernels.log_mean_exp(torch.tensor([[0.0, 0.0], [1.0, 1.0]])).tolist()
        [0.0, 1.0]
    """
    fn = "log_mean_exp"
    check_float(fn, "x", x)
    if x.dim() == 0:
        fail(fn, "x must have at least one dim, got a 0-dim tensor")
    if isinstance(dim, bool) or not isinstance(dim, int):
        fail(fn, f"dim must be an int, got {type(dim).__name__} {dim!r}", TypeError)
    if not -x.dim() <= dim < x.dim():
        fail(fn, f"dim must be in [{-x.dim()}, {x.dim() - 1}] for x of shape {list(x.shape)}, got {dim}", IndexError)
    if x.shape[dim] == 0:
        fail(fn, f"x must have at least one element along dim {dim}, got shape {list(x.shape)}")
    backend = _backend.choose(fn, x.device, x.dtype)
    if backend == "reference":
        return reference.log_mean_exp(x, dim=dim, keepdim=keepdim)
    moved = x.movedim(dim, -1)
    out = _backend.ops(backend).log_mean_exp(moved.reshape(-1, moved.shape[-1]).contiguous())
    out = out.reshape(moved.shape[:-1])
    return out.unsqueeze(dim) if keepdim else out


# ----------------------------------------------------------------------------- bernoulli_log_prob


def _row_reduction_fake(first, *rest):
    """[P, Q, D] views in, [P, Q] out: the shape of every row-reduction op."""
    return first.new_empty(first.shape[:2])


def _bernoulli_log_prob_backward_fake(grad, logits, x):
    return logits.new_empty(logits.shape)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _make_bernoulli_log_prob_backward(ops):
    def backward(ctx, grad):
        logits, x = ctx.saved_tensors
        grad_logits = ops.bernoulli_log_prob_backward(grad, logits, x) if ctx.needs_input_grad[0] else None
        grad_x = grad.unsqueeze(-1) * logits if ctx.needs_input_grad[1] else None
        return grad_logits, grad_x

    return backward


register("bernoulli_log_prob", _row_reduction_fake, _save_inputs, _make_bernoulli_log_prob_backward)
register("bernoulli_log_prob_backward", _bernoulli_log_prob_backward_fake)


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bernoulli log-likelihood summed over event dims, in one pass over the decoder output.

    ``logits`` [B, K, *event] (K samples per example), ``x`` [B, *event] with values in [0, 1]
    (fractional allowed), broadcast over K without a copy. Returns [B, K]:
    sum x log sigmoid(l) + (1 - x) log(1 - sigmoid(l)). Only ``logits`` and ``x`` are saved for
    backward, which writes d(logits) = grad * (x - sigmoid(l)) in one pass.

    NaN and ±inf: a logit of ±inf is a certain outcome: its term is 0 where x agrees (x = 1 with
    +inf, x = 0 with -inf) and -inf otherwise (a term of weight 0 counts 0, as in xlogy), and its
    gradient is the finite x - sigmoid(l). A NaN logit or x makes its row NaN.

    Example:
        >>> import torch, vaekernels
        >>> logits = torch.zeros(2, 3, 4)
        >>> vaekernels.bernoulli_log_prob(logits, torch.ones(2, 4)).shape
        torch.Size([2, 3])
    """
    return _bernoulli_log_prob("bernoulli_log_prob", logits, x)


def _bernoulli_log_prob(fn: str, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """:func:`bernoulli_log_prob`, its errors naming ``fn``, the public caller."""
    rows, x_rows = _event_rows(fn, logits, x)
    backend = _backend.choose("bernoulli_log_prob", logits.device, logits.dtype)
    if backend == "reference":
        return reference.bernoulli_log_prob(logits, x)
    return _backend.ops(backend).bernoulli_log_prob(rows, x_rows)


# ----------------------------------------------------------------------------- gaussian_log_prob


def _make_gaussian_log_prob_backward(ops):
    fused = hasattr(ops, "gaussian_log_prob_backward")  # the C++ namespace has the one-pass kernel

    def backward(ctx, grad):
        x, mean, log_var = ctx.saved_tensors
        # Grad mode on means create_graph=True: the composite below is differentiable again.
        if fused and not torch.is_grad_enabled():
            grads = iter(ops.gaussian_log_prob_backward(grad, x, mean, log_var, *ctx.needs_input_grad))
            return tuple(next(grads) if needed else None for needed in ctx.needs_input_grad)
        grad = grad.unsqueeze(-1)
        # w = (x - mean) / std, then w / std: (x - mean) exp(-log_var) would be 0 * inf at x = mean for
        # log_var < -88 in float32; w is 0 there for any log_var, and so is w / std.
        standardised = reference.standardised(x, mean, log_var)
        # An infinite w (a zero density) passes no gradient through itself, as in the reference.
        standardised = torch.where(torch.isinf(standardised), 0.0, standardised)
        scaled = reference.standardised(standardised, 0.0, log_var)
        grad_x = -grad * scaled if ctx.needs_input_grad[0] else None
        grad_mean = grad * scaled if ctx.needs_input_grad[1] else None
        grad_log_var = 0.5 * grad * (standardised * standardised - 1) if ctx.needs_input_grad[2] else None
        return grad_x, grad_mean, grad_log_var

    return backward


def _gaussian_log_prob_backward_fake(grad, x, mean, log_var, x_grad, mean_grad, log_var_grad):
    return [x.new_empty(x.shape) for needed in (x_grad, mean_grad, log_var_grad) if needed]


if "vaekernels" in namespaces():  # C++ only: the Triton namespace keeps the composite backward
    torch.library.register_fake("vaekernels::gaussian_log_prob_backward", _gaussian_log_prob_backward_fake)
register(
    "gaussian_log_prob", _row_reduction_fake, _save_inputs, _make_gaussian_log_prob_backward, twice_differentiable=True
)


def _row_reduction(fn: str, names: tuple[str, ...], tensors: tuple) -> tuple[str, list[torch.Tensor], torch.Size]:
    """Checks and lays out the inputs of a last-dim reduction; returns the backend, views and output shape."""
    for name, t in zip(names, tensors):
        check_float(fn, name, t, tensors[0], names[0])
    shape = tensors[0].shape
    if any(t.shape != shape for t in tensors):  # torch.broadcast_shapes costs more than a small op
        try:
            shape = torch.broadcast_shapes(*(t.shape for t in tensors))
        except RuntimeError:
            shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in zip(names, tensors))
            fail(fn, f"{', '.join(names)} must broadcast together, got {shapes}")
    if len(shape) == 0:
        fail(fn, f"{', '.join(names)} must broadcast to at least one dim (the one summed over), got 0-dim tensors")
    backend = _backend.choose(fn, tensors[0].device, tensors[0].dtype)
    if backend == "reference":
        return backend, [], torch.Size()
    rows, lead = _as_rows(list(tensors), shape)
    return backend, rows, lead


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, diag(exp(log_var))) summed over the last dim, with broadcasting.

    Broadcast arguments (a posterior mean [B, 1, d] against samples [B, K, d]) are read in
    place, not expanded into copies.

    NaN and ±inf: x = mean gives a finite term for any finite log-variance, however small (the
    standardised difference is 0, not 0 * inf; so is its gradient); a difference that overflows
    over a tiny standard deviation gives -inf; log_var = +inf gives -inf; a NaN gives NaN.

    Example:
        >>> import torch, vaekernels
        >>> z = torch.zeros(2, 5, 3)
        >>> vaekernels.gaussian_log_prob(z, torch.zeros(2, 1, 3), torch.zeros(3)).shape
        torch.Size([2, 5])
    """
    fn = "gaussian_log_prob"
    backend, rows, lead = _row_reduction(fn, ("x", "mean", "log_var"), (x, mean, log_var))
    if backend == "reference":
        return reference.gaussian_log_prob(x, mean, log_var)
    return _backend.ops(backend).gaussian_log_prob(*rows).reshape(lead)


# ----------------------------------------------------------------------------- gaussian_kl


def _make_gaussian_kl_backward(ops):
    def backward(ctx, grad):
        mean, log_var = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        grad_mean = grad * mean if ctx.needs_input_grad[0] else None
        grad_log_var = 0.5 * grad * torch.expm1(log_var) if ctx.needs_input_grad[1] else None
        return grad_mean, grad_log_var

    return backward


register("gaussian_kl", _row_reduction_fake, _save_inputs, _make_gaussian_kl_backward, twice_differentiable=True)


def gaussian_kl(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, diag(exp(log_var))) || N(0, I)) summed over the last dim, with broadcasting.

    NaN and ±inf: a mean of ±inf or a log-variance of ±inf gives +inf; a NaN gives NaN.

    Example:
        >>> import torch, vaekernels
        >>> vaekernels.gaussian_kl(torch.ones(10), torch.zeros(10)).item()
        5.0
    """
    fn = "gaussian_kl"
    backend, rows, lead = _row_reduction(fn, ("mean", "log_var"), (mean, log_var))
    if backend == "reference":
        return reference.gaussian_kl(mean, log_var)
    return _backend.ops(backend).gaussian_kl(*rows).reshape(lead)


# ----------------------------------------------------------------------------- iwae_bound


def _gaussian_event_log_prob(fn: str, x: torch.Tensor, mean: torch.Tensor, log_var) -> torch.Tensor:
    """Gaussian log p(x | z_k) over event dims: mean [B, K, *event], log_var broadcastable to it."""
    mean_rows, x_rows = _event_rows(fn, mean, x)
    if log_var is None:
        fail(fn, "log_var must be given (a tensor broadcastable to logits) when likelihood='gaussian', got None")
    check_float(fn, "log_var", log_var, mean, "logits")
    try:
        broadcasts = torch.broadcast_shapes(log_var.shape, mean.shape) == mean.shape
    except RuntimeError:
        broadcasts = False
    if not broadcasts:
        fail(fn, f"log_var must broadcast to logits' shape {list(mean.shape)}, got {list(log_var.shape)}")
    # Laid out over the event dims only: a log-variance shared across examples or samples stays
    # one row, broadcast over B and K inside the kernel.
    log_var = log_var.reshape((1,) * (mean.dim() - log_var.dim()) + tuple(log_var.shape))
    log_var = log_var.expand(*log_var.shape[:2], *mean.shape[2:]).reshape(*log_var.shape[:2], -1)
    return gaussian_log_prob(x_rows, mean_rows, log_var)


def iwae_bound(
    logits: torch.Tensor,
    x: torch.Tensor,
    log_pz: torch.Tensor,
    log_qz: torch.Tensor | None,
    *,
    likelihood: str = "bernoulli",
    estimator: str = "iwae",
    reduction: str = "none",
    log_var: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    q: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The importance-weighted bound log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x) per example.

    Args:
        logits: decoder output [B, K, *event] for K samples z_k per example; for
            ``likelihood="gaussian"`` the mean of p(x | z_k), with ``log_var`` broadcastable to it.
        x: data [B, *event], broadcast over K without a copy.
        log_pz: log p(z_k), [B, K].
        log_qz: log q(z_k | x), [B, K]; ``None`` when ``z`` and ``q`` are given instead.
        likelihood: ``"bernoulli"`` (logits) or ``"gaussian"`` (mean and ``log_var``).
        estimator: gradient estimator. ``"iwae"``: the bound's own gradient. ``"stl"``
            (sticking the landing): log q(z | x) is evaluated with q's parameters detached, so
            the encoder is reached only through z. ``"dreg"`` (doubly reparameterised, Tucker
            et al. 2018): as STL, and the gradient reaching z is weighted by the normalised
            weights once more, so the encoder's path gradient carries w~^2 (a hook on z: z must
            feed this one bound, and be passed to one call). Both need ``z`` and ``q``. The
            decoder's gradient is the IWAE one for every estimator.
        reduction: ``"none"`` ([B]), ``"mean"`` or ``"sum"`` over the batch.
        log_var: the Gaussian likelihood's log-variance.
        z: the reparameterised samples [B, K, d] (``"dreg"``, ``"stl"``).
        q: ``(mean, log_var)`` of the diagonal-Gaussian posterior, each [B, d] or [B, 1, d].

    The forward reads the [B, K, D] decoder output once; for the Bernoulli likelihood the
    backward writes d(logits) = w~ * (x - sigmoid(l)) in one fused pass with
    w~ = softmax_K(log weights) (the Gaussian one is composed of PyTorch ops). Saved for
    backward beyond the inputs: O(B * K). K = 1 gives the ELBO.

    NaN and ±inf: as its likelihood (:func:`bernoulli_log_prob`, :func:`gaussian_log_prob`) and
    :func:`log_mean_exp`: a sample of log-weight -inf weighs 0, an example whose samples are all
    -inf gets -inf with a zero gradient (DReG's weights too), and a NaN makes its example NaN.

    Example (IWAE):
        >>> import torch, vaekernels
        >>> B, K, D, d = 4, 5, 6, 2
        >>> logits, x = torch.randn(B, K, D), torch.rand(B, D).round()
        >>> log_pz, log_qz = torch.randn(B, K), torch.randn(B, K)
        >>> vaekernels.iwae_bound(logits, x, log_pz, log_qz).shape
        torch.Size([4])

    Example (DReG: pass the samples and q's parameters; one call does the rest):
        >>> mean, log_var = torch.zeros(B, d, requires_grad=True), torch.zeros(B, d, requires_grad=True)
        >>> z = mean.unsqueeze(1) + torch.exp(0.5 * log_var).unsqueeze(1) * torch.randn(B, K, d)
        >>> decoder = torch.nn.Linear(d, D)
        >>> log_pz = vaekernels.gaussian_log_prob(z, torch.zeros(()), torch.zeros(()))
        >>> loss = -vaekernels.iwae_bound(decoder(z), x, log_pz, None, estimator="dreg",
        ...                               z=z, q=(mean, log_var), reduction="mean")
        >>> loss.backward()
    """
    return _iwae_bound("iwae_bound", logits, x, log_pz, log_qz, likelihood, estimator, reduction, log_var, z, q)


def _iwae_bound(fn: str, logits, x, log_pz, log_qz, likelihood, estimator, reduction, log_var, z, q) -> torch.Tensor:
    """:func:`iwae_bound`, its errors naming ``fn``, the public caller (the function or a module)."""
    check_choice(fn, "likelihood", likelihood, LIKELIHOODS)
    check_choice(fn, "estimator", estimator, ESTIMATORS)
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    if likelihood == "bernoulli":
        log_px = _bernoulli_log_prob(fn, logits, x)
    else:
        log_px = _gaussian_event_log_prob(fn, x, logits, log_var)
    log_qz = _checked_log_qz(fn, log_pz, log_qz, z, q, estimator, log_px, "logits")
    log_w = log_px + log_pz - log_qz
    return _estimated(log_mean_exp(log_w, dim=1), log_w, z, estimator, reduction)


def _checked_log_qz(fn, log_pz, log_qz, z, q, estimator, like, like_name):
    """log q(z | x) [B, K] (B, K from ``like``), from q = (mean, log_var) where given (with q's
    parameters detached for STL and DReG), log_pz and it checked against ``like``."""
    batch, samples = like.shape[:2]
    if q is not None:
        log_qz = _posterior_log_prob(fn, z, q, log_qz, batch, samples, detach=estimator != "iwae")
    elif estimator != "iwae":
        fail(fn, f"estimator {estimator!r} needs z= (the samples) and q=(mean, log_var) of the posterior, got q=None")
    elif log_qz is None:
        fail(fn, "log_qz must be a [B, K] tensor (or pass z= and q=(mean, log_var)), got None")
    for name, t in (("log_pz", log_pz), ("log_qz", log_qz)):
        check_float(fn, name, t, like, like_name)
        check_shape(fn, name, t, (batch, samples), "[B, K]")
    return log_qz


def _estimated(bound, log_w, z, estimator: str, reduction: str) -> torch.Tensor:
    """The bound [B] reduced, with DReG's reweighting of the gradient reaching z (log_w: the log-weights)."""
    if estimator == "dreg" and z.requires_grad and torch.is_grad_enabled():
        _reweight_path_gradient(z, log_w.detach())
    if reduction == "mean":
        return bound.mean()
    return bound.sum() if reduction == "sum" else bound


def _normalised_weights(log_w: torch.Tensor) -> torch.Tensor:
    """softmax over K of the log-weights [B, K]; 0 (not NaN) on a row whose weights are all zero."""
    return torch.where(torch.isneginf(log_w).all(1, keepdim=True), 0.0, torch.softmax(log_w, dim=1))


def _reweight_path_gradient(z: torch.Tensor, log_w: torch.Tensor) -> None:
    """DReG: the gradient reaching z, already weighted by w~ through the bound, gets w~ once more.

    A hook on z: every gradient that reaches z is reweighted, so z must feed this one bound.
    """
    weights = _normalised_weights(log_w).unsqueeze(-1)
    z.register_hook(lambda grad: grad * weights)


def _posterior_log_prob(fn, z, q, log_qz, batch, samples, detach):
    if log_qz is not None:
        fail(fn, "log_qz must be None when q=(mean, log_var) is given (log q(z | x) is computed from q), got a tensor")
    if not (isinstance(q, (tuple, list)) and len(q) == 2):
        fail(fn, f"q must be a (mean, log_var) pair, got {type(q).__name__}", TypeError)
    check_float(fn, "z", z)
    if z.dim() != 3 or tuple(z.shape[:2]) != (batch, samples):
        fail(fn, f"z must have shape [B, K, d] with B, K = {batch}, {samples}, got {list(z.shape)}")
    mean, log_var = (t.unsqueeze(1) if isinstance(t, torch.Tensor) and t.dim() == 2 else t for t in q)
    for name, t in (("q[0] (mean)", mean), ("q[1] (log_var)", log_var)):
        check_float(fn, name, t, z, "z")
        if t.dim() != 3 or t.shape[0] != batch or t.shape[2] != z.shape[2]:
            fail(fn, f"{name} must have shape [B, d] or [B, 1, d] = [{batch}, {z.shape[2]}], got {list(t.shape)}")
    if detach:
        mean, log_var = mean.detach(), log_var.detach()
    return gaussian_log_prob(z, mean, log_var)


# ----------------------------------------------------------------------------- importance_sampled_nll


@torch.no_grad()
def importance_sampled_nll(
    x: torch.Tensor,
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    decode: Callable[[torch.Tensor], torch.Tensor],
    num_samples: int = 5000,
    chunk_size: int = 500,
    *,
    likelihood: str = "bernoulli",
    log_var: torch.Tensor | None = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
    output_layer: torch.nn.Linear | None = None,
) -> torch.Tensor:
    """-log p(x) per example, estimated with ``num_samples`` importance samples from q(z | x).

    The samples are drawn and decoded ``chunk_size`` at a time and folded into a running
    log-sum-exp, so memory is that of one chunk whatever ``num_samples`` is (K = 5000 as in
    Burda et al. 2016 fits where the whole [B, K, D] decoder output would not). Prior N(0, I).
    NaN and ±inf: as :func:`iwae_bound`, chunk by chunk (an example no sample explains gets +inf).

    Args:
        x: data [B, *event].
        encode: x -> (mean, log_var) of the diagonal-Gaussian q(z | x), each [B, d].
        decode: z [B, k, d] -> logits (or Gaussian means) [B, k, *event].
        num_samples, chunk_size: K and the samples decoded at once.
        likelihood, log_var: as in :func:`iwae_bound`.
        progress: show a tqdm progress bar over the chunks.
        generator: the random generator for the samples.
        output_layer: the decoder's last linear layer, when ``decode`` stops before it and returns
            its input [B, k, H]: the Bernoulli bound then goes through
            :func:`vaekernels.linear_iwae_bound`, and the [B, k, D] logits never exist.

    Example:
        >>> import torch, vaekernels
        >>> encode = lambda x: (torch.zeros(len(x), 2), torch.zeros(len(x), 2))
        >>> decode = lambda z: torch.zeros(*z.shape[:2], 3)
        >>> vaekernels.importance_sampled_nll(torch.ones(4, 3), encode, decode, 100, 30)
        tensor([2.0794, 2.0794, 2.0794, 2.0794])
    """
    fn = "importance_sampled_nll"
    for name, value in (("num_samples", num_samples), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(fn, f"{name} must be a positive int, got {value!r}")
    check_choice(fn, "likelihood", likelihood, LIKELIHOODS)
    if output_layer is not None:
        if likelihood != "bernoulli" or not isinstance(output_layer, torch.nn.Linear):
            fail(
                fn,
                f"output_layer must be a torch.nn.Linear of Bernoulli logits (likelihood='bernoulli'), got "
                f"{type(output_layer).__name__} with likelihood={likelihood!r}",
            )
        from .linear_iwae import linear_iwae_bound as _linear_iwae_bound  # a module built on this one
    for name, function in (("encode", encode), ("decode", decode)):
        if not callable(function):
            fail(fn, f"{name} must be a callable, got {type(function).__name__}", TypeError)
    check_float(fn, "x", x)
    if x.dim() < 2 or x.shape[0] == 0:
        fail(fn, f"x must have shape [B, *event] with B >= 1, got {list(x.shape)}")
    if output_layer is not None and output_layer.out_features != math.prod(x.shape[1:]):
        fail(
            fn,
            f"output_layer must have out_features = {math.prod(x.shape[1:])} (x's elements per example), "
            f"got {output_layer.out_features}",
        )
    encoded = encode(x)
    if not (isinstance(encoded, (tuple, list)) and len(encoded) == 2):
        fail(fn, f"encode(x) must return a (mean, log_var) pair, got {type(encoded).__name__}", TypeError)
    mean, q_log_var = encoded
    check_float(fn, "encode(x)[0] (mean)", mean, x, "x")
    if mean.dim() != 2 or mean.shape[0] != x.shape[0]:
        fail(fn, f"encode(x) must return (mean, log_var) of shape [B, d] with B = {x.shape[0]}, got {list(mean.shape)}")
    check_float(fn, "encode(x)[1] (log_var)", q_log_var, mean, "mean")
    check_shape(fn, "encode(x)[1] (log_var)", q_log_var, tuple(mean.shape), "[B, d]")
    std, zero = torch.exp(0.5 * q_log_var).unsqueeze(1), mean.new_zeros(())
    total = torch.full((x.shape[0],), float("-inf"), dtype=mean.dtype, device=mean.device)
    for start in tqdm(range(0, num_samples, chunk_size), desc=f"NLL, K={num_samples}", disable=not progress):
        samples = min(chunk_size, num_samples - start)
        eps = torch.randn(
            mean.shape[0], samples, mean.shape[1], generator=generator, dtype=mean.dtype, device=mean.device
        )
        z = mean.unsqueeze(1) + std * eps
        log_pz = gaussian_log_prob(z, zero, zero)
        log_qz = gaussian_log_prob(z, mean.unsqueeze(1), q_log_var.unsqueeze(1))
        decoded = decode(z)
        if output_layer is not None:
            expected, what = [*z.shape[:2], output_layer.in_features], "the output layer's input [B, k, in_features]"
        else:
            expected, what = [*z.shape[:2], *x.shape[1:]], "[B, k, *event]"
        if not isinstance(decoded, torch.Tensor) or list(decoded.shape) != expected:
            got = list(decoded.shape) if isinstance(decoded, torch.Tensor) else type(decoded).__name__
            fail(fn, f"decode(z) must return {what} = {expected} for z of shape {list(z.shape)}, got {got}")
        check_float(fn, "decode(z)", decoded, x, "x")
        if output_layer is not None:
            bound = _linear_iwae_bound(decoded, output_layer.weight, output_layer.bias, x, log_pz, log_qz)
        else:
            bound = iwae_bound(decoded, x, log_pz, log_qz, likelihood=likelihood, log_var=log_var)
        # The chunk's bound is its log-mean-exp; turn it back into a sum before merging.
        total = torch.logaddexp(total, bound + math.log(samples))
    return math.log(num_samples) - total


# ----------------------------------------------------------------------------- aggregate posterior


def _aggregate_posterior_fake(z, mean, log_var, with_marginal):
    B, d = z.shape
    return z.new_empty(B), z.new_empty(B, d if with_marginal else 0), z.new_empty(B, d)


def _aggregate_posterior_backward_fake(grad_joint, grad_marginal, z, mean, log_var, joint, marginal, nearest):
    return z.new_empty(z.shape), mean.new_empty(mean.shape), log_var.new_empty(log_var.shape)


def _save_aggregate_posterior(ctx, inputs, output):
    z, mean, log_var, _ = inputs
    ctx.save_for_backward(z, mean, log_var, *output)
    # The shift of the terms (csrc/ops.cpp): the gradients are those of the log-densities it shifts.
    ctx.mark_non_differentiable(output[2])


def _make_aggregate_posterior_backward(ops):
    def backward(ctx, grad_joint, grad_marginal, _grad_nearest):
        z, mean, log_var, joint, marginal, nearest = ctx.saved_tensors
        grad_joint = torch.zeros_like(joint) if grad_joint is None else grad_joint.contiguous()
        # Shaped like the saved marginal: [B, 0] after a joint-only forward, which tells the
        # kernels to leave the marginal's term out.
        grad_marginal = torch.zeros_like(marginal) if grad_marginal is None else grad_marginal.contiguous()
        grads = ops.aggregate_posterior_backward(grad_joint, grad_marginal, z, mean, log_var, joint, marginal, nearest)
        return *grads, None

    return backward


register(
    "aggregate_posterior", _aggregate_posterior_fake, _save_aggregate_posterior, _make_aggregate_posterior_backward
)
register("aggregate_posterior_backward", _aggregate_posterior_backward_fake)


def _aggregate_posterior(fn, z, mean, log_var, dataset_size, with_marginal):
    """(log q(z_i) + s_i, log q(z_ik) + s_ik, nearest_ik) for the batch, from one fused pass, with
    the shift s_ik = nearest_ik^2 of csrc/ops.cpp (s_i its sum over k); None when on the reference
    backend. Without ``with_marginal`` the second is empty, [B, 0], and costs nothing."""
    check_float(fn, "z", z)
    if z.dim() != 2 or z.shape[0] == 0:
        fail(fn, f"z must have shape [B, d] with B >= 1, got {list(z.shape)}")
    for name, t in (("mean", mean), ("log_var", log_var)):
        check_float(fn, name, t, z, "z")
        if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] != z.shape[1]:
            fail(fn, f"{name} must have shape [N, d] with N >= 1 and d = {z.shape[1]}, got {list(t.shape)}")
    check_shape(fn, "log_var", log_var, tuple(mean.shape), "mean's shape")
    if dataset_size is not None and (
        isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1
    ):
        fail(fn, f"dataset_size must be a positive int or None, got {dataset_size!r}")
    backend = _backend.choose("aggregate_posterior", z.device, z.dtype)
    if backend == "reference":
        return None
    joint, marginal, nearest = _backend.ops(backend).aggregate_posterior(
        z.contiguous(), mean.contiguous(), log_var.contiguous(), with_marginal
    )
    normaliser = math.log(mean.shape[0] * (dataset_size or 1))
    return joint - normaliser, marginal - normaliser, nearest


def aggregate_posterior_log_density(
    z: torch.Tensor,
    mean: torch.Tensor,
    log_var: torch.Tensor,
    *,
    dataset_size: int | None = None,
    per_dim: bool = False,
) -> torch.Tensor:
    """log q(z_i) of the aggregate posterior q(z) = mean_j q(z | x_j), over a batch.

    ``z`` [B, d] (z_i drawn from q(z | x_i)), ``mean`` and ``log_var`` [N, d] of the batch's
    diagonal-Gaussian posteriors. Returns log (1/N) sum_j q(z_i | x_j) [B], or with
    ``per_dim=True`` each coordinate's marginal log q(z_ik) [B, d]. With ``dataset_size`` the
    minibatch-weighted estimate of Chen et al. (2018) is used: log sum_j q(z_i | x_j) -
    log(N * dataset_size). One fused pass; no [B, N, d] tensor is materialised, in the
    backward either.

    NaN and ±inf: a posterior of tiny variance (log_var down to -inf) at z = mean has a finite
    density term, and pairs whose standardised distance overflows weigh exactly 0, their gradients
    too (no 0 * inf); a NaN in z, mean or log_var makes the rows it reaches NaN. A z_i of density 0
    under every posterior (z_i infinite, or every pair overflowing) gives -inf with no gradient. The
    estimators below inherit this.

    float32 limits: each log-density term is computed in the input's precision, so its rounding
    grows with (z - mean)^2 / var: at |z - mean| / std ~ 1e4 the terms are ~ -5e7, whose float32
    ulp is 4, and past ~1e19 the square overflows and the log-density is -inf. The kernels take
    every term relative to the nearest posterior's (the smallest (z - mean)^2 / var over the
    batch, for each sample and dim), which :func:`total_correlation`'s difference cancels: it
    stays accurate and finite for codes that far out, unless two posteriors are about equally
    near such a code (their weights then round by those units). :func:`mutual_information` and
    :func:`marginal_kl` subtract the log-densities themselves, so there a code ~1e4 standard
    deviations out costs units of rounding and one ~1e19 out gives inf - inf = NaN, although
    their float64 value is finite. Use float64 inputs for codes that far out.

    Example:
        >>> import torch, vaekernels
        >>> z = torch.zeros(4, 3)
        >>> vaekernels.aggregate_posterior_log_density(z, torch.zeros(4, 3), torch.zeros(4, 3)).shape
        torch.Size([4])
    """
    return _aggregate_log_density("aggregate_posterior_log_density", z, mean, log_var, dataset_size, per_dim)


def _aggregate_log_density(fn: str, z, mean, log_var, dataset_size, per_dim: bool = False) -> torch.Tensor:
    """:func:`aggregate_posterior_log_density`, its errors naming ``fn``, the public caller."""
    if not isinstance(per_dim, bool):
        fail(fn, f"per_dim must be a bool, got {type(per_dim).__name__} {per_dim!r}", TypeError)
    fused = _aggregate_posterior(fn, z, mean, log_var, dataset_size, with_marginal=per_dim)
    if fused is None:
        return reference.aggregate_posterior_log_density(z, mean, log_var, dataset_size=dataset_size, per_dim=per_dim)
    joint, marginal, nearest = fused
    shift = nearest.square()
    return marginal - shift if per_dim else joint - shift.sum(-1)


def marginal_kl(z, mean, log_var, *, dataset_size: int | None = None) -> torch.Tensor:
    """KL(q(z) || p(z)) of the aggregate posterior to N(0, I): mean_i [log q(z_i) - log p(z_i)].

    Example:
        >>> import torch, vaekernels
        >>> z, mean, log_var = torch.randn(8, 2), torch.zeros(8, 2), torch.zeros(8, 2)
        >>> round(vaekernels.marginal_kl(z, mean, log_var).item(), 4)  # q(z) = p(z)
        0.0
    """
    log_qz = _aggregate_log_density("marginal_kl", z, mean, log_var, dataset_size)
    zero = z.new_zeros(())
    return (log_qz - gaussian_log_prob(z, zero, zero)).mean()


def mutual_information(z, mean, log_var, *, dataset_size: int | None = None) -> torch.Tensor:
    """Index-code mutual information I(x; z) = mean_i [log q(z_i | x_i) - log q(z_i)].

    At most log N (log(N * dataset_size) with ``dataset_size``); the estimate can dip below 0
    by sampling noise where the true value is near 0.

    Example:
        >>> import torch, vaekernels
        >>> mean = torch.arange(4.0).unsqueeze(1) * 100  # far-apart posteriors: I = log 4
        >>> round(vaekernels.mutual_information(mean, mean, torch.zeros(4, 1)).item(), 4)
        1.3863
    """
    log_qz = _aggregate_log_density("mutual_information", z, mean, log_var, dataset_size)
    if z.shape[0] != mean.shape[0]:
        fail(
            "mutual_information",
            f"z must pair each sample z_i with the posterior of x_i: z has {z.shape[0]} rows "
            f"where mean has {mean.shape[0]}",
        )
    return (gaussian_log_prob(z, mean, log_var) - log_qz).mean()


def total_correlation(z, mean, log_var, *, dataset_size: int | None = None) -> torch.Tensor:
    """Total correlation KL(q(z) || prod_k q(z_k)) = mean_i [log q(z_i) - sum_k log q(z_ik)].

    Finite wherever its value is, even for a code so far from every posterior that its
    log-densities overflow (see :func:`aggregate_posterior_log_density` for NaN, ±inf and float32).

    Example:
        >>> import torch, vaekernels
        >>> z, mean = torch.randn(16, 3), torch.randn(16, 3)
        >>> vaekernels.total_correlation(z, mean, torch.zeros(16, 3)).shape
        torch.Size([])
    """
    fn = "total_correlation"
    fused = _aggregate_posterior(fn, z, mean, log_var, dataset_size, with_marginal=True)
    if fused is None:
        return reference.total_correlation(z, mean, log_var, dataset_size=dataset_size)
    # The shifts cancel: both terms are finite wherever the correlation is, even where a code so
    # far out that its log-densities overflow to -inf (csrc/ops.cpp).
    joint, marginal, _ = fused
    return (joint - marginal.sum(-1)).mean()
