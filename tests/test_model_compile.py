"""torch.compile with its default backend (inductor) on every reference model's loss, fused and
reference, forward and backward: no crash, the eager values and gradients, no recompilation per
step, and a recompilation when the vaekernels backend changes.

Small models of each entry's structure (:attr:`models.registry.ModelEntry.small`) keep the
compilations short; inductor draws random numbers as eager PyTorch does (``fallback_random``), so
the models that sample compare exactly too.
"""

import copy

import pytest
import torch
from conftest import needs_cpp
from torch._dynamo.testing import CompileCounter, EagerAndRecordGraphs

import vaekernels
from models.registry import REGISTRY

BACKENDS = ["auto", "reference"]


def small_model_and_batch(name):
    entry = REGISTRY[name]
    torch.manual_seed(0)
    model = entry.build(**entry.small)
    return entry, model, entry.batch(torch.Generator().manual_seed(0), 4)


def loss_and_grads(loss_fn, model, batch):
    """The loss and the parameters' gradients from the model's current state, which the call may
    change (a step counter, a Lagrange multiplier) and which is then put back."""
    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(1)
    loss = loss_fn(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    model.load_state_dict(state)
    return loss.detach(), grads


# Models whose reference-backend graph is another's with other arithmetic on the loss (the same
# reference ops): compiled on the fused backend only, to keep CI short.
REFERENCE_LIKE_ANOTHER = {
    "beta-vae",
    "capacity-vae",
    "geco",
    "cvae",
    "iwae-k5",
    "iwae-k50-dreg",
    "geco-iwae",
    "hiwae-k5",
}


def compile_cases():
    for name in REGISTRY:
        for backend in BACKENDS if name not in REFERENCE_LIKE_ANOTHER else ["auto"]:
            yield pytest.param(name, backend, id=f"{name}-{backend}")


@needs_cpp
@pytest.mark.parametrize("name,backend", compile_cases())
def test_model_loss_compiles_with_inductor(name, backend):
    entry, model, batch = small_model_and_batch(name)
    torch._dynamo.reset()
    with vaekernels.use_backend(backend), torch._inductor.config.patch(fallback_random=True):
        expected, expected_grads = loss_and_grads(entry.loss, model, batch)
        loss, grads = loss_and_grads(torch.compile(entry.loss), model, batch)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, expected_grads):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


@needs_cpp
@pytest.mark.parametrize("name", ["geco", "capacity-vae", "vhp-vae", "geco-iwae"])
def test_training_steps_do_not_recompile(name):
    """The Lagrange multiplier and the capacity target change every step: as tensors, not constants."""
    entry, model, batch = small_model_and_batch(name)
    optimizer = entry.optimizer(model)
    counter = CompileCounter()
    compiled = torch.compile(entry.loss, backend=counter)
    torch._dynamo.reset()
    for _ in range(2):  # the first step may take another graph than the later ones
        entry.step(model, optimizer, batch, compiled)
    graphs = counter.frame_count
    for _ in range(3):
        entry.step(model, optimizer, batch, compiled)
    assert counter.frame_count == graphs


@needs_cpp
def test_changing_the_backend_recompiles():
    """A graph traced under one backend is not reused under another: each runs its own ops."""
    x = torch.randn(3, 5)
    recorder = EagerAndRecordGraphs()
    compiled = torch.compile(lambda t: vaekernels.log_mean_exp(t), backend=recorder, fullgraph=True)
    torch._dynamo.reset()
    with vaekernels.use_backend("reference"):
        reference = compiled(x)
    with vaekernels.use_backend("cpu"):
        fused = compiled(x)
    with vaekernels.use_backend("reference"):
        compiled(x)
    assert len(recorder.graphs) == 2  # the third call found the reference graph again
    assert ["vaekernels" in graph.code for graph in recorder.graphs] == [False, True]
    torch.testing.assert_close(fused, reference)
