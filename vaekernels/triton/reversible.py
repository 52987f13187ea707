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
    stream = tl.load(stream_ptr + offsets, mask=mask)
    update = tl.load(update_ptr + offsets, mask=mask).to(stream.dtype)
    tl.store(stream_ptr + offsets, stream - update, mask=mask)
    grad = tl.load(grad_ptr + offsets, mask=mask)
    grad_update = tl.load(grad_update_ptr + offsets, mask=mask).to(grad.dtype)
    tl.store(grad_ptr + offsets, grad + grad_update, mask=mask)


def coupling_backward_step(stream: torch.Tensor, update: torch.Tensor, grad: torch.Tensor,
                           grad_update: torch.Tensor) -> None:
    """``stream -= update; grad += grad_update`` on contiguous tensors of one shape, in place."""
    n = stream.numel()
    if n == 0:
        return
    with _on_device(stream):
        _coupling_backward_step_kernel[(triton.cdiv(n, _BLOCK),)](
            stream, update, grad, grad_update, n, BLOCK=_BLOCK, num_warps=4)
