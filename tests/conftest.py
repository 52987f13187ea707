"""Test setup: the Triton interpreter on machines without CUDA, NaN-poisoned uninitialised memory."""

import os

import torch

# Triton reads this when it is imported (through vaekernels), so set it before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import vaekernels  # noqa: E402


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """torch.empty (in Python and in the C++ kernels) returns NaN-filled memory, so an output
    element a kernel forgets to write fails the comparison instead of passing by luck."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


def device_backends():
    """(device, backend) pairs this machine can run, the reference included."""
    from vaekernels import _backend

    cpu = ("cpu", "reference") + (("triton",) if _backend.triton_interpreted() else ())
    pairs = [("cpu", b) for b in vaekernels.available_backends() if b in cpu]
    if torch.cuda.is_available():
        pairs += [("cuda", b) for b in vaekernels.available_backends() if b in ("cuda", "triton")]
    return pairs


@pytest.fixture(params=device_backends(), ids=lambda pair: f"{pair[0]}-{pair[1]}")
def device_backend(request):
    device, backend = request.param
    with vaekernels.use_backend(backend):
        yield torch.device(device), backend
