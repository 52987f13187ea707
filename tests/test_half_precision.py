"""Every Triton op on float16 and bfloat16 inputs, forward and backward, against the float32 reference.

The reference runs in float32 on the same values (the half-precision inputs widened), so input
rounding is not counted: what is left is the kernels' (loads in half, compute in float32, one
rounding on the store) and the rounding of the intermediate tensors the op keeps in the input
dtype. The bound on each relative error ||out - ref|| / ||ref|| is ``ROUNDING[dtype]`` (the
dtype's unit roundoff: float16 2^-11, bfloat16 2^-8) times a factor per op that the op's
intermediates explain (see CASES). On CPU the kernels run in the Triton interpreter, which rounds
float32 to bfloat16 toward zero where a GPU rounds to nearest: at most one more unit roundoff.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import pytest
import torch
from conftest import rel_err
from torch import nn

import vaekernels
from vaekernels.reference import logistic_mixture

HALVES = (torch.float16, torch.bfloat16)
ROUNDING = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(
    "triton" not in vaekernels.available_backends(),
    reason="needs triton (CI has it: test_triton_of_the_test_extra_is_importable)",
)


@dataclasses.dataclass(frozen=True)
class Case:
    make_inputs: Callable[[torch.Generator], tuple]  # float32 leaves (and non-float tensors)
    run: Callable[..., torch.Tensor]  # inputs -> one tensor, its sum is differentiated
    factor: float  # the bound in units of the dtype's rounding, forward and backward
    module: Callable[[], nn.Module] | None = None  # parameters cast with the inputs


def _randn(g, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).requires_grad_()


def _binary(g, *shape):
    return torch.bernoulli(torch.full(shape, 0.5), generator=g)


def _decoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 24), nn.Tanh(), nn.Linear(24, 24), nn.Softplus(), nn.Linear(24, 10))


def _coupling(stream, update, grad, grad_update):
    # In place on copies: the step's outputs as one tensor; its gradient is not an op of ours.
    stream, grad = stream.detach().clone(), grad.detach().clone()
    vaekernels.coupling_backward_step(stream, update.detach(), grad, grad_update.detach())
    return torch.cat([stream.flatten(), grad.flatten()])


# Factors: 2 where the op rounds once on the store (the interpreter's bfloat16 truncation taking
# the other unit); more where a half-precision intermediate or PyTorch ops in the input dtype add
# roundings, as noted per case. The errors measured on the interpreter are in bench/RESULTS.md.
CASES = {
    "log_mean_exp": Case(lambda g: (_randn(g, 6, 40, scale=3.0),), vaekernels.log_mean_exp, 2),
    "bernoulli_log_prob": Case(
        lambda g: (_randn(g, 3, 5, 70, scale=2.0), _binary(g, 3, 70)), vaekernels.bernoulli_log_prob, 2
    ),
    # The backward is PyTorch ops in the input dtype, a rounding each.
    "gaussian_log_prob": Case(
        lambda g: (_randn(g, 3, 5, 9), _randn(g, 3, 1, 9), _randn(g, 9, scale=0.5)), vaekernels.gaussian_log_prob, 4
    ),
    "gaussian_kl": Case(lambda g: (_randn(g, 7, 9), _randn(g, 7, 9, scale=0.5)), vaekernels.gaussian_kl, 2),
    "iwae_bound": Case(
        lambda g: (_randn(g, 3, 6, 70, scale=2.0), _binary(g, 3, 70), _randn(g, 3, 6), _randn(g, 3, 6)),
        vaekernels.iwae_bound,
        2,
    ),
    "aggregate_posterior_log_density": Case(
        lambda g: (_randn(g, 9, 4), _randn(g, 9, 4), _randn(g, 9, 4, scale=0.3)),
        vaekernels.aggregate_posterior_log_density,
        2,
    ),
    # Per dimension: the kernels' marginal path.
    "aggregate_posterior_log_density per_dim": Case(
        lambda g: (_randn(g, 9, 4), _randn(g, 9, 4), _randn(g, 9, 4, scale=0.3)),
        lambda z, mean, log_var: vaekernels.aggregate_posterior_log_density(z, mean, log_var, per_dim=True),
        2,
    ),
    "gated_activation": Case(lambda g: (_randn(g, 2, 8, 3, 5), _randn(g, 2, 8)), vaekernels.gated_activation, 2),
    # The backward recovers each pixel's log sum_m pi_m p_m(x) from the forward's NLL, stored in
    # the input dtype (4 nats: 2e-3 apart in float16), and d/d logit_m = pi_m - r_m cancels.
    "discretized_logistic_mixture_nll": Case(
        lambda g: (
            _randn(g, 2, logistic_mixture.num_params(3, 2), 4, 3),
            torch.randint(0, 256, (2, 3, 4, 3), generator=g).float() / 127.5 - 1,
        ),
        lambda params, x: vaekernels.discretized_logistic_mixture_nll(params, x, 2, "none"),
        32,
    ),
    # The row log-sum-exp is stored in the input dtype, and the backward's probabilities
    # exp(s - lse) inherit its absolute rounding: one more unit.
    "causal_attention": Case(
        lambda g: (_randn(g, 2, 19, 5), _randn(g, 2, 19, 5), _randn(g, 2, 19, 3)), vaekernels.causal_attention, 4
    ),
    # The tangents of every layer are stored in the input dtype, each rounding carried through the
    # next layer's product, and so is the metric W^T W.
    "jacobian_column_sq_norms": Case(lambda g: (_randn(g, 5, 3),), None, 8, _decoder),
    "jacobian_gram": Case(lambda g: (_randn(g, 5, 3),), None, 8, _decoder),
    "coupling_backward_step": Case(lambda g: tuple(_randn(g, 3, 4, 7) for _ in range(4)), _coupling, 2),
}


def _run(name: str, case: Case, inputs: tuple, module: nn.Module | None):
    if case.module is not None:
        return getattr(vaekernels, name)(module, *inputs)
    return case.run(*inputs)


def _forward_backward(name: str, case: Case, dtype: torch.dtype, backend: str, inputs: tuple, module: nn.Module | None):
    inputs = tuple(
        t.detach().to(DEVICE, dtype).requires_grad_(t.requires_grad) if t.is_floating_point() else t.to(DEVICE)
        for t in inputs
    )
    module = None if module is None else _cast_module(module, dtype)
    with vaekernels.use_backend(backend):
        out = _run(name, case, inputs, module)
        leaves = [t for t in inputs if t.requires_grad]
        leaves += [] if module is None else list(module.parameters())
        # allow_unused: the decoder's last bias does not move its Jacobian.
        grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True) if out.requires_grad else ()
    return out, grads


def _cast_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(module).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", HALVES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", list(CASES))
def test_triton_op_in_half_precision_matches_the_float32_reference(name, dtype):
    case = CASES[name]
    g = torch.Generator().manual_seed(0)
    inputs = case.make_inputs(g)
    module = case.module() if case.module is not None else None
    # The reference sees exactly the values the half-precision run sees.
    rounded = tuple(
        t.detach().to(dtype).float().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in inputs
    )
    if module is not None:
        module = _cast_module(module, dtype)
    out, grads = _forward_backward(name, case, dtype, "triton", rounded, module)
    expected, expected_grads = _forward_backward(name, case, torch.float32, "reference", rounded, module)

    assert out.dtype == dtype
    bound = case.factor * ROUNDING[dtype]
    assert [g is None for g in grads] == [g is None for g in expected_grads]
    grads, expected_grads = [g for g in grads if g is not None], [g for g in expected_grads if g is not None]
    errors = {"out": rel_err(out, expected)}
    errors |= {f"grad {i}": rel_err(a, b) for i, (a, b) in enumerate(zip(grads, expected_grads))}
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    assert {k: e for k, e in errors.items() if not e <= bound} == {}, f"bound {bound:.2e}"
