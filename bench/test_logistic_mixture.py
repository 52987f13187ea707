"""The PixelCNN++ logistic mixture loss and causal attention: fused ops against the PyTorch
reference and torch.compile of it.

Mixture: the PixelCNN++ CIFAR-10 shape, B=64, 32x32 RGB, M=10 components (params [64, 100, 32,
32]), summed loss as in openai/pixel-cnn. Attention: a PixelSNAIL block on 28x28 (784 positions),
batch 16, 2 heads of 16 (keys) and 32 (values).
"""

from __future__ import annotations

import pytest
import torch
from _common import CONTENDERS, MODES, contender_fn, devices, run_contenders

import vaekernels
from vaekernels import _backend
from vaekernels.reference import causal_attention as attention_reference
from vaekernels.reference import logistic_mixture as reference

B, C, H, W, M = 64, 3, 32, 32, 10


def mixture_inputs(device: str):
    g = torch.Generator().manual_seed(0)
    params = torch.randn(B, reference.num_params(C, M), H, W, generator=g).to(device).requires_grad_()
    x = (torch.randint(0, 256, (B, C, H, W), generator=g).float() / 127.5 - 1).to(device)
    return params, x


def _mixture_loss(nll):
    return lambda params, x: nll(params, x, M, "sum")


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", devices())
def test_discretized_logistic_mixture_nll(benchmark, mode, contender, device):
    fn = contender_fn(
        contender,
        _mixture_loss(reference.discretized_logistic_mixture_nll),
        _mixture_loss(vaekernels.discretized_logistic_mixture_nll),
    )
    extra = (
        {"backend": _backend.choose("discretized_logistic_mixture_nll", torch.device(device))}
        if contender == "fused"
        else {}
    )
    run_contenders(
        benchmark,
        fn,
        mixture_inputs(device),
        op="discretized_logistic_mixture_nll",
        shape=f"B{B} {C}x{H}x{W} M{M}",
        mode=mode,
        contender=contender,
        **extra,
    )


N_ATTN, L_ATTN, D_ATTN, DV_ATTN = 16 * 2, 28 * 28, 16, 32


def attention_inputs(device: str):
    g = torch.Generator().manual_seed(0)
    return tuple(
        torch.randn(N_ATTN, L_ATTN, d, generator=g).to(device).requires_grad_() for d in (D_ATTN, D_ATTN, DV_ATTN)
    )


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", devices())
def test_causal_attention(benchmark, mode, contender, device):
    fn = contender_fn(contender, attention_reference.causal_attention, vaekernels.causal_attention)
    extra = {"backend": _backend.choose("causal_attention", torch.device(device))} if contender == "fused" else {}
    run_contenders(
        benchmark,
        fn,
        attention_inputs(device),
        op="causal_attention",
        shape=f"N{N_ATTN} L{L_ATTN} D{D_ATTN} Dv{DV_ATTN}",
        mode=mode,
        contender=contender,
        **extra,
    )
