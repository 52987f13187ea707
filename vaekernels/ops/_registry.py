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
    """Registers the fake kernel and the autograd formula of ``name``.

    ``make_backward(ops)`` returns the backward for the namespace ``ops``, so a Triton op's
    backward runs Triton kernels and a C++ op's backward C++ kernels. Without it ``name`` is a
    fused backward, which has no derivative of its own: differentiating it (a second backward
    after ``create_graph=True``) raises instead of returning the wrong numbers that autograd's
    fallback for ops without a formula would give.
    """
    for namespace in namespaces():
        qualified = f"{namespace}::{name}"
        torch.library.register_fake(qualified, fake)
        ops = getattr(torch.ops, namespace)
        if make_backward is not None:
            torch.library.register_autograd(qualified, make_backward(ops), setup_context=setup_context)
        elif not getattr(ops, name).default._schema.is_mutable:  # torch takes formulas for functional ops only
            torch.library.register_autograd(qualified, _no_second_derivative(qualified))


def _no_second_derivative(qualified: str) -> Callable:
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{qualified}: the fused kernels give first derivatives only; a second backward through them "
            f"(double backward after create_graph=True: Hessian-vector products, gradient penalties) is not "
            f"supported. Set VAEKERNELS_BACKEND=reference for higher derivatives.")
    return backward
