"""Reversible networks: the fused walk step, and a RevNet stage trained reversibly against the
same blocks run as an ordinary network (``reference``: every activation stored) and
torch.compile of that.

The stage is the one of ``models.flows.revnet``'s memory study (width 8 -> F and G on 4 channels,
16x16, batch 128) at depth 16; its forward+backward group carries the step-time ratio (the
issue's bar: at most 1.4x the ordinary network) and ``saved_bytes`` (what the graph keeps for
backward). The depth sweep with peak memory is ``python -m models study revnet-memory``.
"""

from __future__ import annotations

import pytest
import torch
from _common import CONTENDERS, contender_fn, devices, run_contenders

import vaekernels
from vaekernels import _backend
from vaekernels.reference import reversible as reference

STEP_SHAPE = (128, 4, 32, 32)  # one half of a [128, 8, 32, 32] stream
STAGE_BATCH, STAGE_WIDTH, STAGE_SIZE, STAGE_DEPTH = 128, 8, 16, 16


def _fused_backend(contender: str, device: str) -> dict:
    return {"backend": _backend.choose("coupling_backward_step", torch.device(device))} if contender == "fused" else {}


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("device", devices())
def test_coupling_backward_step(benchmark, contender, device):
    torch.manual_seed(0)
    # The values drift as the rounds repeat the in-place step; they stay finite.
    inputs = tuple(torch.randn(STEP_SHAPE, device=device) for _ in range(4))
    fn = contender_fn(contender, reference.coupling_backward_step, vaekernels.coupling_backward_step)
    n = inputs[0].numel() * 4
    run_contenders(
        benchmark,
        fn,
        inputs,
        op="coupling_backward_step",
        shape="x".join(map(str, STEP_SHAPE)),
        mode="forward",
        contender=contender,
        bytes_moved=6 * n,
        **_fused_backend(contender, device),
    )


def _stage(device: str):
    from models.flows.revnet import residual_function

    torch.manual_seed(0)
    half = STAGE_WIDTH // 2
    return [
        vaekernels.nn.AdditiveCoupling(residual_function(half), residual_function(half)).to(device)
        for _ in range(STAGE_DEPTH)
    ]


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("device", devices())
def test_reversible_stage(benchmark, contender, device):
    blocks = _stage(device)
    x = torch.randn(STAGE_BATCH, STAGE_WIDTH, STAGE_SIZE, STAGE_SIZE, device=device, requires_grad=True)

    def ordinary(x):
        return reference.reversible_sequential(blocks, x)[0]

    def reversible(x):
        return vaekernels.reversible_sequential(blocks, x)[0]

    fn = contender_fn(contender, ordinary, reversible)
    run_contenders(
        benchmark,
        fn,
        (x,),
        op="reversible_sequential",
        shape=f"depth{STAGE_DEPTH} B{STAGE_BATCH} C{STAGE_WIDTH} {STAGE_SIZE}x{STAGE_SIZE}",
        mode="forward+backward",
        contender=contender,
        **_fused_backend(contender, device),
    )
