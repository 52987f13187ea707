"""The whole loss of an MLP VAE as plain PyTorch: two tanh MLPs, the reparameterised samples, the
Bernoulli log-probability and the Gaussian KL of :mod:`.iwae`, differentiated by autograd."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .iwae import bernoulli_log_prob, gaussian_kl


def tanh_mlp(h: torch.Tensor, weights, biases, hidden: list | None = None) -> torch.Tensor:
    """``linear(h, weights[i], biases[i])`` layer by layer, tanh after every layer but the last;
    the hidden layers' outputs are appended to ``hidden`` where one is given."""
    for i, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        h = F.linear(h, weight, bias)
        if i < len(weights) - 1:
            h = torch.tanh(h)
            if hidden is not None:
                hidden.append(h)
    return h


def mlp_vae(x, eps, encoder_weights, encoder_biases, decoder_weights, decoder_biases):
    """:func:`vaekernels.mlp_vae`: (reconstruction [B], kl [B]) for x [B, D] and eps [B, K, d]."""
    mean, log_var = tanh_mlp(x, encoder_weights, encoder_biases).chunk(2, dim=-1)
    z = mean.unsqueeze(1) + torch.exp(0.5 * log_var).unsqueeze(1) * eps
    logits = tanh_mlp(z, decoder_weights, decoder_biases)
    return -bernoulli_log_prob(logits, x).mean(1), gaussian_kl(mean, log_var)
