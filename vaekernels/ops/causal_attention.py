"""Strictly causal attention for PixelSNAIL-style blocks, in memory linear in the sequence length.

Custom op registration (fake + autograd) -> public function. Kernels: csrc/cpu/causal_attention.cpp
and vaekernels/triton/causal_attention.py; the readable oracle with the same signature is
:mod:`vaekernels.reference.causal_attention`.
"""

from __future__ import annotations

import math

import torch

from .. import _backend
from ..reference import causal_attention as reference
from ._checks import check_float, check_real, fail
from ._registry import define_triton_op, register

if _backend.triton_available():
    from ..triton import causal_attention as _triton

    define_triton_op("causal_attention", _triton.causal_attention_fwd)
    define_triton_op("causal_attention_backward", _triton.causal_attention_bwd)


def _attention_fake(q, k, v, scale):
    return q.new_empty((*q.shape[:2], v.shape[2])), q.new_empty(q.shape[:2])


def _attention_backward_fake(grad_out, q, k, v, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save_for_backward(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)


def _make_attention_backward(ops):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        return (*ops.causal_attention_backward(grad_out, q, k, v, out, lse, ctx.scale), None)

    return backward


register("causal_attention", _attention_fake, _save_for_backward, _make_attention_backward)
register("causal_attention_backward", _attention_backward_fake)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Softmax attention in which position i attends only to positions j < i (raster order).

    Args:
        q, k: [..., L, D] queries and keys; v: [..., L, Dv] values (same leading dims).
        scale: the score scale, 1 / sqrt(D) by default.

    Returns [..., L, Dv]: row i is sum_{j<i} softmax_j(scale q_i . k_j) v_j. Row 0 attends to
    nothing and is exactly 0, so no output depends on its own position or a later one
    (PixelSNAIL's queries come from the current pixel's features, its keys and values from the
    earlier pixels'). That holds to the bit for finite inputs; an inf or NaN at a later position
    can reach earlier rows of its tile of positions (64 on CPU) as 0 * inf, as in the reference's
    [L, L] product. Row 0's q and output gradient reach nothing, even infinite or NaN. NaN and
    ±inf otherwise: a NaN reaches the rows that attend to its position; a row whose scores hold
    +inf or NaN, or are all -inf (no softmax: 0 / 0), is NaN, and so are the gradients it reaches;
    a saturated softmax (scale 1e4) gives finite outputs, with the gradients of a one-hot softmax
    row (row 1, which sees one key, included) exactly 0 in its scores, as the reference's. The
    score matrix is never
    formed: the forward keeps a running max and sum
    over tiles of keys and saves only the output and a row log-sum-exp; the backward recomputes
    the scores. Memory is O(L), not O(L^2).

    Example:
        >>> import torch, vaekernels
        >>> q = k = v = torch.randn(2, 4, 9, 8)  # [batch, heads, positions, dim]
        >>> out = vaekernels.causal_attention(q, k, v)
        >>> out.shape, out[..., 0, :].abs().max().item()
        (torch.Size([2, 4, 9, 8]), 0.0)
    """
    fn = "causal_attention"
    check_float(fn, "q", q)
    check_float(fn, "k", k, q, "q")
    check_float(fn, "v", v, q, "q")
    if q.dim() < 2:
        fail(fn, f"q must have shape [..., L, D], got {list(q.shape)}")
    if k.shape != q.shape:
        fail(fn, f"k must have q's shape [..., L, D] = {list(q.shape)}, got {list(k.shape)}")
    if v.dim() != q.dim() or v.shape[:-1] != q.shape[:-1]:
        fail(fn, f"v must have shape [..., L, Dv] = {list(q.shape[:-1])} + [Dv], got {list(v.shape)}")
    if q.shape[-1] == 0:
        fail(fn, "q must have a non-empty last dim (D >= 1), got D = 0")
    if q.shape[-2] == 0:
        fail(fn, f"q must have at least one position (L >= 1), got shape {list(q.shape)}")
    if v.shape[-1] == 0:
        fail(fn, f"v must have a non-empty last dim (Dv >= 1), got shape {list(v.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else check_real(fn, "scale", scale)
    backend = _backend.choose(fn, q.device, q.dtype)
    if backend == "reference":
        return reference.causal_attention(q, k, v, scale)
    lead, (L, D), Dv = q.shape[:-2], q.shape[-2:], v.shape[-1]
    out, _ = _backend.ops(backend).causal_attention(
        q.reshape(-1, L, D).contiguous(), k.reshape(-1, L, D).contiguous(), v.reshape(-1, L, Dv).contiguous(), scale
    )
    return out.reshape(*lead, L, Dv)
