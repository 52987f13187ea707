"""Registration shared by every op family: fake kernels and autograd on each op namespace.

An op exists in up to two namespaces with one schema: ``vaekernels::<op>`` (declared in
csrc/ops.cpp; the C++ kernels are its CPU and CUDA implementations) and
``vaekernels_triton::<op>`` (a ``torch.library.custom_op`` over the Triton launcher, for CUDA
tensors and, through the Triton interpreter, CPU tensors). A plain custom op rather than
``triton_op``: its fake-tensor tracing would enter the interpreter on CPU (DESIGN.md §3).
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import _backend

TRITON_NAMESPACE = "vaekernels_triton"


def namespaces() -> list[str]:
    found = []
    if _backend.native()["schemas"]:
        found.append("vaekernels")
    if _backend.triton_available():
        found.append(TRITON_NAMESPACE)
    return found


def define_triton_op(name: str, launcher: Callable, mutates_args: tuple[str, ...] = ()) -> None:
    """Wraps a Triton launcher as ``vaekernels_triton::<name>``; its annotations give the schema
    (``mutates_args``: the arguments it writes in place).

    It also becomes the CUDA kernel of ``vaekernels::<name>`` where no CUDA C++ kernel was built,
    so the C++-declared op runs on CUDA tensors either way.
    """
    torch.library.custom_op(f"{TRITON_NAMESPACE}::{name}", launcher, mutates_args=mutates_args,
                            device_types=("cpu", "cuda"))
    if _backend.native()["schemas"] and name not in _backend.native()["cuda_ops"]:
        torch.library.register_kernel(f"vaekernels::{name}", "cuda", launcher)


def register(name: str, fake: Callable, setup_context: Callable | None = None,
             make_backward: Callable | None = None) -> None:
    """Registers the fake kernel and (when differentiable) the autograd formula of ``name``.

    ``make_backward(ops)`` returns the backward for the namespace ``ops``, so a Triton op's
    backward runs Triton kernels and a C++ op's backward C++ kernels.
    """
    for namespace in namespaces():
        qualified = f"{namespace}::{name}"
        torch.library.register_fake(qualified, fake)
        if make_backward is not None:
            ops = getattr(torch.ops, namespace)
            torch.library.register_autograd(qualified, make_backward(ops), setup_context=setup_context)
