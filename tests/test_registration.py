"""Registration: opcheck, float64 gradcheck and torch.compile(fullgraph=True) of every op on every
backend, one schema for the C++ and Triton namespaces, and the per-capability CPU builds."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_triton_schema_is_cpp, device_backends, namespace, needs_cpp_and_triton

import vaekernels
from vaekernels import _backend

# (device, backend) pairs that run native kernels: cpu and the interpreted Triton on CPU tensors,
# cuda and Triton on CUDA tensors where there is a GPU.
NATIVE = [pytest.param(pair, id=f"{pair[0]}-{pair[1]}") for pair in device_backends() if pair[1] != "reference"]
OP_NAMES = [
    "log_mean_exp",
    "log_mean_exp_backward",
    "bernoulli_log_prob",
    "bernoulli_log_prob_backward",
    "gaussian_log_prob",
    "gaussian_kl",
    "aggregate_posterior",
    "aggregate_posterior_backward",
]


def sample_args(name, backend, device, with_marginal=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    logits = randn(2, 3, 5).requires_grad_()
    x = torch.rand(2, 1, 5, generator=g, dtype=dtype).to(device).expand(2, 3, 5).requires_grad_()  # stride 0
    if name == "log_mean_exp":
        return (randn(3, 7).requires_grad_(),)
    if name == "log_mean_exp_backward":
        x = randn(3, 7)
        x[1] = float("-inf")
        return randn(3), x, torch.logsumexp(x, -1) - torch.log(torch.tensor(7.0, dtype=dtype, device=device))
    if name == "bernoulli_log_prob":
        return logits, x
    if name == "bernoulli_log_prob_backward":
        return randn(2, 3), logits.detach(), x.detach()
    if name == "gaussian_log_prob":
        return randn(2, 3, 5).requires_grad_(), randn(2, 1, 5).expand(2, 3, 5), randn(5).expand(2, 3, 5)
    if name == "gaussian_kl":
        return randn(2, 3, 5).requires_grad_(), randn(1, 1, 5).expand(2, 3, 5).requires_grad_()
    z, mean, log_var = randn(4, 3).requires_grad_(), randn(5, 3).requires_grad_(), randn(5, 3).requires_grad_()
    if name == "aggregate_posterior":
        return z, mean, log_var, with_marginal
    joint, marginal, nearest = _backend.ops(backend).aggregate_posterior(
        z.detach(), mean.detach(), log_var.detach(), with_marginal
    )
    return randn(4), randn(*marginal.shape), z.detach(), mean.detach(), log_var.detach(), joint, marginal, nearest


# The aggregate posterior ops once more for a joint-only forward, whose marginal is an empty [B, 0].
OPCHECK_CASES = [pytest.param(name, True, id=name) for name in OP_NAMES] + [
    pytest.param(name, False, id=f"{name}-joint-only") for name in OP_NAMES if name.startswith("aggregate_posterior")
]


@pytest.mark.parametrize("device_backend", NATIVE)
@pytest.mark.parametrize("name,with_marginal", OPCHECK_CASES)
def test_opcheck(device_backend, name, with_marginal):
    device, backend = device_backend
    op = getattr(namespace(backend), name).default
    torch.library.opcheck(op, sample_args(name, backend, device, with_marginal))


@needs_cpp_and_triton
@pytest.mark.parametrize("name", OP_NAMES)
def test_triton_ops_have_the_cpp_schema(name):
    assert_triton_schema_is_cpp(name)


def _public_calls(device="cpu"):
    g = torch.Generator().manual_seed(1)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device).requires_grad_()

    x = torch.rand(2, 5, generator=g, dtype=torch.float64).to(device)
    z, mean, log_var = leaf(4, 3), leaf(4, 3), leaf(4, 3, scale=0.3)
    zeros = torch.zeros(2, 3, dtype=torch.float64, device=device)
    return {
        "log_mean_exp": (lambda t: vaekernels.log_mean_exp(t, dim=0), (leaf(4, 3),)),
        "bernoulli_log_prob": (vaekernels.bernoulli_log_prob, (leaf(2, 3, 5), x.clone().requires_grad_())),
        "gaussian_log_prob": (vaekernels.gaussian_log_prob, (leaf(2, 3, 4), leaf(2, 1, 4), leaf(4, scale=0.3))),
        "gaussian_kl": (vaekernels.gaussian_kl, (leaf(3, 4), leaf(3, 4))),
        "iwae_bound": (lambda l, p, q: vaekernels.iwae_bound(l, x, p, q), (leaf(2, 3, 5), leaf(2, 3), leaf(2, 3))),
        "iwae_bound_gaussian": (
            lambda m, v: vaekernels.iwae_bound(m, x, zeros, zeros, likelihood="gaussian", log_var=v),
            (leaf(2, 3, 5), leaf(5, scale=0.3)),
        ),
        "aggregate_posterior_log_density": (vaekernels.aggregate_posterior_log_density, (z, mean, log_var)),
        "aggregate_posterior_per_dim": (
            lambda *t: vaekernels.aggregate_posterior_log_density(*t, per_dim=True),
            (z, mean, log_var),
        ),
        "total_correlation": (vaekernels.total_correlation, (z, mean, log_var)),
        "mutual_information": (vaekernels.mutual_information, (z, mean, log_var)),
        "marginal_kl": (vaekernels.marginal_kl, (z, mean, log_var)),
    }


PUBLIC = list(_public_calls())


@pytest.mark.parametrize("device_backend", NATIVE)
@pytest.mark.parametrize("name", PUBLIC)
def test_gradcheck_float64(device_backend, name):
    device, backend = device_backend
    fn, inputs = _public_calls(device)[name]
    with vaekernels.use_backend(backend):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _dreg_call(device):
    """The DReG surrogate (not a true gradient, so compiled against eager rather than gradchecked)."""
    g = torch.Generator().manual_seed(2)
    mean, log_var = (torch.randn(2, 3, generator=g, dtype=torch.float64).to(device).requires_grad_() for _ in "ml")
    eps, x = torch.randn(2, 4, 3, generator=g, dtype=torch.float64).to(device), torch.rand(2, 5, dtype=torch.float64)

    def dreg(mean, log_var, weight):
        z = mean.unsqueeze(1) + torch.exp(0.5 * log_var).unsqueeze(1) * eps
        zero = z.new_zeros(())
        return vaekernels.iwae_bound(
            z @ weight,
            x.to(device),
            vaekernels.gaussian_log_prob(z, zero, zero),
            None,
            estimator="dreg",
            z=z,
            q=(mean, log_var),
        )

    weight = torch.randn(3, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    return dreg, (mean, log_var, weight)


@pytest.mark.parametrize("device_backend", NATIVE)
@pytest.mark.parametrize("name", [*PUBLIC, "iwae_bound_dreg"])
def test_compile_fullgraph_matches_eager(device_backend, name):
    device, backend = device_backend
    fn, inputs = _dreg_call(device) if name == "iwae_bound_dreg" else _public_calls(device)[name]
    torch._dynamo.reset()
    with vaekernels.use_backend(backend):
        eager = fn(*inputs)
        eager_grads = torch.autograd.grad(eager.sum(), inputs, allow_unused=True)
        out = torch.compile(fn, fullgraph=True)(*inputs)
        out_grads = torch.autograd.grad(out.sum(), inputs, allow_unused=True)
    torch.testing.assert_close(out, eager)
    for got, want in zip(out_grads, eager_grads):
        torch.testing.assert_close(got, want)


_CAPABILITY_PROBE = """
import json, torch, vaekernels
from vaekernels import _backend
g = torch.Generator().manual_seed(0)
logits, x = torch.randn(3, 4, 37, generator=g), torch.rand(3, 37, generator=g)
z, mean, log_var = torch.randn(6, 5, generator=g), torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
with vaekernels.use_backend("cpu"):
    out = {"capability": _backend.native()["cpu_capability"],
           "bernoulli": vaekernels.bernoulli_log_prob(logits, x).tolist(),
           "lme": vaekernels.log_mean_exp(logits.flatten(1)).tolist(),
           "gauss": vaekernels.gaussian_log_prob(logits, x.unsqueeze(1), x.unsqueeze(1)).tolist(),
           "agg": vaekernels.aggregate_posterior_log_density(z, mean, log_var, per_dim=True).tolist()}
print(json.dumps(out))
"""


@pytest.mark.skipif(_backend.native()["cpu_capability"] is None, reason="the C++ extension is not built")
def test_every_cpu_capability_build_loads_and_agrees():
    machine = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    capabilities = order[: order.index(machine) + 1] if machine in order else ["DEFAULT"]
    results = {}
    for capability in capabilities:
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()}
        run = subprocess.run(
            [sys.executable, "-c", _CAPABILITY_PROBE], env=env, capture_output=True, text=True, check=False
        )
        assert run.returncode == 0, run.stderr
        results[capability] = json.loads(run.stdout.strip().splitlines()[-1])
        assert results[capability]["capability"] == capability
    first = results[capabilities[0]]
    for capability in capabilities[1:]:
        for key in ("bernoulli", "lme", "gauss", "agg"):
            torch.testing.assert_close(
                torch.tensor(results[capability][key]), torch.tensor(first[key]), rtol=2e-6, atol=1e-5
            )


def test_triton_of_the_test_extra_is_importable():
    """The [test] extra installs triton, so the tests marked needs_cpp_and_triton are skipped only
    where someone ran the suite without it, never silently in CI."""
    assert _backend.triton_available(), "triton is missing: install the [test] extra (pip install -e '.[test]')"


@pytest.mark.skipif(__import__("os").environ.get("VAEKERNELS_CPP") == "0", reason="built without C++")
def test_native_build_is_loaded_on_this_machine():
    info = _backend.native()
    assert info["schemas"] and info["cpu_capability"] is not None, info["error"]
    assert "cpu" in vaekernels.available_backends()


def _gram_reduce_norms(tangent, factor):
    """jacobian_gram_reduce on the chosen backend, alone: its backward is plain torch."""
    backend = _backend.choose("jacobian_tangent_step", tangent.device, tangent.dtype)
    from vaekernels.reference import jacobian as reference_jacobian

    reduce = (
        reference_jacobian.jacobian_gram_reduce
        if backend == "reference"
        else _backend.ops(backend).jacobian_gram_reduce
    )
    return reduce(tangent, factor.t() @ factor, True)[0]


def _second_derivative_calls():
    """One small float64 call per family, each input a leaf that requires grad."""
    g = torch.Generator().manual_seed(3)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    from torch import nn

    from vaekernels.reference.logistic_mixture import num_params

    def seeded(make):
        with torch.random.fork_rng():
            torch.manual_seed(3)
            return make().double()

    x01 = torch.rand(2, 5, generator=g, dtype=torch.float64)
    pixels = torch.randint(0, 256, (1, 1, 2, 1), generator=g).double() / 127.5 - 1
    decoder = seeded(lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)))
    layer = seeded(lambda: vaekernels.nn.GatedPixelCNNLayer(2, 2, 3, "B", skip_channels=1, cond_features=2))
    cond = torch.randn(1, 2, generator=g, dtype=torch.float64)
    coupling = seeded(
        lambda: vaekernels.nn.ReversibleSequential(
            *[
                vaekernels.nn.AdditiveCoupling(
                    nn.Sequential(nn.Linear(2, 2), nn.Tanh()), nn.Sequential(nn.Linear(2, 2), nn.Tanh())
                )
                for _ in range(2)
            ]
        )
    )
    return {
        "log_mean_exp": (lambda t: vaekernels.log_mean_exp(t, dim=0), (leaf(4, 3),)),
        "bernoulli_log_prob": (lambda logits: vaekernels.bernoulli_log_prob(logits, x01), (leaf(2, 3, 5),)),
        "gaussian_log_prob": (vaekernels.gaussian_log_prob, (leaf(2, 3, 4), leaf(2, 1, 4), leaf(4, scale=0.3))),
        "gaussian_kl": (vaekernels.gaussian_kl, (leaf(3, 4), leaf(3, 4))),
        "aggregate_posterior_log_density": (
            vaekernels.aggregate_posterior_log_density,
            (leaf(3, 2), leaf(3, 2), leaf(3, 2, scale=0.3)),
        ),
        "gated_activation": (vaekernels.gated_activation, (leaf(2, 4, 1, 3), leaf(2, 4))),
        "masked_conv2d": (lambda x, w: vaekernels.masked_conv2d(x, w, None, "B"), (leaf(1, 2, 3, 3), leaf(2, 2, 3, 3))),
        "GatedPixelCNNLayer": (lambda v, h: layer(v, h, cond), (leaf(1, 2, 3, 3), leaf(1, 2, 3, 3))),
        "discretized_logistic_mixture_nll": (
            lambda p: vaekernels.discretized_logistic_mixture_nll(p, pixels, 2, "none"),
            (leaf(1, num_params(1, 2), 2, 1),),
        ),
        "causal_attention": (vaekernels.causal_attention, (leaf(1, 4, 3), leaf(1, 4, 3), leaf(1, 4, 2))),
        "jacobian_gram_reduce": (_gram_reduce_norms, (leaf(2, 3, 4), leaf(5, 4))),
        "jacobian_column_sq_norms": (lambda z: vaekernels.jacobian_column_sq_norms(decoder, z), (leaf(2, 3),)),
        "ReversibleSequential": (coupling, (leaf(3, 4),)),
    }


# Backwards of plain torch ops, twice differentiable on every backend; the others run fused
# kernels, except on the reference backend, where only the reversible walk has no second derivative.
TWICE_DIFFERENTIABLE = {"gaussian_log_prob", "gaussian_kl", "masked_conv2d", "jacobian_gram_reduce"}
SECOND_DERIVATIVE_CALLS = [
    "log_mean_exp",
    "bernoulli_log_prob",
    "gaussian_log_prob",
    "gaussian_kl",
    "aggregate_posterior_log_density",
    "gated_activation",
    "masked_conv2d",
    "GatedPixelCNNLayer",
    "discretized_logistic_mixture_nll",
    "causal_attention",
    "jacobian_gram_reduce",
    "jacobian_column_sq_norms",
    "ReversibleSequential",
]


@pytest.mark.parametrize("backend", [backend for device, backend in device_backends() if device == "cpu"])
@pytest.mark.parametrize("name", SECOND_DERIVATIVE_CALLS)
def test_second_derivatives_are_right_or_refused(backend, name):
    """A backward with create_graph=True then a second backward (float64, CPU tensors): the second
    derivatives equal finite differences where the backward is differentiable; through fused
    kernels the second backward raises, naming what has them (autograd took their gradients for
    constants before and returned wrong numbers)."""
    fn, inputs = _second_derivative_calls()[name]
    twice = name in TWICE_DIFFERENTIABLE or (backend == "reference" and name != "ReversibleSequential")
    with vaekernels.use_backend(backend):
        if twice:
            assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
            return
        with pytest.raises(RuntimeError, match="first derivatives only") as refused:
            torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
        remedy = "vaekernels.reference.reversible" if name == "ReversibleSequential" else "VAEKERNELS_BACKEND=reference"
        assert remedy in str(refused.value)
