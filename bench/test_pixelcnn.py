"""PixelCNN: masked convolution, the gated activation, PixelCNN++'s concat-ELU, the Gated PixelCNN
layer and cached sampling, against the pytorch-generative way (dense convolutions times masks, unfused gates) and
torch.compile of it.

Shapes: a batch of 16 MNIST-sized 28x28 maps with 128 channels (issue 3, "Done when" 1 and 2);
sampling 16 binarised-MNIST images from a class-conditional Gated PixelCNN ("Done when" 4).
"""

from __future__ import annotations

import functools

import pytest
import torch
from _common import CONTENDERS, MODES, contender_fn, devices, interleaved_medians, report_interleaved, run_contenders

import vaekernels
from vaekernels import _backend
from vaekernels.reference import pixelcnn as reference

BATCH, CHANNELS, SIZE = 16, 128, 28
SHAPE = f"B{BATCH} C{CHANNELS} {SIZE}x{SIZE}"
# (kernel, mask type): the bars are k=5 type B >= 1.35x, k=7 type A >= 1.5x, k=3 never slower.
MASKED_CONVS = [(3, "B"), (5, "B"), (7, "A")]
LAYER_KERNEL = 3
SAMPLE_IMAGES, SAMPLE_CHANNELS, SAMPLE_LAYERS = 16, 32, 6
# Convolution groups take about a second a call on 2 CPU cores: more rounds than the default
# budget gives, so that the medians of a busy machine settle.
CONV_TIMING = {"time_budget_s": 5.0, "min_rounds": 5}


def _leaf(*shape, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).requires_grad_()


def _fused_backend(contender: str, device: str) -> dict:
    return {"backend": _backend.choose("gated_activation", torch.device(device))} if contender == "fused" else {}


@functools.cache
def _masked_conv_fns(mask_type: str):
    # One function object per mask type, so torch.compile of the reference is traced once per shape.
    def ref(x, weight, bias):
        return reference.masked_conv2d(x, weight, bias, mask_type)

    def fused(x, weight, bias):
        return vaekernels.masked_conv2d(x, weight, bias, mask_type)

    return ref, fused


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel,mask_type", MASKED_CONVS, ids=[f"k{k}{t}" for k, t in MASKED_CONVS])
@pytest.mark.parametrize("device", devices())
def test_masked_conv2d(benchmark, kernel, mask_type, mode, contender, device):
    torch.manual_seed(0)
    fn = contender_fn(contender, *_masked_conv_fns(mask_type))
    inputs = (
        _leaf(BATCH, CHANNELS, SIZE, SIZE, device=device),
        _leaf(CHANNELS, CHANNELS, kernel, kernel, device=device, scale=0.02),
        _leaf(CHANNELS, device=device),
    )
    run_contenders(
        benchmark,
        fn,
        inputs,
        op=f"masked_conv2d k{kernel} {mask_type}",
        shape=SHAPE,
        mode=mode,
        contender=contender,
        **CONV_TIMING,
        **({"backend": "aten"} if contender == "fused" else {}),
    )


def _gated_reference(x, cond):
    return reference.gated_activation(x, cond)


def _gated_fused(x, cond):
    return vaekernels.gated_activation(x, cond)


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", devices())
def test_gated_activation(benchmark, mode, contender, device):
    torch.manual_seed(0)
    fn = contender_fn(contender, _gated_reference, _gated_fused)
    inputs = (_leaf(BATCH, 2 * CHANNELS, SIZE, SIZE, device=device), _leaf(BATCH, 2 * CHANNELS, device=device))
    run_contenders(
        benchmark,
        fn,
        inputs,
        op="gated_activation (with condition)",
        shape=SHAPE,
        mode=mode,
        contender=contender,
        **_fused_backend(contender, device),
    )


def _concat_elu_reference(x):
    return reference.concat_elu(x)


def _concat_elu_fused(x):
    return vaekernels.concat_elu(x)


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", devices())
def test_concat_elu(benchmark, mode, contender, device):
    torch.manual_seed(0)
    fn = contender_fn(contender, _concat_elu_reference, _concat_elu_fused)
    run_contenders(
        benchmark,
        fn,
        (_leaf(BATCH, CHANNELS, SIZE, SIZE, device=device),),
        op="concat_elu",
        shape=SHAPE,
        mode=mode,
        contender=contender,
        **_fused_backend(contender, device),
    )


@functools.cache
def _layer(device: str) -> vaekernels.nn.GatedPixelCNNLayer:
    torch.manual_seed(0)
    return vaekernels.nn.GatedPixelCNNLayer(
        CHANNELS, CHANNELS, LAYER_KERNEL, "B", skip_channels=CHANNELS, cond_features=10
    ).to(device)


@functools.cache
def _layer_fns(device: str):
    layer = _layer(device)

    def ref(v, h, cond):
        return reference.gated_pixelcnn_layer(layer, v, h, cond)

    def fused(v, h, cond):
        return layer(v, h, cond)

    return ref, fused


def _layer_inputs(device: str):
    """(v, h, cond): the two stacks' inputs, leaves, and a one-hot class per image."""
    return (
        _leaf(BATCH, CHANNELS, SIZE, SIZE, device=device),
        _leaf(BATCH, CHANNELS, SIZE, SIZE, device=device),
        torch.eye(10, device=device)[torch.arange(BATCH, device=device) % 10],
    )


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", devices())
def test_gated_pixelcnn_layer(benchmark, mode, contender, device):
    torch.manual_seed(0)
    fn = contender_fn(contender, *_layer_fns(device))
    inputs = _layer_inputs(device)
    run_contenders(
        benchmark,
        fn,
        inputs,
        op=f"GatedPixelCNNLayer k{LAYER_KERNEL} B skip+cond",
        shape=SHAPE,
        mode=mode,
        contender=contender,
        **CONV_TIMING,
        **_fused_backend(contender, device),
    )


LAYER_INTERLEAVED_ROUNDS = 21


@pytest.mark.parametrize("device", devices())
def test_gated_pixelcnn_layer_interleaved(device):
    """The layer's forward+backward contenders timed round-robin (:func:`_common.interleaved_medians`):
    medians and fused's speed-ups printed (``-s``) and appended to
    ``.benchmarks/gated_layer_interleaved.md``."""
    torch.manual_seed(0)
    inputs = _layer_inputs(device)

    def step(fn):
        return lambda: torch.autograd.grad(sum(t.sum() for t in fn(*inputs)), inputs[:2])

    calls = {name: step(contender_fn(name, *_layer_fns(device))) for name in CONTENDERS}
    medians = interleaved_medians(calls, device, LAYER_INTERLEAVED_ROUNDS)
    report_interleaved(
        f"GatedPixelCNNLayer k{LAYER_KERNEL} B skip+cond {SHAPE} forward+backward",
        "gated_layer",
        f"{SHAPE} | {device}",
        medians,
    )


@pytest.mark.parametrize("contender", ("reference", "fused"))
@pytest.mark.parametrize("device", devices())
def test_sampling(benchmark, contender, device):
    """reference: one full forward per pixel; fused: the cached sampler. Same model, same noise."""
    torch.manual_seed(0)
    model = vaekernels.nn.GatedPixelCNN(1, SAMPLE_CHANNELS, SAMPLE_LAYERS, num_classes=10).to(device).eval()
    labels = torch.arange(SAMPLE_IMAGES, device=device) % 10

    def sample(labels):
        return model.sample(
            SAMPLE_IMAGES, (SIZE, SIZE), labels, cached=contender == "fused", generator=torch.Generator().manual_seed(0)
        )

    run_contenders(
        benchmark,
        sample,
        (labels,),
        op="GatedPixelCNN.sample (binarised MNIST)",
        shape=f"{SAMPLE_IMAGES} images {SIZE}x{SIZE}, {SAMPLE_LAYERS} layers of {SAMPLE_CHANNELS}",
        mode="forward",
        contender=contender,
        warmup_calls=0,
        min_rounds=1,
        max_rounds=3,
        measure_memory=False,
        **_fused_backend(contender, device),
    )
