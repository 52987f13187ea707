"""Triton kernels of strictly causal attention (PixelSNAIL), flash-attention style, and their launchers.

The forward streams over key blocks with a running max and sum, keeping only the output and the
row log-sum-exp; the backward recomputes the scores block by block (one kernel per query block
for d(q), one per key block for d(k), d(v)), so memory stays proportional to the sequence length.
Row i attends to keys j < i; row 0 to none, and its output is 0. Products run at IEEE precision
(no TF32) so that float32 results match the reference.
"""

import torch
import triton
import triton.language as tl

from .iwae import _acc_dtype, _on_device

_BLOCK_M = 32
_BLOCK_N = 32


@triton.jit
def _load_rows(ptr, n, L, rows, row_mask, cols, width, ACC: tl.constexpr):
    """Tile [rows, cols] of example n of a contiguous [N, L, width] tensor, 0 outside, in ACC."""
    return tl.load(
        ptr + (n * L + rows)[:, None] * width + cols[None, :],
        mask=row_mask[:, None] & (cols[None, :] < width),
        other=0.0,
    ).to(ACC)


@triton.jit
def _store_rows(ptr, n, L, rows, row_mask, cols, width, value):
    """Writes value into tile [rows, cols] of example n of a contiguous [N, L, width] tensor."""
    tl.store(
        ptr + (n * L + rows)[:, None] * width + cols[None, :],
        value.to(ptr.dtype.element_ty),
        mask=row_mask[:, None] & (cols[None, :] < width),
    )


@triton.jit
def _scores(q, k, offs_m, offs_n, L, scale):
    """scale * q k^T on the allowed pairs (key before query, both in range), -inf elsewhere. A
    padding row (query past L) allows nothing: its zero q times a NaN key is NaN, which would reach
    d(v) through its zero dO."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    allowed = (offs_n[None, :] < offs_m[:, None]) & (offs_m[:, None] < L)
    return tl.where(allowed, s, float("-inf")), allowed


@triton.jit
def _causal_attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    L,
    D,
    DV,
    scale,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_mask = offs_m < L
    q = _load_rows(q_ptr, n, L, offs_m, row_mask, offs_d, D, ACC)
    top = tl.full([BLOCK_M], float("-inf"), ACC)
    total = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    # Keys before the block's last row only.
    for start in range(0, tl.program_id(0) * BLOCK_M + BLOCK_M, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N).to(tl.int64)
        key_mask = offs_n < L
        k = _load_rows(k_ptr, n, L, offs_n, key_mask, offs_d, D, ACC)
        v = _load_rows(v_ptr, n, L, offs_n, key_mask, offs_dv, DV, ACC)
        s, allowed = _scores(q, k, offs_m, offs_n, L, scale)
        new_top = tl.maximum(top, tl.max(s, 1))
        # A row with no key yet keeps -inf; shift it by 0 so that no -inf - -inf arises.
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)
        p = tl.where(allowed, tl.exp(s - shift[:, None]), 0.0)
        shrink = tl.exp(top - shift)
        total = total * shrink + tl.sum(p, 1)
        acc = acc * shrink[:, None] + tl.dot(p.to(ACC), v, input_precision="ieee")
        top = new_top
    # Row 0 has no keys: output 0, log-sum-exp -inf. A later row whose scores are all -inf (total
    # 0) or hold +inf or NaN (total NaN) has no softmax: NaN, as the reference's softmax gives.
    row_zero = offs_m == 0
    has_keys = total > 0
    out = tl.where(row_zero[:, None], 0.0, acc / tl.where(has_keys, total, float("nan"))[:, None])
    _store_rows(out_ptr, n, L, offs_m, row_mask, offs_dv, DV, out)
    lse = tl.where(
        row_zero, float("-inf"), tl.where(has_keys, top + tl.log(tl.where(has_keys, total, 1.0)), float("nan"))
    )
    tl.store(lse_ptr + n * L + offs_m, lse.to(lse_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _load_query_rows(
    q_ptr, g_ptr, lse_ptr, delta_ptr, n, L, offs_m, row_mask, offs_d, offs_dv, D, DV, ACC: tl.constexpr
):
    """q, dO, lse and delta of query rows offs_m of example n, in ACC. Row 0 attends to nothing:
    its q and dO are read as 0, so that an infinite or NaN one makes no 0 * inf in the products."""
    attending = row_mask & (offs_m > 0)
    q = _load_rows(q_ptr, n, L, offs_m, attending, offs_d, D, ACC)
    g = _load_rows(g_ptr, n, L, offs_m, attending, offs_dv, DV, ACC)
    lse = tl.load(lse_ptr + n * L + offs_m, mask=row_mask, other=float("-inf")).to(ACC)
    delta = tl.load(delta_ptr + n * L + offs_m, mask=row_mask, other=0.0).to(ACC)
    return q, g, lse, delta


@triton.jit
def _probabilities_and_score_grads(q, k, v, g, lse, delta, offs_m, offs_n, L, scale):
    """P_ij = exp(s_ij - lse_i) on the allowed pairs, 0 elsewhere (and on row 0, lse = -inf), and
    dS = P * (dO V^T - delta), the softmax backward: the gradient with respect to s.

    Where P_ij rounds to 1 the other weights of row i sum to below the rounding, and the true dS_ij
    = sum_{l != j} P_il (dP_ij - dP_il) is below it too; dP_ij - delta_i would be the rounding of
    two differently summed dot products instead (1e-7 relative, times the score scale in dq and dk),
    so it is taken as 0, as the reference's exactly one-hot softmax gives."""
    s, allowed = _scores(q, k, offs_m, offs_n, L, scale)
    safe_lse = tl.where(lse == float("-inf"), 0.0, lse)
    p = tl.where(allowed, tl.exp(s - safe_lse[:, None]), 0.0)
    ds = p * (tl.dot(g, tl.trans(v), input_precision="ieee") - delta[:, None])
    # Masked pairs are exactly 0, also where the row's delta is NaN or inf.
    return p, tl.where((p == 1.0) | ~allowed, 0.0, ds)


@triton.jit
def _causal_attention_bwd_dq_kernel(
    g_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    lse_ptr,
    delta_ptr,
    gq_ptr,
    L,
    D,
    DV,
    scale,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_mask = offs_m < L
    q, g, lse, delta = _load_query_rows(
        q_ptr, g_ptr, lse_ptr, delta_ptr, n, L, offs_m, row_mask, offs_d, offs_dv, D, DV, ACC
    )
    grad_q = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start in range(0, tl.program_id(0) * BLOCK_M + BLOCK_M, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N).to(tl.int64)
        key_mask = offs_n < L
        k = _load_rows(k_ptr, n, L, offs_n, key_mask, offs_d, D, ACC)
        v = _load_rows(v_ptr, n, L, offs_n, key_mask, offs_dv, DV, ACC)
        p, ds = _probabilities_and_score_grads(q, k, v, g, lse, delta, offs_m, offs_n, L, scale)
        grad_q += tl.dot(ds.to(ACC), k, input_precision="ieee")
    # Row 0 has no keys, so no gradient (its zero weights times an infinite k would be NaN).
    _store_rows(gq_ptr, n, L, offs_m, row_mask, offs_d, D, tl.where((offs_m > 0)[:, None], grad_q * scale, 0.0))


@triton.jit
def _causal_attention_bwd_dkv_kernel(
    g_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    lse_ptr,
    delta_ptr,
    gk_ptr,
    gv_ptr,
    L,
    D,
    DV,
    scale,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_mask = offs_n < L
    k = _load_rows(k_ptr, n, L, offs_n, key_mask, offs_d, D, ACC)
    v = _load_rows(v_ptr, n, L, offs_n, key_mask, offs_dv, DV, ACC)
    grad_k = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    grad_v = tl.zeros([BLOCK_N, BLOCK_DV], ACC)
    # Query blocks from the one holding this block's first key: earlier rows never see it.
    first = (tl.program_id(0) * BLOCK_N // BLOCK_M) * BLOCK_M
    for start in range(first, L, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = offs_m < L
        q, g, lse, delta = _load_query_rows(
            q_ptr, g_ptr, lse_ptr, delta_ptr, n, L, offs_m, row_mask, offs_d, offs_dv, D, DV, ACC
        )
        p, ds = _probabilities_and_score_grads(q, k, v, g, lse, delta, offs_m, offs_n, L, scale)
        grad_v += tl.dot(tl.trans(p).to(ACC), g, input_precision="ieee")
        grad_k += tl.dot(tl.trans(ds).to(ACC), q, input_precision="ieee")
    _store_rows(gk_ptr, n, L, offs_n, key_mask, offs_d, D, grad_k * scale)
    _store_rows(gv_ptr, n, L, offs_n, key_mask, offs_dv, DV, grad_v)


def _blocks(q: torch.Tensor, v: torch.Tensor) -> dict:
    # tl.dot takes tiles of at least 16 in every dim.
    return dict(
        ACC=_acc_dtype(q),
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(q.shape[2])),
        BLOCK_DV=max(16, triton.next_power_of_2(v.shape[2])),
    )


def causal_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output [N, L, Dv] and row log-sum-exp [N, L] of strictly causal attention over q, k [N, L, D], v [N, L, Dv]."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    N, L, D = q.shape
    out = torch.empty((N, L, v.shape[2]), dtype=q.dtype, device=q.device)
    lse = torch.empty((N, L), dtype=q.dtype, device=q.device)
    if N * L == 0:
        return out, lse
    with _on_device(q):
        _causal_attention_fwd_kernel[(triton.cdiv(L, _BLOCK_M), N)](
            q, k, v, out, lse, L, D, v.shape[2], scale, **_blocks(q, v)
        )
    return out, lse


def causal_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum(grad_out * out) with respect to q, k and v, the scores recomputed block by block."""
    q, k, v, lse = q.contiguous(), k.contiguous(), v.contiguous(), lse.contiguous()
    grad_out = grad_out.to(q.dtype).contiguous()
    N, L, D = q.shape
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if N * L == 0:
        return grad_q, grad_k, grad_v
    # delta_i = dO_i . O_i, the softmax backward's row term: [N, L].
    delta = (grad_out * out).sum(-1).contiguous()
    blocks = _blocks(q, v)
    with _on_device(q):
        _causal_attention_bwd_dq_kernel[(triton.cdiv(L, _BLOCK_M), N)](
            grad_out, q, k, v, lse, delta, grad_q, L, D, v.shape[2], scale, **blocks
        )
        # A key block holds k, v and both gradients across the query loop: at 4 warps ptxas needed
        # 255 registers and spilled (float32 on sm_80 and sm_90, half on sm_90, at the bench shape
        # N32 L784 D16 Dv32); 8 warps halve each thread's share (166-171 registers, no spills).
        _causal_attention_bwd_dkv_kernel[(triton.cdiv(L, _BLOCK_N), N)](
            grad_out, q, k, v, lse, delta, grad_k, grad_v, L, D, v.shape[2], scale, **blocks, num_warps=8
        )
    return grad_q, grad_k, grad_v
