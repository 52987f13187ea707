"""Test setup: the Triton interpreter on machines without CUDA, NaN-poisoned uninitialised memory."""

import os

import torch

# Triton reads this when it is imported (through vaekernels), so set it before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if "PYTEST_XDIST_WORKER" in os.environ:
    # make test's xdist workers share the cores. With torch's default of a thread per core in
    # every worker, OpenMP's spinning barriers oversubscribe them and the many-small-op tests run
    # 4x slower (test_models_cli's pixel models: 35 s against 8.6 s on 2 cores). Tests of the
    # kernels' thread partitioning set their own thread counts. Subprocesses inherit the share.
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)

import pytest  # noqa: E402

import vaekernels  # noqa: E402
from vaekernels import _backend  # noqa: E402

# For builds without C++ (VAEKERNELS_CPP=0) or installs without triton; in CI neither skips, as
# test_native_build_is_loaded_on_this_machine and test_triton_of_the_test_extra_is_importable check.
needs_cpp_and_triton = pytest.mark.skipif(
    not _backend.triton_available() or not _backend.native()["schemas"], reason="needs both the C++ schemas and triton"
)
needs_cpp = pytest.mark.skipif(
    not _backend.native()["schemas"],
    reason="built without C++ (VAEKERNELS_CPP=0); CI builds it, as test_native_build_is_loaded_on_this_machine checks",
)


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


def namespace(backend):
    """torch.ops.<namespace> of a native backend's ops."""
    return torch.ops.vaekernels_triton if backend == "triton" else torch.ops.vaekernels


def rel_err(out, expected):
    out, expected = out.double(), expected.double()
    return ((out - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def assert_triton_schema_is_cpp(name):
    """The Triton op registers the C++ op's schema, so either can stand in for the other."""
    cpp = str(getattr(torch.ops.vaekernels, name).default._schema)
    triton = str(getattr(torch.ops.vaekernels_triton, name).default._schema)
    assert triton.replace("vaekernels_triton::", "vaekernels::") == cpp
