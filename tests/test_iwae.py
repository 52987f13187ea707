"""The importance-weighted bound family against its reference, closed forms and exact facts."""

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import needs_cpp, rel_err

import vaekernels
from vaekernels import reference
from vaekernels.reference import iwae as ref

# ||out - ref|| / ||ref|| bounds against a float64 reference.
RTOL = {torch.float32: 2e-6, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float64]


def assert_rel(out, expected, dtype):
    assert out.shape == expected.shape
    assert torch.isfinite(out).all() == torch.isfinite(expected).all()
    assert rel_err(out, expected) <= RTOL[dtype], rel_err(out, expected)


def grads(fn, inputs):
    """Output and gradients of fn(*inputs) under a fixed random cotangent."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    cotangent = cotangent.to(device=out.device, dtype=out.dtype)
    (out * cotangent).sum().backward()
    return out.detach(), [t.grad for t in leaves if t.requires_grad]


def check_against_reference(fused, oracle, inputs, dtype):
    out, fused_grads = grads(fused, inputs)
    expected, oracle_grads = grads(oracle, [t.double() for t in inputs])
    assert out.dtype == dtype
    assert_rel(out, expected, dtype)
    for got, want in zip(fused_grads, oracle_grads):
        assert_rel(got, want, dtype)


def randn(*shape, device, dtype, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(
        device=device, dtype=dtype
    )


# ----------------------------------------------------------------------------- log_mean_exp


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,dim,keepdim", [((1, 1), -1, False), ((3, 17), 1, False), ((2, 5, 3), 1, True), ((4, 33), 0, False)]
)
def test_log_mean_exp_matches_reference(device_backend, dtype, shape, dim, keepdim):
    device, _ = device_backend
    x = randn(*shape, device=device, dtype=dtype, scale=5)
    check_against_reference(
        lambda t: vaekernels.log_mean_exp(t, dim, keepdim), lambda t: ref.log_mean_exp(t, dim, keepdim), [x], dtype
    )


def test_log_mean_exp_of_neg_inf_rows_is_neg_inf_with_zero_gradient(device_backend):
    device, _ = device_backend
    x = torch.tensor([[float("-inf")] * 3, [0.0, float("-inf"), math.log(2.0)]], device=device, requires_grad=True)
    out = vaekernels.log_mean_exp(x)
    out.sum().backward()
    assert out[0].item() == float("-inf")
    assert out[1].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(x.grad[0], torch.zeros(3, device=device))
    assert torch.allclose(x.grad[1], torch.tensor([1 / 3, 0.0, 2 / 3], device=device))


def test_log_mean_exp_equals_constant_for_constant_rows(device_backend):
    device, _ = device_backend
    x = torch.full((5, 7), -1e30, device=device)
    assert torch.equal(vaekernels.log_mean_exp(x), torch.full((5,), -1e30, device=device))


# ----------------------------------------------------------------------------- bernoulli_log_prob


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 17), (3, 2, 1, 5, 3), (2, 4, 70)])
def test_bernoulli_log_prob_matches_reference(device_backend, dtype, shape):
    device, _ = device_backend
    logits = randn(*shape, device=device, dtype=dtype, scale=3)
    x = torch.rand(shape[:1] + shape[2:], generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(
        device=device, dtype=dtype
    )  # fractional x in [0, 1]
    check_against_reference(vaekernels.bernoulli_log_prob, ref.bernoulli_log_prob, [logits, x], dtype)


def test_bernoulli_log_prob_reads_non_contiguous_logits(device_backend):
    device, _ = device_backend
    logits = randn(3, 9, 4, device=device, dtype=torch.float32).transpose(1, 2)  # [3, 4, 9], last dim strided
    x = torch.rand(3, 9, device=device)
    assert_rel(
        vaekernels.bernoulli_log_prob(logits, x), ref.bernoulli_log_prob(logits.double(), x.double()), torch.float32
    )


def test_bernoulli_log_prob_extreme_logits_are_finite_and_exact(device_backend):
    device, _ = device_backend
    logits = torch.tensor([[[1e4, -1e4, 1e4, -1e4]]], device=device, requires_grad=True)
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0]], device=device)
    out = vaekernels.bernoulli_log_prob(logits, x)
    out.sum().backward()
    assert out.item() == -2e4  # the two wrong-sided pixels each cost 1e4 nats; the right ones cost 0
    assert torch.equal(logits.grad, torch.tensor([[[0.0, 0.0, -1.0, 1.0]]], device=device))


# ----------------------------------------------------------------------------- Gaussian densities


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shapes",
    [
        ((2, 5, 3), (2, 1, 3), (3,)),  # samples against a per-example posterior, shared log-variance
        ((4, 7), (4, 7), (4, 7)),
        ((2, 3, 4, 6), (3, 1, 6), (1,)),  # three leading dims, broadcast in the middle and in the last dim
        ((1,), (5, 1), (5, 1)),
    ],
)
def test_gaussian_log_prob_matches_reference(device_backend, dtype, shapes):
    device, _ = device_backend
    x, mean, log_var = (randn(*s, device=device, dtype=dtype, seed=i) for i, s in enumerate(shapes))
    check_against_reference(vaekernels.gaussian_log_prob, ref.gaussian_log_prob, [x, mean, log_var], dtype)


def test_gaussian_log_prob_standard_normal_closed_form(device_backend):
    device, _ = device_backend
    zero = torch.zeros(4, 10, device=device, dtype=torch.float64)
    expected = torch.full((4,), -5 * math.log(2 * math.pi), device=device, dtype=torch.float64)
    assert torch.allclose(vaekernels.gaussian_log_prob(zero, zero, zero), expected, rtol=1e-14)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "wanted", [(True, True, True), (True, False, False), (False, True, True), (False, False, True)]
)
def test_gaussian_log_prob_backward_kernel_is_the_composite(dtype, wanted):
    """The C++ one-pass backward against autograd through the reference's guarded formula, on
    broadcast (stride-0) rows with a partial last vector, x = mean at tiny and huge variances,
    and infinite variances; only the gradients asked for come back."""
    x = randn(3, 4, 19, device="cpu", dtype=dtype, seed=0)
    mean = randn(3, 1, 19, device="cpu", dtype=dtype, seed=1)
    log_var = randn(19, device="cpu", dtype=dtype, seed=2)
    x[0, 0, :3] = mean[0, 0, :3]
    log_var[:3] = torch.tensor([-200.0, 200.0, -1e4])
    log_var[3:5] = torch.tensor([float("inf"), float("-inf")])
    mean, log_var = mean.expand(3, 4, 19), log_var.expand(3, 4, 19)
    grad = randn(3, 4, device="cpu", dtype=dtype, seed=3)
    got = torch.ops.vaekernels.gaussian_log_prob_backward(grad, x, mean, log_var, *wanted)
    leaves = [t.detach().clone().requires_grad_() for t in (x, mean, log_var)]
    expected = torch.autograd.grad(ref.gaussian_log_prob(*leaves), [t for t, w in zip(leaves, wanted) if w], grad)
    assert len(got) == len(expected)
    # Where w = (x - mean) / var overflows (a zero density: variance 0 away from the mean), the
    # reference holds w constant but autograd still meets 0 * inf there (NaN); the kernel gives
    # what holding it constant means: no gradient through w, so d/dx = 0 and d/dlog_var = -g / 2.
    held = ((x - mean) != 0) & (log_var * -0.25 >= math.log(torch.finfo(dtype).max) / 2)
    for g, e, which in zip(got, expected, [i for i, w in enumerate(wanted) if w]):
        held_value = (-0.5 * grad.unsqueeze(-1)).expand_as(g) if which == 2 else torch.zeros_like(g)
        torch.testing.assert_close(g[held], held_value[held], rtol=1e-6, atol=0)
        # w^2 - 1 cancels near w = 1: float32 rounding there is absolute, of the order of g.
        torch.testing.assert_close(
            g[~held],
            e[~held],
            equal_nan=True,
            atol=1e-6 if dtype == torch.float32 else 1e-14,
            rtol=1e-5 if dtype == torch.float32 else 1e-13,
        )
    torch.library.opcheck(
        torch.ops.vaekernels.gaussian_log_prob_backward.default,
        (grad, x.clamp(-3, 3), mean.clamp(-3, 3), log_var.clamp(-3, 3), *wanted),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", [((6, 10), (6, 10)), ((2, 3, 17), (17,)), ((1, 1), (1, 1))])
def test_gaussian_kl_matches_reference(device_backend, dtype, shapes):
    device, _ = device_backend
    mean, log_var = (randn(*s, device=device, dtype=dtype, seed=i) for i, s in enumerate(shapes))
    check_against_reference(vaekernels.gaussian_kl, ref.gaussian_kl, [mean, log_var], dtype)


def test_gaussian_kl_closed_form(device_backend):
    device, _ = device_backend
    # KL(N(1, 1) || N(0, 1)) = 1/2 per dim.
    kl = vaekernels.gaussian_kl(torch.ones(3, 10, device=device), torch.zeros(3, 10, device=device))
    assert torch.equal(kl, torch.full((3,), 5.0, device=device))
    assert vaekernels.gaussian_kl(torch.zeros(10, device=device), torch.zeros(10, device=device)).item() == 0.0


def test_gaussian_extremes_give_no_nan(device_backend):
    device, _ = device_backend
    x = torch.tensor([[1e3, -1e3, 0.0]], device=device, requires_grad=True)
    log_var = torch.tensor([[-30.0, 30.0, 80.0]], device=device, requires_grad=True)
    mean = torch.zeros(1, 3, device=device, requires_grad=True)
    total = vaekernels.gaussian_log_prob(x, mean, log_var) + vaekernels.gaussian_kl(mean, log_var)
    total.sum().backward()
    for t in (total, x.grad, mean.grad, log_var.grad):
        assert not torch.isnan(t).any()


# ----------------------------------------------------------------------------- iwae_bound


def bound_inputs(device, dtype, B=3, K=4, event=(2, 5), likelihood="bernoulli"):
    logits = randn(B, K, *event, device=device, dtype=dtype, scale=2)
    x = torch.rand((B, *event), generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device, dtype)
    log_pz, log_qz = randn(B, K, device=device, dtype=dtype, seed=4), randn(B, K, device=device, dtype=dtype, seed=5)
    return logits, x, log_pz, log_qz


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_iwae_bound_matches_reference(device_backend, dtype, likelihood, reduction):
    device, _ = device_backend
    logits, x, log_pz, log_qz = bound_inputs(device, dtype)
    log_var = randn(1, 5, device=device, dtype=dtype, seed=6, scale=0.3)  # shared per pixel column
    kwargs = dict(likelihood=likelihood, reduction=reduction, log_var=log_var if likelihood == "gaussian" else None)
    oracle_kwargs = {**kwargs, "log_var": None if kwargs["log_var"] is None else log_var.double()}
    check_against_reference(
        lambda *t: vaekernels.iwae_bound(*t, **kwargs),
        lambda *t: ref.iwae_bound(*t, **oracle_kwargs),
        [logits, x, log_pz, log_qz],
        dtype,
    )


def test_iwae_bound_with_one_sample_is_the_elbo(device_backend):
    device, _ = device_backend
    logits, x, log_pz, log_qz = bound_inputs(device, torch.float64, K=1)
    elbo = ref.bernoulli_log_prob(logits, x)[:, 0] + log_pz[:, 0] - log_qz[:, 0]
    assert torch.allclose(vaekernels.iwae_bound(logits, x, log_pz, log_qz), elbo, rtol=1e-13)


def test_iwae_bound_saves_only_inputs_and_order_b_k(device_backend):
    device, _ = device_backend
    B, K, D = 4, 6, 50
    logits, x, log_pz, log_qz = bound_inputs(device, torch.float32, B=B, K=K, event=(D,))
    logits.requires_grad_(True)
    inputs = {logits.data_ptr(), x.data_ptr()}
    extra = []

    def pack(t):
        if t.data_ptr() not in inputs:
            extra.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vaekernels.iwae_bound(logits, x, log_pz, log_qz).sum()
    assert sum(extra) <= 4 * B * K  # log-weights, the bound and such: never a [B, K, D] tensor


def linear_gaussian(K, B=64, D=3, dtype=torch.float64, exact=True, seed=0, device="cpu"):
    """z ~ N(0, 1), x | z ~ N(w z + b, s^2 I): the posterior and log p(x) are known in closed form."""
    g = torch.Generator().manual_seed(seed)
    w, b, s2 = torch.tensor([0.8, -1.2, 0.5], dtype=dtype), torch.tensor([0.1, 0.3, -0.2], dtype=dtype), 0.25
    x = torch.randn(B, 1, generator=g, dtype=dtype) * w + b + torch.randn(B, D, generator=g, dtype=dtype) * 0.5
    post_var = 1 / (1 + (w @ w) / s2)
    post_mean = post_var * ((x - b) @ w / s2)
    if not exact:  # a posterior that is off in mean and width
        post_mean, post_var = post_mean + 0.7, post_var * 3
    eps = torch.randn(B, K, 1, generator=g, dtype=dtype).to(device)
    cov = torch.outer(w, w) + s2 * torch.eye(D, dtype=dtype)
    log_px = torch.distributions.MultivariateNormal(b, cov).log_prob(x)
    w, b, x = w.to(device), b.to(device), x.to(device)
    q_mean = post_mean.unsqueeze(1).to(device).requires_grad_(True)  # [B, 1]
    q_log_var = torch.full((B, 1), math.log(post_var), dtype=dtype, device=device).requires_grad_(True)
    z = q_mean.unsqueeze(1) + torch.exp(0.5 * q_log_var).unsqueeze(1) * eps  # [B, K, 1]
    zero = torch.zeros((), dtype=dtype, device=device)
    return dict(
        decoder_mean=z * w + b,
        x=x,
        log_pz=vaekernels.gaussian_log_prob(z, zero, zero),
        log_var=torch.full((D,), math.log(s2), dtype=dtype, device=device),
        z=z,
        q=(q_mean, q_log_var),
        log_px=log_px.to(device),
    )


@pytest.mark.parametrize("K", [1, 5, 50])
def test_iwae_bound_with_exact_posterior_is_log_px(device_backend, K):
    m = linear_gaussian(K, device=device_backend[0])
    bound = vaekernels.iwae_bound(
        m["decoder_mean"], m["x"], m["log_pz"], None, likelihood="gaussian", log_var=m["log_var"], z=m["z"], q=m["q"]
    )
    assert torch.allclose(bound, m["log_px"], rtol=0, atol=1e-10)


def test_iwae_bound_rises_with_k_for_a_mismatched_posterior(device_backend):
    means = []
    for K in (1, 4, 16):
        m = linear_gaussian(K, B=400, exact=False, device=device_backend[0])
        with torch.no_grad():
            means.append(
                vaekernels.iwae_bound(
                    m["decoder_mean"],
                    m["x"],
                    m["log_pz"],
                    None,
                    likelihood="gaussian",
                    log_var=m["log_var"],
                    z=m["z"],
                    q=m["q"],
                    reduction="mean",
                ).item()
            )
        log_px = m["log_px"].mean().item()
    assert means[0] < means[1] < means[2] < log_px


def encoder_gradients(estimator, K, replicates=4000):
    """Per-replicate gradients w.r.t. q's mean and log-variance for one x seen `replicates` times."""
    g = torch.Generator().manual_seed(K)
    w, b = torch.tensor([0.8, -1.2, 0.5], dtype=torch.float64), torch.tensor([0.1, 0.3, -0.2], dtype=torch.float64)
    x = torch.tensor([[0.9, -0.4, 0.3]], dtype=torch.float64).expand(replicates, 3)
    q_mean = torch.full((replicates, 1), 0.6, dtype=torch.float64, requires_grad=True)
    q_log_var = torch.full((replicates, 1), math.log(0.3), dtype=torch.float64, requires_grad=True)
    eps = torch.randn(replicates, K, 1, generator=g, dtype=torch.float64)
    z = q_mean.unsqueeze(1) + torch.exp(0.5 * q_log_var).unsqueeze(1) * eps
    zero = torch.zeros((), dtype=torch.float64)
    bound = vaekernels.iwae_bound(
        z * w + b,
        x,
        vaekernels.gaussian_log_prob(z, zero, zero),
        None,
        likelihood="gaussian",
        log_var=torch.full((3,), math.log(0.25), dtype=torch.float64),
        z=z,
        q=(q_mean, q_log_var),
        estimator=estimator,
    )
    bound.sum().backward()
    return q_mean.grad[:, 0], q_log_var.grad[:, 0]


def test_dreg_is_unbiased_for_the_iwae_encoder_gradient_and_its_snr_rises_with_k():
    snr = {}
    for K in (4, 64):
        iwae, dreg = encoder_gradients("iwae", K), encoder_gradients("dreg", K)
        for g_iwae, g_dreg in zip(iwae, dreg):
            # Same expectation: the means differ by less than 4 standard errors.
            assert abs(g_iwae.mean() - g_dreg.mean()) < 4 * math.sqrt((g_iwae.var() + g_dreg.var()) / len(g_iwae))
        snr["iwae", K], snr["dreg", K] = (abs(g.mean()) / g.std() for g in (iwae[1], dreg[1]))
        assert dreg[1].var() < iwae[1].var() / 10
    # Rainforth et al. 2018: IWAE's encoder signal-to-noise falls as K grows; DReG's rises.
    assert snr["iwae", 64] < snr["iwae", 4] / 2
    assert snr["dreg", 64] > snr["dreg", 4] * 2


def test_stl_detaches_only_the_score_of_q():
    m = linear_gaussian(8)
    q_mean, q_log_var = m["q"]
    bound = vaekernels.iwae_bound(
        m["decoder_mean"],
        m["x"],
        m["log_pz"],
        None,
        likelihood="gaussian",
        log_var=m["log_var"],
        z=m["z"],
        q=m["q"],
        estimator="stl",
    )
    grad_mean, grad_log_var = torch.autograd.grad(bound.sum(), [q_mean, q_log_var], retain_graph=True)
    # With the exact posterior every log-weight is log p(x) whatever z is: the path gradient is zero
    # (sticking the landing), whereas the IWAE estimator keeps the score term.
    assert grad_mean.abs().max() < 1e-10 and grad_log_var.abs().max() < 1e-10
    iwae = vaekernels.iwae_bound(
        m["decoder_mean"],
        m["x"],
        m["log_pz"],
        None,
        likelihood="gaussian",
        log_var=m["log_var"],
        z=m["z"],
        q=m["q"],
        estimator="iwae",
    )
    assert torch.autograd.grad(iwae.sum(), q_log_var)[0].abs().max() > 1e-3


@pytest.mark.parametrize("estimator", ["dreg", "stl"])
def test_decoder_gradient_is_the_iwae_one_for_every_estimator(estimator):
    torch.manual_seed(0)
    decoder = torch.nn.Linear(2, 6).double()
    x = torch.rand(3, 6, dtype=torch.float64).round()
    mean, log_var = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64) * 0.1
    eps = torch.randn(3, 4, 2, dtype=torch.float64)
    grads = {}
    for name in ("iwae", estimator):
        q = (mean.clone().requires_grad_(), log_var.clone().requires_grad_())
        z = q[0].unsqueeze(1) + torch.exp(0.5 * q[1]).unsqueeze(1) * eps
        zero = z.new_zeros(())
        bound = vaekernels.iwae_bound(
            decoder(z), x, vaekernels.gaussian_log_prob(z, zero, zero), None, z=z, q=q, estimator=name
        )
        grads[name] = torch.autograd.grad(bound.sum(), list(decoder.parameters()))
    for got, want in zip(grads[estimator], grads["iwae"]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_dreg_matches_the_reference_and_gives_no_nan_for_impossible_rows():
    torch.manual_seed(0)
    decoder = torch.nn.Linear(2, 5).double()
    x = torch.rand(3, 5, dtype=torch.float64).round()
    eps = torch.randn(3, 4, 2, dtype=torch.float64)
    log_pz_shift = torch.tensor([[0.0], [0.0], [float("-inf")]], dtype=torch.float64)  # row 2: every weight is 0
    grads = []
    for implementation in (vaekernels.iwae_bound, ref.iwae_bound):
        q = (
            torch.zeros(3, 2, dtype=torch.float64, requires_grad=True),
            torch.zeros(3, 2, dtype=torch.float64, requires_grad=True),
        )
        z = q[0].unsqueeze(1) + torch.exp(0.5 * q[1]).unsqueeze(1) * eps
        zero = z.new_zeros(())
        bound = implementation(
            decoder(z), x, vaekernels.gaussian_log_prob(z, zero, zero) + log_pz_shift, None, z=z, q=q, estimator="dreg"
        )
        bound[:2].sum().backward()
        grads.append([t.grad for t in q])
    for got, want in zip(*grads):
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_extreme_log_weights_give_no_nan(device_backend):
    device, _ = device_backend
    logits = torch.tensor([[[1e4, -1e4], [0.0, 0.0]], [[1e4, -1e4], [-1e4, 1e4]]], device=device, requires_grad=True)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=device)
    log_pz = torch.tensor([[-1e30, 0.0], [float("-inf"), float("-inf")]], device=device, requires_grad=True)
    log_qz = torch.zeros(2, 2, device=device, requires_grad=True)
    bound = vaekernels.iwae_bound(logits, x, log_pz, log_qz)
    bound[0].backward()
    assert bound[1].item() == float("-inf")
    for t in (bound[0], logits.grad, log_pz.grad, log_qz.grad):
        assert not torch.isnan(t).any()
    assert log_pz.grad[0].tolist() == [0.0, 1.0]  # all the weight on the sample that is not -1e30


# ----------------------------------------------------------------------------- importance_sampled_nll


def test_importance_sampled_nll_streams_chunks_and_equals_log_px_for_the_exact_posterior():
    m = linear_gaussian(1, B=5)
    w, b = torch.tensor([0.8, -1.2, 0.5], dtype=torch.float64), torch.tensor([0.1, 0.3, -0.2], dtype=torch.float64)
    q_mean, q_log_var = (t.detach() for t in m["q"])
    seen = []

    def decode(z):
        seen.append(z.shape[1])
        return z * w + b

    nll = vaekernels.importance_sampled_nll(
        m["x"],
        lambda x: (q_mean, q_log_var),
        decode,
        num_samples=1000,
        chunk_size=64,
        likelihood="gaussian",
        log_var=m["log_var"],
    )
    assert max(seen) == 64 and sum(seen) == 1000
    assert torch.allclose(nll, -m["log_px"], atol=1e-10)


def test_importance_sampled_nll_merges_chunks_into_the_bound_over_all_samples():
    torch.manual_seed(0)
    encoder, decoder = torch.nn.Linear(6, 4).double(), torch.nn.Linear(2, 6).double()
    encode = lambda x: encoder(x).chunk(2, dim=-1)  # noqa: E731
    x = torch.rand(3, 6, dtype=torch.float64).round()
    samples = []

    def decode(z):
        samples.append(z)
        return decoder(z)

    with torch.no_grad():
        nll = vaekernels.importance_sampled_nll(x, encode, decode, 50, 7)  # chunks of 7, 7, ..., 1
        z = torch.cat(samples, dim=1)
        mean, log_var = encode(x)
        zero = z.new_zeros(())
        log_qz = ref.gaussian_log_prob(z, mean.unsqueeze(1), log_var.unsqueeze(1))
        expected = -ref.iwae_bound(decoder(z), x, ref.gaussian_log_prob(z, zero, zero), log_qz)
    assert [s.shape[1] for s in samples] == [7] * 7 + [1]
    torch.testing.assert_close(nll, expected, rtol=1e-12, atol=1e-12)


def test_importance_sampled_nll_in_one_chunk_equals_the_reference():
    torch.manual_seed(0)
    encoder, decoder = torch.nn.Linear(6, 4), torch.nn.Linear(2, 6)
    encode = lambda x: encoder(x).chunk(2, dim=-1)  # noqa: E731
    x = torch.rand(3, 6).round()
    fused = vaekernels.importance_sampled_nll(x, encode, decoder, 300, 300, generator=torch.Generator().manual_seed(1))
    oracle = ref.importance_sampled_nll(x, encode, decoder, 300, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(fused, oracle, rtol=1e-5)


def test_importance_sampled_nll_progress_bar(capsys):
    encode = lambda x: (torch.zeros(len(x), 2), torch.zeros(len(x), 2))  # noqa: E731
    decode = lambda z: torch.zeros(*z.shape[:2], 3)  # noqa: E731
    nll = vaekernels.importance_sampled_nll(torch.ones(2, 3), encode, decode, 20, 7, progress=True)
    assert torch.allclose(nll, torch.full((2,), 3 * math.log(2)))
    assert "NLL, K=20" in capsys.readouterr().err


# ----------------------------------------------------------------------------- aggregate posterior


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,d", [(1, 1, 1), (5, 7, 3), (9, 9, 10)])
@pytest.mark.parametrize("per_dim", [False, True])
def test_aggregate_posterior_matches_reference(device_backend, dtype, B, N, d, per_dim):
    device, _ = device_backend
    z, mean = randn(B, d, device=device, dtype=dtype, seed=1), randn(N, d, device=device, dtype=dtype, seed=2)
    log_var = randn(N, d, device=device, dtype=dtype, seed=3, scale=0.5)
    check_against_reference(
        lambda *t: vaekernels.aggregate_posterior_log_density(*t, per_dim=per_dim, dataset_size=100),
        lambda *t: ref.aggregate_posterior_log_density(*t, per_dim=per_dim, dataset_size=100),
        [z, mean, log_var],
        dtype,
    )


@pytest.mark.parametrize("name", ["marginal_kl", "mutual_information", "total_correlation"])
def test_aggregate_estimators_match_reference(device_backend, name):
    device, _ = device_backend
    z, mean = (
        randn(12, 4, device=device, dtype=torch.float64, seed=1),
        randn(12, 4, device=device, dtype=torch.float64, seed=2),
    )
    log_var = randn(12, 4, device=device, dtype=torch.float64, seed=3, scale=0.5)
    check_against_reference(getattr(vaekernels, name), getattr(ref, name), [z, mean, log_var], torch.float64)


def test_mutual_information_lies_in_zero_log_n(device_backend):
    device, _ = device_backend
    N, d = 16, 3
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(N, d, generator=g).to(device)
    for spread in (0.0, 0.3, 3.0, 300.0):
        z = mean * spread + torch.randn(N, d, generator=g).to(device)
        mi = vaekernels.mutual_information(z, mean * spread, torch.zeros(N, d, device=device)).item()
        assert -1e-6 <= mi <= math.log(N) + 1e-6
    assert mi == pytest.approx(math.log(N), abs=1e-4)  # far-apart posteriors identify x
    z = torch.randn(N, d, generator=g).to(device)
    identical = vaekernels.mutual_information(z, torch.zeros(N, d, device=device), torch.zeros(N, d, device=device))
    assert identical.abs().item() < 1e-6


def test_total_correlation_of_a_factorised_aggregate_is_zero(device_backend):
    device, _ = device_backend
    z = torch.randn(10, 4, device=device)
    same = torch.zeros(10, 4, device=device)  # every q(z | x_j) = N(0, I): q(z) factorises exactly
    assert vaekernels.total_correlation(z, same, same).abs().item() < 1e-5
    assert vaekernels.marginal_kl(z, same, same).abs().item() < 1e-5


# ----------------------------------------------------------------------------- modules and backends


def test_iwae_bound_module_is_the_function():
    logits, x, log_pz, log_qz = bound_inputs("cpu", torch.float64)
    module = vaekernels.nn.IWAEBound(reduction="sum")
    assert torch.equal(
        module(logits, x, log_pz, log_qz), vaekernels.iwae_bound(logits, x, log_pz, log_qz, reduction="sum")
    )
    assert "estimator='iwae'" in repr(module)


def test_forced_reference_backend_runs_the_reference():
    logits, x, log_pz, log_qz = bound_inputs("cpu", torch.float64)
    with vaekernels.use_backend("reference"):
        assert torch.equal(
            vaekernels.iwae_bound(logits, x, log_pz, log_qz), reference.iwae.iwae_bound(logits, x, log_pz, log_qz)
        )


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="use_backend.*must be one of.*got 'gpu'"):
        with vaekernels.use_backend("gpu"):
            pass


# ----------------------------------------------------------------------------- bad input

_L, _X, _P = torch.zeros(2, 3, 4), torch.zeros(2, 4), torch.zeros(2, 3)
_Z, _M = torch.zeros(4, 2), torch.zeros(4, 2)


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda: vaekernels.bernoulli_log_prob(_L, torch.zeros(3, 4)),
            r"bernoulli_log_prob: x must have shape \[B, \*event\] = \[2, 4\], got \[3, 4\]",
        ),
        (
            lambda: vaekernels.bernoulli_log_prob(_L, torch.zeros(2, 5)),
            r"x must have shape .* = \[2, 4\], got \[2, 5\]",
        ),
        (lambda: vaekernels.bernoulli_log_prob(_L, _X.double()), r"x must have the dtype of logits \(torch.float32\)"),
        (
            lambda: vaekernels.bernoulli_log_prob(_L.long(), _X),
            r"logits must be a floating-point tensor, got dtype torch.int64",
        ),
        (lambda: vaekernels.bernoulli_log_prob(_L, "x"), r"x must be a torch.Tensor, got str"),
        (lambda: vaekernels.bernoulli_log_prob(_L[:, :0], _X), r"logits must have K >= 1 samples, got K = 0"),
        (lambda: vaekernels.bernoulli_log_prob(_L[:0], _X[:0]), r"non-empty batch \(B >= 1\), got B = 0"),
        (lambda: vaekernels.bernoulli_log_prob(_X, _X), r"logits must have shape \[B, K, \*event\]"),
        (
            lambda: vaekernels.iwae_bound(_L, _X, _P, _P, likelihood="poisson"),
            r"iwae_bound: likelihood must be one of 'bernoulli', 'gaussian', got 'poisson'",
        ),
        (lambda: vaekernels.iwae_bound(_L, _X, _P, _P, estimator="rws"), r"estimator must be one of .*got 'rws'"),
        (lambda: vaekernels.iwae_bound(_L, _X, _P, _P, reduction="max"), r"reduction must be one of .*got 'max'"),
        (
            lambda: vaekernels.iwae_bound(_L, _X, _P[:, :2], _P),
            r"log_pz must have shape \[B, K\] = \[2, 3\], got \[2, 2\]",
        ),
        (lambda: vaekernels.iwae_bound(_L, _X, _P, None), r"log_qz must be a \[B, K\] tensor"),
        (lambda: vaekernels.iwae_bound(_L, _X, _P, _P, estimator="dreg"), r"estimator 'dreg' needs z="),
        (lambda: vaekernels.iwae_bound(_L, _X, _P, _P, likelihood="gaussian"), r"log_var must be given"),
        (
            lambda: vaekernels.iwae_bound(_L, _X, _P, _P, likelihood="gaussian", log_var=torch.zeros(5)),
            r"log_var must broadcast to logits' shape \[2, 3, 4\], got \[5\]",
        ),
        (
            lambda: vaekernels.iwae_bound(_L, _X, _P, None, z=torch.zeros(2, 3, 5), q=(torch.zeros(2, 4),) * 2),
            r"q\[0\] \(mean\) must have shape \[B, d\] or \[B, 1, d\] = \[2, 5\], got \[2, 1, 4\]",
        ),
        (lambda: vaekernels.log_mean_exp(torch.zeros(3, 0)), r"log_mean_exp: x must have at least one element"),
        (lambda: vaekernels.log_mean_exp(torch.zeros(3), dim=2), r"dim must be in \[-1, 0\]"),
        (
            lambda: vaekernels.gaussian_log_prob(torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(4)),
            r"gaussian_log_prob: x, mean, log_var must broadcast together, got x \[3, 4\], mean \[2, 4\]",
        ),
        (
            lambda: vaekernels.gaussian_kl(torch.zeros(3), torch.zeros(3, dtype=torch.float64)),
            r"gaussian_kl: log_var must have the dtype of mean",
        ),
        (
            lambda: vaekernels.aggregate_posterior_log_density(_Z, torch.zeros(4, 3), torch.zeros(4, 3)),
            r"mean must have shape \[N, d\] with N >= 1 and d = 2, got \[4, 3\]",
        ),
        (lambda: vaekernels.total_correlation(torch.zeros(0, 2), _M, _M), r"z must have shape \[B, d\] with B >= 1"),
        (lambda: vaekernels.marginal_kl(_Z, _M, _M, dataset_size=0), r"dataset_size must be a positive int"),
        (
            lambda: vaekernels.importance_sampled_nll(_X, None, None, num_samples=0),
            r"num_samples must be a positive int",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(call, message):
    with pytest.raises((ValueError, TypeError, IndexError), match=message):
        call()


def test_nan_inputs_propagate_to_nan_outputs(device_backend):
    device, _ = device_backend
    logits = torch.zeros(1, 2, 3, device=device)
    logits[0, 1, 2] = float("nan")
    out = vaekernels.bernoulli_log_prob(logits, torch.ones(1, 3, device=device))
    assert not torch.isnan(out[0, 0]) and torch.isnan(out[0, 1])


def test_gaussian_log_prob_takes_scalar_parameters(device_backend):
    device, _ = device_backend
    z, zero = (
        torch.randn(3, 4, 2, device=device, dtype=torch.float64),
        torch.zeros((), device=device, dtype=torch.float64),
    )
    assert torch.allclose(
        vaekernels.gaussian_log_prob(z, zero, zero),
        ref.gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z)),
        rtol=1e-13,
    )
    with pytest.raises(ValueError, match="must broadcast to at least one dim"):
        vaekernels.gaussian_log_prob(zero, zero, zero)


def test_without_the_cpp_extension_the_package_runs_on_the_reference():
    probe = (
        "import sys, warnings\n"
        "for name in ('vaekernels._C', 'vaekernels._cpu_default', 'vaekernels._cpu_avx2', 'vaekernels._cpu_avx512'):\n"
        "    sys.modules[name] = None  # as if built with VAEKERNELS_CPP=0\n"
        "import torch, vaekernels\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    zeros = torch.zeros(2, 3)\n"
        "    out = vaekernels.iwae_bound(torch.zeros(2, 3, 4), torch.ones(2, 4), zeros, zeros)\n"
        "print(vaekernels.available_backends()[-1], round(out[0].item(), 4), caught[0].message)\n"
    )
    env = {**os.environ, "VAEKERNELS_BACKEND": "auto"}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=False)
    assert run.returncode == 0, run.stderr
    backend, value, warning = run.stdout.split(" ", 2)
    assert backend == "reference" and float(value) == round(-4 * math.log(2), 4)
    assert "running the PyTorch reference because the C++ extension vaekernels._C is not built" in warning
