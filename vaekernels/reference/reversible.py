"""Reversible networks in plain PyTorch: the test oracle and the benchmark baseline.

:func:`reversible_sequential` runs the same blocks as :func:`vaekernels.reversible_sequential`
as an ordinary network, keeping every activation for backward; :func:`coupling_backward_step`
is the arithmetic of one step of the reversible backward walk.
"""

from __future__ import annotations

import torch


def coupling_backward_step(
    stream: torch.Tensor, update: torch.Tensor, grad: torch.Tensor, grad_update: torch.Tensor
) -> None:
    """``stream -= update; grad += grad_update``, in place (x2 = y2 - G(y1) into y2's buffer)."""
    stream.sub_(update)
    grad.add_(grad_update)


def reversible_sequential(
    blocks, x: torch.Tensor, *, preserve_rng_state: bool = True, stream_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks applied in order by ordinary autograd; returns (y, summed log-determinant [B]).

    ``preserve_rng_state`` has nothing to preserve here; it is accepted for the signature.
    """
    del preserve_rng_state
    if stream_dtype is not None:
        x = x.to(stream_dtype)
    logdet = x.new_zeros(x.shape[0])
    for block in blocks:
        out = block(x)
        if isinstance(out, tuple):
            x, block_logdet = out
            logdet = logdet + block_logdet
        else:
            x = out
    return x, logdet
