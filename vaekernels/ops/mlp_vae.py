"""The whole loss of an MLP VAE in one op: encoder, samples, decoder, likelihood and KL.

The VAE of Kingma & Welling and of Burda et al.'s tables is two small tanh MLPs (784-200-200-50)
around the reparameterised samples, and at batch 100 about half its training step went to the
matrix products and half to the rest: per layer a bias, a tanh and their backward as separate ops
and autograd nodes, then the samples, the KL, the likelihood and the losses' reductions. The fused
ops of the likelihood and the KL (:func:`vaekernels.linear_expected_log_prob`,
:func:`vaekernels.gaussian_kl`) leave most of that in place. Here the whole loss is one autograd
node: the C++ kernel (csrc/cpu/mlp_vae.cpp) calls ATen's matrix products and does everything
between them in one vectorised pass each, keeping for the backward the layers' outputs and the
logits' gradient sigmoid(l) - x (not the logits). Per example it returns the two terms every
ELBO-based loss is built from, so beta-VAE, controlled capacity and GECO weigh them as they like.

On CUDA (and on CPU tensors under the Triton interpreter) the same loss runs as cuBLAS products
and the family's Triton row kernels (:func:`_composed_forward`). The readable twin is
:mod:`vaekernels.reference.mlp_vae`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .. import _backend
from ..reference import mlp_vae as reference
from ._checks import check_float, check_shape, fail
from ._registry import define_triton_op, first_derivatives_only, register


def _layer_shapes(weights, batch_rows: int) -> list[tuple[int, int]]:
    """The hidden outputs' shapes [rows, out_i] of every layer but the last."""
    return [(batch_rows, w.shape[0]) for w in weights[:-1]]


def _saved_shapes(x, eps, encoder_weights, decoder_weights) -> list[tuple[int, ...]]:
    """The shapes of the backward's tensors: encoder hidden, [mean, log_var], z, decoder hidden, residual."""
    B, K, d = eps.shape
    return [
        *_layer_shapes(encoder_weights, B),
        (B, 2 * d),
        (B * K, d),
        *_layer_shapes(decoder_weights, B * K),
        (B * K, x.shape[1]),
    ]


# ----------------------------------------------------------------------------- the composed path


def _tanh_mlp_backward(grad, h_in, weights, hidden, grad_weights: list, grad_biases: list, input_grad: bool):
    for i in reversed(range(len(weights))):
        layer_input = h_in if i == 0 else hidden[i - 1]
        grad_weights[i] = grad.t().mm(layer_input)
        grad_biases[i] = grad.sum(0)
        if i == 0:
            return grad.mm(weights[0]) if input_grad else None
        grad = grad.mm(weights[i]) * (1 - hidden[i - 1] ** 2)


def _composed_forward(ops, x, eps, encoder_weights, encoder_biases, decoder_weights, decoder_biases):
    """The op from matrix products, torch's elementwise ops and the ``ops`` namespace's row kernels."""
    B, K, d = eps.shape
    saved = []
    encoded = reference.tanh_mlp(x, encoder_weights, encoder_biases, saved)
    mean, log_var = encoded[:, :d], encoded[:, d:]
    z = torch.addcmul(mean.unsqueeze(1), torch.exp(0.5 * log_var).unsqueeze(1), eps).reshape(B * K, d)
    kl = ops.gaussian_kl(mean.unsqueeze(1), log_var.unsqueeze(1)).view(B)
    saved += [encoded, z]
    logits = reference.tanh_mlp(z, decoder_weights, decoder_biases, saved).view(B, K, -1)
    x_rows = x.unsqueeze(1).expand(B, K, x.shape[1])
    reconstruction = -ops.bernoulli_log_prob(logits, x_rows).mean(1)
    # The gradient of -log p: sigmoid(l) - x.
    residual = ops.bernoulli_log_prob_backward(logits.new_full((B, K), -1.0), logits, x_rows)
    saved.append(residual.view(B * K, -1))
    return reconstruction, kl, saved


def _composed_backward(grad_reconstruction, grad_kl, x, eps, encoder_weights, decoder_weights, saved):
    B, K, d = eps.shape
    encoder_layers, decoder_layers = len(encoder_weights), len(decoder_weights)
    encoder_hidden, (encoded, z) = saved[: encoder_layers - 1], saved[encoder_layers - 1 : encoder_layers + 1]
    decoder_hidden, residual = saved[encoder_layers + 1 : -1], saved[-1]
    grad_rec = grad_reconstruction.to(x.dtype) / K
    grad_logits = (residual.view(B, K, -1) * grad_rec.view(B, 1, 1)).view(B * K, -1)
    decoder_grads = [None] * decoder_layers, [None] * decoder_layers
    grad_z = _tanh_mlp_backward(grad_logits, z, decoder_weights, decoder_hidden, *decoder_grads, True).view(B, K, d)
    mean, log_var = encoded[:, :d], encoded[:, d:]
    grad_kl = grad_kl.to(x.dtype).unsqueeze(1)
    grad_mean = grad_z.sum(1) + grad_kl * mean
    grad_log_var = 0.5 * torch.exp(0.5 * log_var) * (grad_z * eps).sum(1) + 0.5 * grad_kl * torch.expm1(log_var)
    encoder_grads = [None] * encoder_layers, [None] * encoder_layers
    grad_encoded = torch.cat([grad_mean, grad_log_var], 1)
    _tanh_mlp_backward(grad_encoded, x, encoder_weights, encoder_hidden, *encoder_grads, False)
    return [*encoder_grads[0], *encoder_grads[1], *decoder_grads[0], *decoder_grads[1]]


def _triton_forward(
    x: torch.Tensor,
    eps: torch.Tensor,
    encoder_weights: list[torch.Tensor],
    encoder_biases: list[torch.Tensor],
    decoder_weights: list[torch.Tensor],
    decoder_biases: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    return _composed_forward(
        torch.ops.vaekernels_triton, x, eps, encoder_weights, encoder_biases, decoder_weights, decoder_biases
    )


def _triton_backward(
    grad_reconstruction: torch.Tensor,
    grad_kl: torch.Tensor,
    x: torch.Tensor,
    eps: torch.Tensor,
    encoder_weights: list[torch.Tensor],
    decoder_weights: list[torch.Tensor],
    saved: list[torch.Tensor],
) -> list[torch.Tensor]:
    return _composed_backward(grad_reconstruction, grad_kl, x, eps, encoder_weights, decoder_weights, saved)


# ----------------------------------------------------------------------------- registration


def _fake(x, eps, encoder_weights, encoder_biases, decoder_weights, decoder_biases):
    B = x.shape[0]
    saved = [x.new_empty(shape) for shape in _saved_shapes(x, eps, encoder_weights, decoder_weights)]
    return x.new_empty(B), x.new_empty(B), saved


def _backward_fake(grad_reconstruction, grad_kl, x, eps, encoder_weights, decoder_weights, saved):
    return [
        *(w.new_empty(w.shape) for w in encoder_weights),
        *(w.new_empty(w.shape[0]) for w in encoder_weights),
        *(w.new_empty(w.shape) for w in decoder_weights),
        *(w.new_empty(w.shape[0]) for w in decoder_weights),
    ]


def _setup_context(ctx, inputs, output):
    x, eps, encoder_weights, _, decoder_weights, _ = inputs
    ctx.layers = len(encoder_weights), len(decoder_weights)
    ctx.save_for_backward(x, eps, *encoder_weights, *decoder_weights, *output[2])


def _parameter_grads(backward_op, ctx, grad_reconstruction, grad_kl) -> list[torch.Tensor]:
    """The gradients of the encoder's weights, its biases, the decoder's weights and its biases, in
    that order, by ``backward_op`` (``mlp_vae_backward``) from the tensors :func:`_setup_context`
    saved (an output that fed nothing: zeros)."""
    x, eps, *rest = ctx.saved_tensors
    encoder_layers, decoder_layers = ctx.layers
    return backward_op(
        x.new_zeros(x.shape[0]) if grad_reconstruction is None else grad_reconstruction.contiguous(),
        x.new_zeros(x.shape[0]) if grad_kl is None else grad_kl.contiguous(),
        x,
        eps,
        rest[:encoder_layers],
        rest[encoder_layers : encoder_layers + decoder_layers],
        rest[encoder_layers + decoder_layers :],
    )


def _make_backward(ops):
    def backward(ctx, grad_reconstruction, grad_kl, _):
        grads = _parameter_grads(ops.mlp_vae_backward.default, ctx, grad_reconstruction, grad_kl)
        e, d = ctx.layers
        return None, None, grads[:e], grads[e : 2 * e], grads[2 * e : 2 * e + d], grads[2 * e + d :]

    return backward


if _backend.triton_available():
    define_triton_op("mlp_vae", _triton_forward)
    define_triton_op("mlp_vae_backward", _triton_backward)

register("mlp_vae", _fake, _setup_context, _make_backward)
register("mlp_vae_backward", _backward_fake)


# ----------------------------------------------------------------------------- public function


def _layers_fit(weights, biases, in_features: int, out_features: int, x) -> bool:
    """Whether the layers are as :func:`_check_layers` wants them: its test without the messages,
    which cost a tenth of the op's Python time at batch 100."""
    if type(weights) not in (list, tuple) or type(biases) not in (list, tuple) or len(biases) != len(weights):
        return False
    dtype, device, width = x.dtype, x.device, in_features
    for weight, bias in zip(weights, biases):
        if not (isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)):
            return False
        shape = weight.shape
        if len(shape) != 2 or shape[1] != width or shape[0] < 1 or bias.shape != shape[:1]:
            return False
        if weight.dtype != dtype or bias.dtype != dtype or weight.device != device or bias.device != device:
            return False
        width = shape[0]
    return bool(weights) and width == out_features


def _check_layers(fn: str, side: str, weights, biases, in_features: int, out_features: int, x) -> list:
    """The layers ``weights[i]`` [out_i, in_i], chained from ``in_features`` to ``out_features``,
    with ``biases[i]`` [out_i]; returns them as lists."""
    if _layers_fit(weights, biases, in_features, out_features, x):
        return list(weights), list(biases)
    for arg, value in ((f"{side}_weights", weights), (f"{side}_biases", biases)):
        if not isinstance(value, Sequence) or isinstance(value, torch.Tensor) or not value:
            fail(fn, f"{arg} must be a non-empty list of tensors, one per layer, got {value!r}", TypeError)
    if len(biases) != len(weights):
        fail(fn, f"{side}_biases must hold one bias per layer ({len(weights)}), got {len(biases)}")
    width = in_features
    for i, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        check_float(fn, f"{side}_weights[{i}]", weight, x, "x")
        out = out_features if i == len(weights) - 1 else (weight.shape[0] if weight.dim() == 2 else -1)
        if weight.dim() != 2 or weight.shape != (out, width) or out < 1:
            fail(fn, f"{side}_weights[{i}] must have shape [out, in] = [{out}, {width}], got {list(weight.shape)}")
        check_float(fn, f"{side}_biases[{i}]", bias, x, "x")
        check_shape(fn, f"{side}_biases[{i}]", bias, (out,), "[out]")
        width = out
    return list(weights), list(biases)


def mlp_vae(
    x: torch.Tensor,
    eps: torch.Tensor,
    encoder_weights: Sequence[torch.Tensor],
    encoder_biases: Sequence[torch.Tensor],
    decoder_weights: Sequence[torch.Tensor],
    decoder_biases: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reconstruction loss and the KL of a VAE with tanh MLPs and a Bernoulli likelihood, per example.

    The encoder maps x to ``[mean, log_var]`` (its last layer linear, tanh after the others), the
    samples are ``z_k = mean + exp(log_var / 2) * eps_k``, and the decoder maps each z_k to Bernoulli
    logits the same way. Returns ``(reconstruction, kl)``, each [B]: -(1/K) sum_k log p(x | z_k) and
    KL(N(mean, exp(log_var)) || N(0, I)). The ELBO is ``-(reconstruction + kl)``; beta-VAE,
    controlled capacity and GECO weigh the two terms.

    Args:
        x: data [B, D], values in [0, 1]; it gets no gradient.
        eps: standard normal noise [B, K, d] for K samples per example; it gets no gradient.
        encoder_weights, encoder_biases: the encoder's layers as :class:`torch.nn.Linear` holds them,
            weights [out, in] and biases [out], from D to 2d.
        decoder_weights, decoder_biases: the decoder's, from d to D.

    One autograd node computes the whole loss and its backward (the matrix products in BLAS, the
    rest in one vectorised pass between each), and keeps for the backward the layers' outputs and
    sigmoid(logits) - x [B K, D]. Equal to :mod:`vaekernels.reference.mlp_vae`, which composes
    ``torch.nn.functional.linear``, ``tanh``, :func:`vaekernels.bernoulli_log_prob` and
    :func:`vaekernels.gaussian_kl`.

    Example:
        >>> import torch, vaekernels
        >>> encoder = [torch.nn.Linear(6, 8), torch.nn.Linear(8, 4)]  # D = 6 -> [mean, log_var], d = 2
        >>> decoder = [torch.nn.Linear(2, 8), torch.nn.Linear(8, 6)]
        >>> x, eps = torch.rand(5, 6).round(), torch.randn(5, 3, 2)
        >>> reconstruction, kl = vaekernels.mlp_vae(
        ...     x, eps, [l.weight for l in encoder], [l.bias for l in encoder],
        ...     [l.weight for l in decoder], [l.bias for l in decoder])
        >>> (reconstruction + kl).mean().backward()  # minus the ELBO
        >>> reconstruction.shape, kl.shape, decoder[0].weight.grad.shape
        (torch.Size([5]), torch.Size([5]), torch.Size([8, 2]))
    """
    fn = "mlp_vae"
    check_float(fn, "x", x)
    if x.dim() != 2 or 0 in x.shape:
        fail(fn, f"x must have shape [B, D] with B, D >= 1, got {list(x.shape)}")
    check_float(fn, "eps", eps, x, "x")
    if eps.dim() != 3 or eps.shape[0] != x.shape[0] or 0 in eps.shape:
        fail(fn, f"eps must have shape [B, K, d] with B = {x.shape[0]} (x's) and K, d >= 1, got {list(eps.shape)}")
    for arg, value in (("x", x), ("eps", eps)):
        if value.requires_grad and torch.is_grad_enabled():
            fail(fn, f"{arg} must not require grad (its gradient is not computed); pass {arg}.detach()")
    D, d = x.shape[1], eps.shape[2]
    encoder = _check_layers(fn, "encoder", encoder_weights, encoder_biases, D, 2 * d, x)
    decoder = _check_layers(fn, "decoder", decoder_weights, decoder_biases, d, D, x)
    backend = _backend.choose(fn, x.device, x.dtype)
    if backend == "reference":
        return reference.mlp_vae(x, eps, *encoder, *decoder)
    ops = _backend.ops(backend)
    if torch.compiler.is_compiling():
        reconstruction, kl, _ = ops.mlp_vae(x.contiguous(), eps.contiguous(), *encoder, *decoder)
        return reconstruction, kl
    if not torch.is_grad_enabled():
        inputs = (x.contiguous(), eps.contiguous(), *encoder, *decoder)
        reconstruction, kl, _ = _past_autograd(ops.mlp_vae.default, *inputs)
        return reconstruction, kl
    (encoder_weights, encoder_biases), (decoder_weights, decoder_biases) = encoder, decoder
    parameters = (*encoder_weights, *encoder_biases, *decoder_weights, *decoder_biases)
    return _EagerMLPVAE.apply(ops, x.contiguous(), eps.contiguous(), len(encoder_weights), *parameters)


def _past_autograd(op, *args):
    """``op``'s kernel, past the op's autograd: where the dispatcher goes anyway inside an autograd
    Function or with grad off, but there through torch.library's Python autograd kernel, which
    costs the batch-100 VAE's step about 50 µs (2%) more. torch.library's kernel takes this path
    itself (``_AutoDispatchBelowAutograd``); eager calls only, as torch.compile traces the op."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


class _EagerMLPVAE(torch.autograd.Function):
    """The op's registered autograd as a plain Function over the same two ops, for eager calls.

    torch.library's autograd wrapper flattens an op's Tensor[] arguments and results with pytree
    on every call: 0.4 ms of a 3.5 ms training step of the batch-100 VAE, a tenth of it. Eager
    calls take this Function instead (the parameters as separate arguments); torch.compile traces
    the registered op, whose backward is the same :func:`_parameter_grads`.
    """

    @staticmethod
    def forward(ctx, ops, x, eps, encoder_layers, *parameters):
        e = encoder_layers
        d = (len(parameters) - 2 * e) // 2
        inputs = (x, eps, parameters[:e], parameters[e : 2 * e], parameters[2 * e : 2 * e + d], parameters[2 * e + d :])
        output = _past_autograd(ops.mlp_vae.default, *inputs)
        ctx.ops = ops
        _setup_context(ctx, inputs, output)
        return output[0], output[1]

    @staticmethod
    def backward(ctx, grad_reconstruction, grad_kl):
        backward_op = functools.partial(_past_autograd, ctx.ops.mlp_vae_backward.default)
        grads = tuple(_parameter_grads(backward_op, ctx, grad_reconstruction, grad_kl))
        if torch.is_grad_enabled():  # create_graph=True
            anchors = (*ctx.saved_tensors, grad_reconstruction, grad_kl)
            grads = first_derivatives_only("vaekernels::mlp_vae", grads, anchors)
        return None, None, None, None, *grads
