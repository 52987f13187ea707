"""Registration shared by every op family: fake kernels and autograd on each op namespace.

An op exists in up to two namespaces with one schema: ``vaekernels::<op>`` (declared in
csrc/ops.cpp; the C++ kernels are its CPU and CUDA implementations) and
``vaekernels_triton::<op>`` (a ``torch.library.custom_op`` over the Triton launcher, for CUDA
tensors and, through the Triton interpreter, CPU tensors). A plain custom op rather than
``triton_op``: its fake-tensor tracing would enter the interpreter on CPU (DESIGN.md §3).
"""

from __future__ import annotations

from collections.abc import Callable

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
    torch.library.custom_op(
        f"{TRITON_NAMESPACE}::{name}", launcher, mutates_args=mutates_args, device_types=("cpu", "cuda")
    )
    if _backend.native()["schemas"] and name not in _backend.native()["cuda_ops"]:
        torch.library.register_kernel(f"vaekernels::{name}", "cuda", launcher)


def register(
    name: str,
    fake: Callable,
    setup_context: Callable | None = None,
    make_backward: Callable | None = None,
    *,
    twice_differentiable: bool = False,
) -> None:
    """Registers the fake kernel and (when differentiable) the autograd formula of ``name``.

    ``make_backward(ops)`` returns the backward for the namespace ``ops``, so a Triton op's
    backward runs Triton kernels and a C++ op's backward C++ kernels. A backward through fused
    kernels gives first derivatives only: unless ``twice_differentiable`` (a backward of
    differentiable torch ops), its gradients refuse a second backward (:func:`first_derivatives_only`).
    """
    for namespace in namespaces():
        qualified = f"{namespace}::{name}"
        torch.library.register_fake(qualified, fake)
        if make_backward is not None:
            backward = make_backward(getattr(torch.ops, namespace))
            if not twice_differentiable:
                backward = _refusing_second_backward(qualified, backward)
            torch.library.register_autograd(qualified, backward, setup_context=setup_context)


def _refusing_second_backward(qualified: str, backward: Callable) -> Callable:
    def refusing(ctx, *grads):
        result = backward(ctx, *grads)
        if not torch.is_grad_enabled():  # a backward without create_graph: nothing to guard
            return result
        return first_derivatives_only(qualified, result, (*ctx.saved_tensors, *grads))

    return refusing


def first_derivatives_only(
    where: str, gradients, anchors, remedy: str = "Set VAEKERNELS_BACKEND=reference for higher derivatives."
):
    """``gradients`` (a tensor or a tuple, Nones kept) unchanged, unless grad mode is on: in a
    backward with create_graph=True, each becomes a node whose own backward raises (naming
    ``where`` and the ``remedy``), tied to the ``anchors`` that require grad. Fused kernels compute
    gradients without a graph; left as they are, a second backward would take them for constants
    and return wrong numbers."""
    if not torch.is_grad_enabled():
        return gradients
    tied = [t for t in anchors if isinstance(t, torch.Tensor) and t.requires_grad]
    message = (
        f"{where}: the fused kernels give first derivatives only; a second backward through them (double "
        f"backward after create_graph=True: Hessian-vector products, gradient penalties) is not supported. "
        f"{remedy}"
    )

    def wrap(gradient):
        return gradient if gradient is None else _FirstDerivativeOnly.apply(gradient, message, *tied)

    return tuple(map(wrap, gradients)) if isinstance(gradients, tuple) else wrap(gradients)


class _FirstDerivativeOnly(torch.autograd.Function):
    @staticmethod
    def forward(gradient, message, *anchors):
        return gradient.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[1]

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(ctx.message)
