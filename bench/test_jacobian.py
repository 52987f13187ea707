"""Decoder Jacobians: all-column squared norms, forward and backward, of an MLP decoder.

Contenders per group:

- ``reference``: ``torch.func.vmap(torch.func.jacfwd(decoder))``, the [B, D, d] Jacobian, reduced;
- ``forward_mode``: forward mode written by hand in eager PyTorch: the tangent block through every
  layer, the last one included (so J = T Wᵀ, [B, d, D], is built), then its squared row sums;
- ``forward_mode_metric``: the same, with the last layer reduced through WᵀW instead;
- ``compiled``: ``torch.compile`` of ``forward_mode_metric``, the fastest PyTorch formulation;
- ``fused``: :func:`vaekernels.jacobian_column_sq_norms`.

The fused contender also records the GFLOP of its matrix products, the rate it achieves, and the
rate of a plain large GEMM on the same machine in the same run (:func:`gemm_rate`).
"""

from __future__ import annotations

import functools
import time

import pytest
import torch
from _common import devices, format_bytes, interleaved_medians, report_interleaved, run_contenders
from torch import nn

import vaekernels
from vaekernels import _backend
from vaekernels.ops import jacobian as ops_jacobian
from vaekernels.reference import jacobian as reference

# (batch, latent d, hidden width, hidden layers, outputs D): MNIST-sized and CIFAR-sized decoders.
SHAPES = {"B128 d32 h512x2 D784": (128, 32, 512, 2, 784), "B64 d64 h1024x2 D3072": (64, 64, 1024, 2, 3072)}
CONTENDERS = ("reference", "forward_mode", "forward_mode_metric", "compiled", "fused")
GEMM_PROBE = "the faster of torch.mm and oneDNN's matmul of two 2048 x 2048 float32 matrices, median of 5"


def decoder_of(shape, device):
    batch, d, width, depth, outputs = shape
    torch.manual_seed(0)
    layers, fan_in = [], d
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.Tanh()]
        fan_in = width
    decoder = nn.Sequential(*layers, nn.Linear(fan_in, outputs)).to(device)
    return decoder, torch.randn(batch, d, device=device, requires_grad=True)


def _hidden_tangents(decoder, z):
    """Hand-written forward mode through every layer but the last: the tangent block [B, d, h]."""
    hidden, tangent = z, None
    for layer in list(decoder)[:-1]:
        if isinstance(layer, nn.Linear):
            hidden = layer(hidden)
            tangent = layer.weight.t().expand(z.shape[0], -1, -1) if tangent is None else tangent @ layer.weight.t()
        else:
            hidden = torch.tanh(hidden)
            tangent = tangent * (1 - hidden * hidden).unsqueeze(1)
    return tangent


def forward_mode(decoder, z):
    jac_t = _hidden_tangents(decoder, z) @ decoder[-1].weight.t()  # [B, d, D]
    return jac_t.square().sum(-1)


def forward_mode_metric(decoder, z):
    tangent, weight = _hidden_tangents(decoder, z), decoder[-1].weight
    return ((tangent @ (weight.t() @ weight)) * tangent).sum(-1)


def fused_flops(shape) -> float:
    """2 x the multiply-adds of the fused path's matrix products, forward and backward, 2·B·d·h²
    each: per hidden layer after the first, one product forward and two backward; T M forward; the
    metric's gradient Tᵀ(g ⊙ T) backward, symmetric, so only its blocks on and below the diagonal
    (``SYMMETRIC_BLOCK`` columns each); the tangent's gradient 2 g (T M) needs none. And 2·D·h²
    each: WᵀW forward and W (G + Gᵀ) backward."""
    batch, d, width, depth, outputs = shape
    block = ops_jacobian.SYMMETRIC_BLOCK
    sizes = [min(block, width - start) for start in range(0, width, block)]
    lower = sum(a * b for i, a in enumerate(sizes) for b in sizes[: i + 1])
    return (3 * (depth - 1) + 1) * 2 * batch * d * width**2 + 2 * batch * d * lower + 2 * 2 * outputs * width**2


@functools.cache
def gemm_rate(device: str) -> float:
    """FLOP/s of :data:`GEMM_PROBE` on ``device``, measured once per session: on CPU also through
    oneDNN, which the fused path's float32 products take (ops/jacobian.py's ``_mm``)."""
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    products = [lambda: torch.mm(a, b)]
    if device == "cpu" and ops_jacobian._onednn_linear is not None:
        products.append(lambda: ops_jacobian._onednn_linear(a, b.t(), None, "none", [], ""))

    def once(product):
        started = time.perf_counter()
        product()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    best = float("inf")
    for product in products:
        once(product)
        best = min(best, sorted(once(product) for _ in range(5))[2])
    return 2 * 2048**3 / best


def _function(contender):
    return {
        "reference": reference.jacobian_column_sq_norms,
        "forward_mode": forward_mode,
        "forward_mode_metric": forward_mode_metric,
        "compiled": torch.compile(forward_mode_metric, dynamic=False),
        "fused": vaekernels.jacobian_column_sq_norms,
    }[contender]


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("device", devices())
def test_jacobian_column_sq_norms(benchmark, device, shape_name, contender):
    shape = SHAPES[shape_name]
    decoder, z = decoder_of(shape, device)
    fn = _function(contender)
    batch, d, _, _, outputs = shape
    extra = {}
    if contender == "fused":
        extra = {"backend": _backend.choose("jacobian_tangent_step", torch.device(device))}
    # Every parameter but the last bias, which does not move the Jacobian.
    weights = [p for p in decoder.parameters() if p is not decoder[-1].bias]
    try:
        run_contenders(
            benchmark,
            lambda z, *params: fn(decoder, z),
            (z, *weights),
            op="jacobian_column_sq_norms",
            shape=shape_name,
            mode="forward+backward",
            contender=contender,
            jacobian_bytes=4 * batch * outputs * d,
            warmup_calls=2,
            min_rounds=5,
            time_budget_s=3.0,
            **extra,
        )
    except RuntimeError as error:
        # The last reading, saved_bytes, cannot see the storage of the tensors that vmap(jacfwd)
        # saves (functorch wrappers); the timing and peak memory before it stand.
        if contender != "reference" or "invalid python storage" not in str(error):
            raise
    if contender == "fused" and benchmark.stats:
        flops, rate = fused_flops(shape), gemm_rate(device)
        achieved = flops / benchmark.stats.stats.median
        benchmark.extra_info.update(
            gflop=flops / 1e9, achieved_GFLOPs=achieved / 1e9, gemm_GFLOPs=rate / 1e9, gemm_fraction=achieved / rate
        )
        benchmark.extra_info["note"] = (
            f"jacobian_column_sq_norms {shape_name} ({device}): fused {flops / 1e9:.1f} GFLOP at "
            f"{achieved / 1e9:.0f} GFLOP/s, {100 * achieved / rate:.0f}% of {GEMM_PROBE} ({rate / 1e9:.0f} GFLOP/s); "
            f"the [B, D, d] Jacobian of the reference is {format_bytes(4 * batch * outputs * d)}"
        )


INTERLEAVED_ROUNDS = 7


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("device", devices())
def test_jacobian_column_sq_norms_interleaved(device, shape_name):
    """The same contenders timed round-robin (:func:`_common.interleaved_medians`); medians and
    fused's speed-ups printed (``-s``) and appended to ``.benchmarks/jacobian_interleaved.md``."""
    decoder, z = decoder_of(SHAPES[shape_name], device)
    weights = [p for p in decoder.parameters() if p is not decoder[-1].bias]

    def step(fn):
        return lambda: torch.autograd.grad(fn(decoder, z).sum(), [z, *weights])

    calls = {name: step(_function(name)) for name in CONTENDERS}
    medians = interleaved_medians(calls, device, INTERLEAVED_ROUNDS)
    report_interleaved(
        f"jacobian_column_sq_norms {shape_name} forward+backward", "jacobian", f"{shape_name} | {device}", medians
    )
