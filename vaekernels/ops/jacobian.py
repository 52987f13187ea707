"""Decoder Jacobians without the Jacobian: squared column norms, Gram matrices JᵀJ and the GRAE /
GRAE* regulariser of Kumar & Poole (2020), for a decoder g and a batch of codes z [B, d].

An MLP decoder (``nn.Sequential`` of ``nn.Linear`` and elementwise activations, ending with an
``nn.Linear``) runs in forward mode: the tangents of every hidden layer along the wanted columns
are one block T [B, k, h], pushed through each linear layer by one matrix product (:func:`_mm`)
and through each activation by the fused op ``jacobian_tangent_step`` (act, act' and the scaling
of T in one pass, act'' in its backward). The last layer W [D, h] is never applied: J = T Wᵀ, so
JᵀJ = T (WᵀW) Tᵀ and the column norms are its diagonal, which ``jacobian_gram_reduce`` computes
and returns T M besides, so that the backward scales it (2 g (T M)) instead of multiplying again.
Where the block of tangents is small beside the layer (GRAE*'s one column a step: B k < 2h/3 or
so), J = T Wᵀ itself costs fewer products, and the fused backends form it instead: then J has
fewer entries than W. Otherwise no [B, D, d] tensor exists at any point, forward or backward.

Any other decoder (convolutional ones included) takes the general path: ``torch.func.jvp`` along
a chunk of columns at a time (norms), or for a chunk of examples at a time (Gram), sized so that
at most ``GENERAL_CHUNK_ELEMENTS`` Jacobian entries exist at once.

Kernels: csrc/cpu/jacobian.cpp and vaekernels/triton/jacobian.py; the readable oracle with the
same signatures is :mod:`vaekernels.reference.jacobian`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend
from ..reference import jacobian as reference
from ._checks import check_float, fail
from ._registry import define_triton_op, register

# Jacobian entries (batch x columns x outputs) the general path holds at once.
GENERAL_CHUNK_ELEMENTS = 1 << 22
# Columns per block of a product known to be symmetric (the metric's gradient): only the blocks
# on and below the diagonal are multiplied, 10 of 16 at h = 512. Smaller blocks multiply less but
# run further below the GEMM's peak rate.
SYMMETRIC_BLOCK = 128
# Rows of the tangent block weighted at a time in that product on CPU: the weighted copy is never
# whole (8 MB at B=128, d=32, h=512, which glibc's allocator would return and fault in again each
# step). Other devices take one chunk: fewer, larger products.
SYMMETRIC_CHUNK_ROWS = 1024

try:
    _onednn_linear = torch.ops.mkldnn._linear_pointwise
except (AttributeError, RuntimeError):  # a torch built without oneDNN
    _onednn_linear = None

if _backend.triton_available():
    from ..triton import jacobian as _triton

    for _name, _launcher in {
        "jacobian_tangent_step": _triton.jacobian_tangent_step_fwd,
        "jacobian_tangent_step_backward": _triton.jacobian_tangent_step_bwd,
        "jacobian_gram_reduce": _triton.jacobian_gram_reduce_fwd,
    }.items():
        define_triton_op(_name, _launcher)


# ----------------------------------------------------------------------------- matrix products


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of 2-d tensors. On CPU in float32, for a contiguous a, through oneDNN's matmul (the op
    ``mkldnn::_linear_pointwise`` that inductor lowers linear layers to): exact float32 like MKL's
    sgemm behind torch.mm, and 15-18% faster than it on the AMD EPYC of bench/RESULTS.md (as the
    CPU kernel's ``matmul_2d``). A product that autograd records (double backward) takes torch.mm,
    which has a derivative, and so does one that torch.compile traces: inductor has no lowering for
    this op on a weight it has not packed itself, and chooses its own kernel for a plain product."""
    if (
        _onednn_linear is not None
        and not torch.compiler.is_compiling()
        and a.device.type == "cpu"
        and a.dtype == b.dtype == torch.float32
        and torch.backends.mkldnn.enabled
        and a.is_contiguous()
        and (b.is_contiguous() or b.t().is_contiguous())
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
    ):
        return _onednn_linear(a, b.t(), None, "none", [], "")
    return a @ b


def _weighted_symmetric_product(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """rowsᵀ diag(weights) rows [h, h] for rows [n, h]: for each band of :data:`SYMMETRIC_BLOCK`
    output rows, only the columns up to its diagonal block are multiplied, the rest are the
    transposes; the weighted rows are formed :data:`SYMMETRIC_CHUNK_ROWS` at a time. Recorded by
    autograd (double backward), the plain product, which has a derivative."""
    if torch.is_grad_enabled() and (rows.requires_grad or weights.requires_grad):
        return rows.t() @ (rows * weights[:, None])
    h = rows.shape[1]
    lower = rows.new_zeros(h, h)
    bands = [lower[r : r + SYMMETRIC_BLOCK, : r + SYMMETRIC_BLOCK] for r in range(0, h, SYMMETRIC_BLOCK)]
    # One buffer for every chunk: a new one each time would be returned to the system and
    # faulted in again under glibc's defaults.
    chunk_rows = SYMMETRIC_CHUNK_ROWS if rows.device.type == "cpu" else max(rows.shape[0], 1)
    buffer = rows.new_empty(min(chunk_rows, rows.shape[0]), h)
    for first in range(0, rows.shape[0], chunk_rows):
        chunk = rows[first : first + chunk_rows]
        weighted = torch.mul(chunk, weights[first : first + chunk_rows, None], out=buffer[: chunk.shape[0]])
        for r, band in zip(range(0, h, SYMMETRIC_BLOCK), bands):
            band.addmm_(chunk[:, r : r + SYMMETRIC_BLOCK].t(), weighted[:, : band.shape[1]])
    return lower.tril() + lower.tril(-1).t()


class _TangentLinear(torch.autograd.Function):
    """A tangent block [P, k, h_in] through a linear layer's weight [h_out, h_in], no bias: the
    products with the weight through :func:`_mm` (autograd's matmul takes torch.mm); the weight's
    gradient, whose left operand is a transposed view, stays on torch.mm, as fast as oneDNN there."""

    @staticmethod
    def forward(tangent, weight):
        return _mm(tangent.reshape(-1, tangent.shape[-1]), weight.t()).view(*tangent.shape[:-1], weight.shape[0])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        tangent, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        grad_tangent = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_tangent = _mm(rows.contiguous(), weight).view(tangent.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = rows.t() @ tangent.reshape(-1, tangent.shape[-1])
        return grad_tangent, grad_weight


# ----------------------------------------------------------------------------- jacobian_tangent_step


def _tangent_step_fake(pre, tangent, activation, p0, p1):
    return pre.new_empty(pre.shape), pre.new_empty(pre.shape[0], tangent.shape[1], pre.shape[1])


def _tangent_step_backward_fake(grad_out, grad_tangent, pre, tangent, activation, p0, p1):
    # A shared tangent [1, k, h] gets its gradient summed over the batch.
    return pre.new_empty(pre.shape), tangent.new_empty(tangent.shape)


def _save_tangent_step(ctx, inputs, output):
    pre, tangent, ctx.activation, ctx.p0, ctx.p1 = inputs
    ctx.save_for_backward(pre, tangent)
    # The last hidden layer's activations feed nothing: their gradient stays None, not zeros.
    ctx.set_materialize_grads(False)


def _make_tangent_step_backward(ops):
    def backward(ctx, grad_out, grad_tangent):
        pre, tangent = ctx.saved_tensors
        if grad_tangent is None:
            grad_tangent = pre.new_zeros(pre.shape[0], tangent.shape[1], pre.shape[1])
        grad_pre, grad_tangent_in = ops.jacobian_tangent_step_backward(
            grad_out, grad_tangent, pre, tangent, ctx.activation, ctx.p0, ctx.p1
        )
        return grad_pre, grad_tangent_in, None, None, None

    return backward


register("jacobian_tangent_step", _tangent_step_fake, _save_tangent_step, _make_tangent_step_backward)
register("jacobian_tangent_step_backward", _tangent_step_backward_fake)


# ----------------------------------------------------------------------------- jacobian_gram_reduce


def _gram_reduce_fake(tangent, metric, diagonal):
    batch, k = tangent.shape[:2]
    out = tangent.new_empty(batch, k) if diagonal else tangent.new_empty(batch, k, k)
    return out, tangent.new_empty(tangent.shape)


def _save_gram_reduce(ctx, inputs, output):
    tangent, metric, ctx.diagonal = inputs
    ctx.save_for_backward(tangent, metric, output[1])
    # T M is rarely used downstream: its gradient stays None, not a [B, k, h] block of zeros.
    ctx.set_materialize_grads(False)


def _make_gram_reduce_backward(ops):
    # Elementwise work and matrix products only, so torch's GEMMs (oneDNN or MKL on CPU, cuBLAS on
    # CUDA) serve both namespaces. The tangent gradient uses the symmetry of the metric (WᵀW) and
    # reuses T M: for the norms it is 2 g (T M), no product at all. The metric's gradient is exact
    # for any M.
    def backward(ctx, grad, grad_tm):
        tangent, metric, tm = ctx.saved_tensors
        h = tangent.shape[-1]
        rows = tangent.reshape(-1, h)
        grad_tangent = grad_metric = None
        if grad is None:
            grad = tangent.new_zeros(tangent.shape[:2] if ctx.diagonal else (*tangent.shape[:2], tangent.shape[1]))
        if ctx.diagonal:
            grad = grad.to(tangent.dtype).unsqueeze(-1)
            if ctx.needs_input_grad[0]:
                grad_tangent = tm * (2 * grad)
            if ctx.needs_input_grad[1]:
                # Σ_b T_bᵀ diag(g_b) T_b is symmetric: half of its product is enough.
                grad_metric = _weighted_symmetric_product(rows, grad.reshape(-1))
        else:
            grad = grad.to(tangent.dtype)
            if ctx.needs_input_grad[0]:
                grad_tangent = (grad + grad.transpose(1, 2)) @ tm
            if ctx.needs_input_grad[1]:
                grad_metric = rows.t() @ (grad @ tangent).reshape(-1, h)
        if grad_tm is not None:
            grad_tm = grad_tm.to(tangent.dtype)
            if ctx.needs_input_grad[0]:
                grad_tangent = grad_tangent + grad_tm @ metric.t()
            if ctx.needs_input_grad[1]:
                grad_metric = grad_metric + rows.t() @ grad_tm.reshape(-1, h)
        return grad_tangent, grad_metric, None

    return backward


register(
    "jacobian_gram_reduce", _gram_reduce_fake, _save_gram_reduce, _make_gram_reduce_backward, twice_differentiable=True
)


class _SelfGram(torch.autograd.Function):
    """WᵀW with the backward of a symmetric product: dW = W (G + Gᵀ), one GEMM where autograd's
    matmul backward takes two."""

    @staticmethod
    def forward(weight):
        return weight.t() @ weight  # a transposed left operand, which _mm would send to torch.mm anyway

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return _mm(weight, grad + grad.t())


def _self_gram(weight: torch.Tensor) -> torch.Tensor:
    return _SelfGram.apply(weight)


# ----------------------------------------------------------------------------- decoders


_ACTIVATION_MODULES: dict[type, Callable[[nn.Module], tuple[str, float, float] | None]] = {
    nn.Tanh: lambda m: ("tanh", 0.0, 0.0),
    nn.Sigmoid: lambda m: ("sigmoid", 0.0, 0.0),
    nn.ReLU: lambda m: ("relu", 0.0, 0.0),
    nn.LeakyReLU: lambda m: ("leaky_relu", float(m.negative_slope), 0.0),
    nn.Softplus: lambda m: ("softplus", float(m.beta), float(m.threshold)),
    nn.ELU: lambda m: ("elu", float(m.alpha), 0.0),
    nn.GELU: lambda m: ("gelu", 0.0, 0.0) if m.approximate == "none" else None,
}


def _flatten(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _flatten(child)]
    return [] if isinstance(module, nn.Identity) else [module]


def mlp_plan(decoder) -> list | None:
    """The layers of an MLP decoder the fused path runs, as ``nn.Linear`` modules and
    (activation, p0, p1) triples; None when the decoder is anything else (the general path)."""
    if not isinstance(decoder, nn.Sequential):
        return None
    plan = []
    for module in _flatten(decoder):
        if isinstance(module, nn.Linear):
            plan.append(module)
            continue
        spec = _ACTIVATION_MODULES.get(type(module))
        spec = spec(module) if spec is not None else None
        if spec is None:
            return None
        plan.append(spec)
    return plan if plan and isinstance(plan[-1], nn.Linear) else None


def _check_z(fn: str, z) -> None:
    check_float(fn, "z", z)
    if z.dim() != 2:
        fail(fn, f"z must have shape [B, d], got {list(z.shape)}")
    if z.shape[0] == 0 or z.shape[1] == 0:
        fail(fn, f"z must have a non-empty batch and latent dim, got shape {list(z.shape)}")


def _check_decoder(fn: str, decoder, z: torch.Tensor) -> None:
    """decoder must be callable, and an nn.Module's floating-point parameters of z's dtype and device."""
    if not callable(decoder):
        fail(fn, f"decoder must be an nn.Module or a callable, got {type(decoder).__name__}", TypeError)
    if isinstance(decoder, nn.Module):
        parameter = next((p for p in decoder.parameters() if p.is_floating_point()), None)
        if parameter is not None:
            check_float(fn, "z", z, parameter, "the decoder's parameters")


def _column_index(fn: str, columns, d: int, device: torch.device) -> torch.Tensor | None:
    if columns is None:
        return None
    try:
        index = torch.as_tensor(columns, device=device)
    except (TypeError, ValueError, RuntimeError):
        fail(fn, f"columns must be a non-empty 1-d sequence of integer column indices, got {columns!r}", TypeError)
    if index.dim() != 1 or index.numel() == 0 or index.dtype.is_floating_point or index.dtype == torch.bool:
        fail(fn, f"columns must be a non-empty 1-d sequence of integer column indices, got {columns!r}")
    if not torch.compiler.is_compiling():
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= d:
            fail(
                fn,
                f"columns must lie in [0, {d - 1}] (z has d = {d} columns), got {low if low < 0 else high}",
                IndexError,
            )
    return index.long()


def _propagate(fn: str, plan: list, z: torch.Tensor, columns: torch.Tensor | None, diagonal: bool) -> torch.Tensor:
    """Forward mode through the MLP ``plan``: T M Tᵀ (or its diagonal) of the last hidden layer's
    tangents T along ``columns`` (all when None) and M = WᵀW of the last linear layer."""
    batch, d = z.shape
    first = plan[0]
    width = first.in_features if isinstance(first, nn.Linear) else None
    if width is not None and width != d:
        fail(
            fn,
            f"z must have shape [B, {width}] (the decoder's first nn.Linear takes {width} features), "
            f"got {list(z.shape)}",
        )
    backend = _backend.choose("jacobian_tangent_step", z.device, z.dtype)
    if backend == "reference":
        step, reduce = reference.jacobian_tangent_step, reference.jacobian_gram_reduce
    else:
        step, reduce = _backend.ops(backend).jacobian_tangent_step, _backend.ops(backend).jacobian_gram_reduce

    def identity_columns():
        eye = torch.eye(d, dtype=z.dtype, device=z.device)
        return (eye if columns is None else eye[columns]).unsqueeze(0)

    hidden, tangent = z, None  # None: the tangent of z itself, the selected unit vectors
    for layer in plan[:-1]:
        if isinstance(layer, nn.Linear):
            hidden = F.linear(hidden, layer.weight, layer.bias)
            if tangent is None:
                weight = layer.weight if columns is None else layer.weight[:, columns]
                tangent = weight.t().unsqueeze(0)  # shared by the batch until an activation
            else:
                tangent = _TangentLinear.apply(tangent, layer.weight)
        else:
            hidden, tangent = step(hidden, identity_columns() if tangent is None else tangent, *layer)
    tangent = identity_columns() if tangent is None else tangent
    if tangent.shape[0] != batch:
        tangent = tangent.expand(batch, -1, -1).contiguous()
    weight = plan[-1].weight
    # The fused backends pick the cheaper order of the same products; the reference keeps the
    # readable T (WᵀW) Tᵀ.
    if backend != "reference" and _direct_is_cheaper(batch, tangent.shape[1], *weight.shape, diagonal):
        return _reduce_directly(tangent, weight, diagonal)
    metric = _self_gram(weight)
    # T (WᵀW) Tᵀ equals (T Wᵀ)(T Wᵀ)ᵀ only in finite arithmetic: an infinite weight (or one whose
    # square overflows) makes WᵀW hold infinities of both signs, and their sum inf - inf = NaN
    # where the Jacobian's column is infinite. Then J = T Wᵀ is formed directly, as the forward-
    # mode reference does. Checked on the host (one sync off the CPU), except while compiling.
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(metric).all() & torch.isfinite(tangent).all()):
        return _reduce_directly(tangent, weight, diagonal)
    return reduce(tangent, metric, diagonal)[0]


def _direct_is_cheaper(batch: int, k: int, outputs: int, hidden: int, diagonal: bool) -> bool:
    """Whether J = T Wᵀ [B, k, D] costs fewer multiply-adds, forward and backward, than the metric
    M = WᵀW [h, h] and T M: 3 B k h D against 2 D h² + 1.5 B k h² (the metric's symmetric backward
    halves one product), plus the Gram's own k² products of D or h terms. GRAE* (one column of a
    batch of 100, h = 256, D = 784) takes J; GRAE's eight columns take the metric."""
    rows = batch * k
    gram = 0 if diagonal else 3 * rows * k
    direct = 3 * rows * hidden * outputs + gram * outputs
    return direct < 2 * outputs * hidden**2 + 1.5 * rows * hidden**2 + gram * hidden


def _reduce_directly(tangent: torch.Tensor, weight: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """diag(J Jᵀ) or J Jᵀ per example of J = T Wᵀ [B, k, D], made for a chunk of examples at a time
    (at most :data:`GENERAL_CHUNK_ELEMENTS` entries of J at once): the MLP path where that order is
    the cheaper one, or where WᵀW is not finite."""
    batch, k, _ = tangent.shape
    chunk = max(1, GENERAL_CHUNK_ELEMENTS // max(1, k * weight.shape[0]))
    parts = []
    for part in tangent.split(chunk):
        jac = _TangentLinear.apply(part, weight)
        parts.append(jac.square().sum(-1) if diagonal else jac @ jac.transpose(1, 2))
    return torch.cat(parts)


def _jvp_along(fn: str, decoder, z: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """The decoder's output tangents along ``directions`` [c, B, d]: [c, B, D], output flattened."""

    def along(direction):
        return torch.func.jvp(decoder, (z,), (direction,))[1]

    try:
        tangents = torch.func.vmap(along)(directions)
    except (RuntimeError, NotImplementedError, TypeError) as error:
        fail(
            fn,
            f"decoder could not be differentiated in forward mode (torch.func.jvp) at z of shape "
            f"{list(z.shape)}: {error}",
        )
    if not tangents.is_floating_point():
        fail(fn, f"decoder must return a floating-point tensor to be differentiable, got {tangents.dtype}")
    return tangents.flatten(2)


def _unit_directions(z: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """[c, B, d]: the unit vector of column columns[j] for every example, for each j."""
    directions = z.new_zeros(len(columns), *z.shape)
    directions[torch.arange(len(columns), device=z.device), :, columns] = 1
    return directions


def _general_column_norms(fn: str, decoder, z: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    batch = z.shape[0]
    first = _jvp_along(fn, decoder, z, _unit_directions(z, columns[:1]))
    chunk = max(1, GENERAL_CHUNK_ELEMENTS // (batch * first.shape[-1]))
    norms = [first.square().sum(-1)]
    for start in range(1, len(columns), chunk):
        norms.append(_jvp_along(fn, decoder, z, _unit_directions(z, columns[start : start + chunk])).square().sum(-1))
    return torch.cat(norms).t()


def _general_gram(fn: str, decoder, z: torch.Tensor) -> torch.Tensor:
    # Chunks of examples with all d columns each: every example's decoder output must depend on
    # its own code only (no batch statistics), as for any per-example Jacobian.
    d = z.shape[1]
    columns = torch.arange(d, device=z.device)

    def gram(chunk_z):
        jac = _jvp_along(fn, decoder, chunk_z, _unit_directions(chunk_z, columns))  # [d, b, D]
        return torch.einsum("ibn,jbn->bij", jac, jac), jac.shape[-1]

    first, outputs = gram(z[:1])
    chunk = max(1, GENERAL_CHUNK_ELEMENTS // (d * outputs))
    return torch.cat([first, *(gram(part)[0] for part in z[1:].split(chunk))])


# ----------------------------------------------------------------------------- public functions


def jacobian_column_sq_norms(
    decoder, z: torch.Tensor, columns: Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """‖∂g(z)/∂z_i‖² per example for every column i of the decoder Jacobian, or those in ``columns``.

    ``decoder`` maps z [B, d] to [B, *out] (flattened to D); returns [B, d] (or [B, len(columns)]).
    Differentiable in z and in the decoder's parameters; the [B, D, d] Jacobian is never built
    where it would outgrow the decoder's last weight: see the module docstring for the MLP and the
    general paths. NaN and ±inf: a non-finite code or
    parameter gives a non-finite value in the columns it reaches, no error: NaN for a NaN, inf for a
    column that an infinite weight reaches, and NaN where forward mode itself meets inf * 0 (an
    infinite weight behind a zero derivative, as in the reference); saturated activations (codes of
    +-30 through tanh) give finite, exact columns. Non-finite or overflowing products take J = T Wᵀ
    directly (see ``_propagate``), so the answer does not depend on WᵀW being finite.

    Example:
        >>> import torch, vaekernels
        >>> decoder = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
        >>> vaekernels.jacobian_column_sq_norms(decoder, torch.zeros(3, 2)).shape
        torch.Size([3, 2])
        >>> linear = torch.nn.Sequential(torch.nn.Linear(2, 4, bias=False))
        >>> _ = torch.nn.init.ones_(linear[0].weight)
        >>> vaekernels.jacobian_column_sq_norms(linear, torch.zeros(1, 2), columns=[1]).tolist()
        [[4.0]]
    """
    fn = "jacobian_column_sq_norms"
    _check_z(fn, z)
    _check_decoder(fn, decoder, z)
    return _column_sq_norms(fn, decoder, z, _column_index(fn, columns, z.shape[1], z.device))


def _column_sq_norms(fn: str, decoder, z: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """:func:`jacobian_column_sq_norms` after its checks, with errors naming ``fn``, the public caller."""
    plan = mlp_plan(decoder)
    if plan is not None:
        return _propagate(fn, plan, z, index, diagonal=True)
    return _general_column_norms(fn, decoder, z, torch.arange(z.shape[1], device=z.device) if index is None else index)


def jacobian_gram(decoder, z: torch.Tensor) -> torch.Tensor:
    """JᵀJ [B, d, d] of the decoder Jacobian J [D, d] at each code; its diagonal is
    :func:`jacobian_column_sq_norms`. Differentiable; builds the [B, D, d] Jacobian only where it
    is smaller than the decoder's last weight.
    NaN and ±inf: as :func:`jacobian_column_sq_norms`; an entry between two infinite columns is
    ±inf (or NaN where their infinite terms cancel), as J's own products give it.

    Example:
        >>> import torch, vaekernels
        >>> decoder = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))
        >>> gram = vaekernels.jacobian_gram(decoder, torch.randn(4, 3))
        >>> gram.shape, torch.allclose(gram, gram.transpose(1, 2))
        (torch.Size([4, 3, 3]), True)
    """
    fn = "jacobian_gram"
    _check_z(fn, z)
    _check_decoder(fn, decoder, z)
    return _gram(fn, decoder, z)


def _gram(fn: str, decoder, z: torch.Tensor) -> torch.Tensor:
    """:func:`jacobian_gram` after its checks, with errors naming ``fn``, the public caller."""
    plan = mlp_plan(decoder)
    if plan is not None:
        return _propagate(fn, plan, z, None, diagonal=False)
    return _general_gram(fn, decoder, z)


def grae_regularizer(
    decoder,
    z: torch.Tensor,
    beta: float,
    *,
    exact: bool = False,
    num_columns: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The decoder-Jacobian regulariser of GRAE / GRAE* (Kumar & Poole 2020), per example [B].

    - default (GRAE*): Σ_i log(1 + ‖J_i‖²/β), the upper bound of the log-determinant;
    - ``num_columns=m``: its unbiased estimate from m distinct columns drawn uniformly (with
      ``generator``), shared by the batch, scaled by d / m;
    - ``exact=True`` (GRAE): log det(I + JᵀJ/β), through a Cholesky factor of the Gram matrix.

    The GRAE objective adds (β/2) times this to ½‖x − g(h(x))‖² + (β/2)‖h(x)‖².

    Example:
        >>> import torch, vaekernels
        >>> decoder = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
        >>> z = torch.randn(3, 2)
        >>> exact = vaekernels.grae_regularizer(decoder, z, 0.5, exact=True)
        >>> bound = vaekernels.grae_regularizer(decoder, z, 0.5)
        >>> bool((exact <= bound + 1e-5).all())
        True
    """
    check_grae_settings("grae_regularizer", beta, exact, num_columns)
    return _grae_regularizer("grae_regularizer", decoder, z, beta, exact, num_columns, generator)


def check_grae_settings(fn: str, beta, exact, num_columns) -> None:
    """The regulariser's settings, apart from z (num_columns <= d is checked against z)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0 or not math.isfinite(beta):
        fail(fn, f"beta must be a positive number (and finite), got {beta!r}")
    if not isinstance(exact, bool):
        fail(fn, f"exact must be a bool, got {type(exact).__name__} {exact!r}", TypeError)
    if exact and num_columns is not None:
        fail(fn, f"num_columns samples the columns of the GRAE* bound; exact=True takes none, got {num_columns!r}")
    if num_columns is not None and (
        isinstance(num_columns, bool) or not isinstance(num_columns, int) or num_columns < 1
    ):
        fail(fn, f"num_columns must be a positive int or None, got {num_columns!r}")


def _grae_regularizer(fn: str, decoder, z, beta, exact, num_columns, generator) -> torch.Tensor:
    """:func:`grae_regularizer` after the settings' check, its errors naming ``fn``, the public caller."""
    _check_z(fn, z)
    _check_decoder(fn, decoder, z)
    d = z.shape[1]
    if num_columns is not None and num_columns > d:
        fail(fn, f"num_columns must be an integer in [1, {d}] (z has d = {d} columns), got {num_columns!r}")
    if exact:
        eye = torch.eye(d, dtype=z.dtype, device=z.device)
        # cholesky_ex: a Gram matrix with a NaN or inf (a non-finite code or weight) gives NaN for
        # that example, as the reference's logdet does, instead of raising for the whole batch.
        factor, info = torch.linalg.cholesky_ex(eye + _gram(fn, decoder, z) / beta)
        return torch.where(info == 0, 2 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1), float("nan"))
    if num_columns is None:
        return torch.log1p(_column_sq_norms(fn, decoder, z, None) / beta).sum(-1)
    columns = reference.sample_columns(d, num_columns, generator).to(z.device)
    return torch.log1p(_column_sq_norms(fn, decoder, z, columns) / beta).sum(-1) * (d / num_columns)
