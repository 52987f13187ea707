"""vaekernels: fused kernels for training and evaluating VAE-family generative models.

The functional API; modules are in :mod:`vaekernels.nn`, the readable PyTorch oracle of every
op in :mod:`vaekernels.reference`.
"""

from . import nn  # noqa: E402  (the modules are built on the functions above)
from ._backend import available_backends, use_backend
from .ops.causal_attention import causal_attention
from .ops.iwae import (
    aggregate_posterior_log_density,
    bernoulli_log_prob,
    gaussian_kl,
    gaussian_log_prob,
    importance_sampled_nll,
    iwae_bound,
    log_mean_exp,
    marginal_kl,
    mutual_information,
    total_correlation,
)
from .ops.jacobian import grae_regularizer, jacobian_column_sq_norms, jacobian_gram
from .ops.linear_iwae import linear_expected_log_prob, linear_iwae_bound
from .ops.logistic_mixture import discretized_logistic_mixture_nll, discretized_logistic_mixture_sample
from .ops.mlp_vae import mlp_vae
from .ops.pixelcnn import concat_elu, gated_activation, masked_conv2d
from .ops.reversible import coupling_backward_step, reversible_sequential

__version__ = "0.1.0"

__all__ = [
    "aggregate_posterior_log_density",
    "available_backends",
    "bernoulli_log_prob",
    "causal_attention",
    "concat_elu",
    "coupling_backward_step",
    "discretized_logistic_mixture_nll",
    "discretized_logistic_mixture_sample",
    "gated_activation",
    "gaussian_kl",
    "gaussian_log_prob",
    "grae_regularizer",
    "importance_sampled_nll",
    "iwae_bound",
    "jacobian_column_sq_norms",
    "jacobian_gram",
    "linear_expected_log_prob",
    "linear_iwae_bound",
    "log_mean_exp",
    "marginal_kl",
    "masked_conv2d",
    "mlp_vae",
    "mutual_information",
    "nn",
    "reversible_sequential",
    "total_correlation",
    "use_backend",
]
