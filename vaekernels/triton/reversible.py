"""Triton kernel of the reversible family, and its launcher.

One step of a coupling block's backward walk, in place: ``stream -= update`` rebuilds a half of
the block's input from its output (x2 = y2 - G(y1) into y2's buffer) and ``grad += grad_update``
adds the gradient the recomputed branch sent to the other half, in one pass over the four
tensors. ``update`` and ``grad_update`` may be of a narrower dtype than the streams (bf16 F and
G under autocast, float32 residual streams): they are loaded and converted in registers, so no
float32 copy of them is made. Offsets are 64-bit.
"""

import torch
import triton
import triton.language as tl

from .iwae import _on_device

_BLOCK = 1024


@triton.jit
def _coupling_backward_step_kernel(stream_ptr, update_ptr, grad_ptr, grad_update_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    # In float32 (float64 for float64 streams), rounded once on the store: the exact difference
    # and sum of two half-precision values, rounded, as PyTorch's half-precision ops give. (The
    # interpreter's own bfloat16 arithmetic gave NaN in a fifth of the outputs.)
    ACC: tl.constexpr = tl.float64 if stream_ptr.dtype.element_ty == tl.float64 else tl.float32
    stream = tl.load(stream_ptr + offsets, mask=mask).to(ACC)
    update = tl.load(update_ptr + offsets, mask=mask).to(ACC)
    tl.store(stream_ptr + offsets, (stream - update).to(stream_ptr.dtype.element_ty), mask=mask)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(ACC)
    grad_update = tl.load(grad_update_ptr + offsets, mask=mask).to(ACC)
    tl.store(grad_ptr + offsets, (grad + grad_update).to(grad_ptr.dtype.element_ty), mask=mask)


def coupling_backward_step(
    stream: torch.Tensor, update: torch.Tensor, grad: torch.Tensor, grad_update: torch.Tensor
) -> None:
    """``stream -= update; grad += grad_update`` on contiguous tensors of one shape, in place."""
    n = stream.numel()
    if n == 0:
        return
    with _on_device(stream):
        _coupling_backward_step_kernel[(triton.cdiv(n, _BLOCK),)](
            stream, update, grad, grad_update, n, BLOCK=_BLOCK, num_warps=4
        )
