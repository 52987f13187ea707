"""Valid extremes that gave a silent NaN or a wrong number (issue 19), on every backend: each test
states the right value, worked out by hand or in float64 from the same rounded inputs."""

import copy
import math

import pytest
import torch

import vaekernels

INF = float("inf")
LOG_2PI = math.log(2 * math.pi)


@pytest.mark.parametrize("magnitude", [1e7, -1e7, 3e38, -3e38])
def test_log_mean_exp_weights_sum_to_one_whatever_the_output_rounds(device_backend, magnitude):
    # In float32 log_mean_exp of four equal entries rounds back to the entries (a unit of 1 at
    # 1e7); weights exp(x - out) / N then come out 1/6 for N = 6, where the softmax is 1/4.
    device, _ = device_backend
    x = torch.tensor(
        [[magnitude] * 4 + [-INF] * 2, [magnitude, magnitude - 1.0, -INF, -INF, -INF, -INF]],
        device=device,
        requires_grad=True,
    )
    vaekernels.log_mean_exp(x).sum().backward()
    expected = torch.softmax(x.detach().double(), -1)
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad.sum(-1), torch.ones(2, device=device), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_log_prob_of_infinite_logits_is_zero_or_minus_inf(device_backend, dtype):
    device, _ = device_backend
    # (logit, x, log p): a certain logit that matches x costs nothing; one that contradicts it,
    # or meets a fractional x, makes x impossible.
    cases = [
        (INF, 1.0, 0.0),
        (INF, 0.0, -INF),
        (-INF, 0.0, 0.0),
        (-INF, 1.0, -INF),
        (INF, 0.5, -INF),
        (-INF, 0.25, -INF),
    ]
    logits = torch.tensor([c[0] for c in cases], dtype=dtype, device=device).view(-1, 1, 1)
    x = torch.tensor([c[1] for c in cases], dtype=dtype, device=device).view(-1, 1)
    out = vaekernels.bernoulli_log_prob(logits, x)
    assert out.flatten().tolist() == [c[2] for c in cases]
    # In a row with finite terms the certain ones add exactly 0.
    finite = torch.tensor([1.5, -2.0], dtype=dtype, device=device)
    row = torch.cat([torch.tensor([INF, -INF], dtype=dtype, device=device), finite]).view(1, 1, 4)
    row.requires_grad_()
    x_row = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=dtype, device=device)
    out = vaekernels.bernoulli_log_prob(row, x_row)
    expected = torch.nn.functional.logsigmoid(finite[0]) + torch.nn.functional.logsigmoid(-finite[1])
    torch.testing.assert_close(out.flatten()[0], expected)
    out.sum().backward()
    torch.testing.assert_close(row.grad.flatten(), x_row.flatten() - torch.sigmoid(row.detach().flatten()))


@pytest.mark.parametrize("log_var", [-200.0, -1000.0])
def test_gaussian_log_prob_at_the_mean_of_a_tiny_variance_is_finite(device_backend, log_var):
    # exp(-log_var / 2) overflows float32 below -176: (x - mean) times it was 0 * inf = NaN.
    device, _ = device_backend
    d = 3
    x = torch.zeros(2, d, device=device, requires_grad=True)
    lv = torch.full((2, d), log_var, device=device, requires_grad=True)
    out = vaekernels.gaussian_log_prob(x, torch.zeros(d, device=device), lv)
    torch.testing.assert_close(out, torch.full((2,), -0.5 * d * (LOG_2PI + log_var), device=device))
    out.sum().backward()
    assert x.grad.abs().max() == 0
    torch.testing.assert_close(lv.grad, torch.full_like(lv, -0.5))


def test_gaussian_log_prob_of_a_tiny_difference_over_a_tiny_std_matches_float64(device_backend):
    device, _ = device_backend
    x = torch.tensor([[1e-38, 3e-30, 0.0]], device=device)
    lv = torch.tensor([[-200.0, -150.0, -200.0]], device=device)
    out = vaekernels.gaussian_log_prob(x, torch.zeros(3, device=device), lv)
    x64, lv64 = x.double(), lv.double()
    expected = -0.5 * (LOG_2PI + lv64 + x64 * x64 * torch.exp(-lv64)).sum(-1)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "estimator",
    ["aggregate_posterior_log_density", "marginal_kl", "mutual_information", "total_correlation", "per_dim"],
)
def test_aggregate_posterior_of_tiny_variances_is_finite(device_backend, estimator):
    # Each z_i sits on the mean of its own posterior of variance e^-200, far (in its stds) from
    # the others': log q(z_i) = log((1/N) N(z_i; z_i, e^-200)) and the other pairs weigh 0.
    device, _ = device_backend
    B, d = 3, 2
    z = (torch.arange(B * d, dtype=torch.float32, device=device).view(B, d)).requires_grad_()
    mean = z.detach().clone().requires_grad_()
    log_var = torch.full((B, d), -200.0, device=device, requires_grad=True)
    if estimator == "per_dim":
        out = vaekernels.aggregate_posterior_log_density(z, mean, log_var, per_dim=True)
        expected = torch.full((B, d), -0.5 * (LOG_2PI - 200.0) - math.log(B), device=device)
    else:
        out = getattr(vaekernels, estimator)(z, mean, log_var)
        joint = torch.full((B,), -0.5 * d * (LOG_2PI - 200.0) - math.log(B), device=device)
        expected = {
            "aggregate_posterior_log_density": joint,
            "marginal_kl": (joint + 0.5 * (d * LOG_2PI + z.detach().square().sum(-1))).mean(),
            "mutual_information": torch.tensor(math.log(B), device=device),
            "total_correlation": torch.tensor((d - 1) * math.log(B), device=device),
        }[estimator]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    out.sum().backward()
    for t in (z, mean, log_var):
        assert torch.isfinite(t.grad).all(), (estimator, t.grad)
    # Only each z_i's own posterior weighs, and at its mean: no pull on z or the means (but the
    # prior's, -log p(z) / B, in the marginal KL).
    torch.testing.assert_close(z.grad, z.detach() / B if estimator == "marginal_kl" else torch.zeros_like(z))
    assert mean.grad.abs().max() == 0


def test_logistic_mixture_with_infinite_log_scales(device_backend):
    device, _ = device_backend
    B, M, H, W = 1, 3, 2, 2
    x = torch.zeros(B, 3, H, W, device=device)
    # Every component infinitely wide in red: no bin has mass, the NLL is +inf.
    params = torch.zeros(B, 10 * M, H, W, device=device)
    params[:, 2 * M : 3 * M] = INF  # red's log-scales (logits M, red means M, red log-scales M)
    nll = vaekernels.discretized_logistic_mixture_nll(params, x, M, reduction="none")
    assert nll.eq(INF).all(), nll
    # One component infinitely wide: it has no mass and no gradient; the others are the mixture.
    params = torch.randn(B, 10 * M, H, W, device=device, generator=torch.Generator(device).manual_seed(0))
    params[:, 2 * M] = INF
    params.requires_grad_()
    nll = vaekernels.discretized_logistic_mixture_nll(params, x, M, reduction="none")
    # -log sum_m pi_m p_m(x) over the other components, their weights pi_m unchanged.
    without = params.detach().clone().double()
    without[:, 2 * M] = 0.0
    with vaekernels.use_backend("reference"):
        log_pi = torch.log_softmax(without[:, :M], 1)
        per_component = torch.stack(
            [
                -vaekernels.discretized_logistic_mixture_nll(
                    torch.cat(
                        [
                            torch.full_like(without[:, :M], -INF).index_fill(1, torch.tensor([m], device=device), 0.0),
                            without[:, M:],
                        ],
                        1,
                    ),
                    x.double(),
                    M,
                    reduction="none",
                )
                for m in range(1, M)
            ]
        )
    expected = -torch.logsumexp(torch.stack([log_pi[:, m] for m in range(1, M)]) + per_component, 0)
    torch.testing.assert_close(nll.double(), expected, rtol=1e-5, atol=1e-5)
    nll.sum().backward()
    assert torch.isfinite(params.grad).all()
    assert params.grad[:, [M, 2 * M, 3 * M]].abs().max() == 0  # its red mean, log-scale and coefficient


def test_logistic_mixture_in_bfloat16_is_computed_in_float32():
    # The reference fallback ran the bfloat16 inputs through bfloat16 arithmetic: 26% off the
    # float64 NLL of the same rounded inputs.
    generator = torch.Generator().manual_seed(0)
    params = torch.randn(2, 30, 4, 4, generator=generator).bfloat16()
    x = (torch.randint(0, 256, (2, 3, 4, 4), generator=generator) / 127.5 - 1).bfloat16()
    with vaekernels.use_backend("reference"):  # where a CPU bfloat16 call falls back to
        out = vaekernels.discretized_logistic_mixture_nll(params, x, 3)
        expected = vaekernels.discretized_logistic_mixture_nll(params.double(), x.double(), 3)
    assert out.dtype == torch.bfloat16
    assert abs(out.double().item() - expected.item()) <= 1e-2 * abs(expected.item())


@pytest.mark.parametrize("scale_q", [False, True])
def test_causal_attention_gradients_of_a_saturated_softmax(device_backend, scale_q):
    # A one-hot softmax has a score gradient of ~1e-180 (float64 reference); differently rounded
    # dO . v_j and dO . O made it 1e-3 to 1e-2 in d(q) and d(k), the score scale times the rounding.
    device, _ = device_backend
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(2, 70, 8, device=device, generator=generator) for _ in range(3))
    scale = None
    if scale_q:
        q = q * 1e4
    else:
        scale = 1e4
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn(2, 70, 8, device=device, generator=generator)
    vaekernels.causal_attention(*leaves, scale=scale).backward(grad_out)
    expected = [t.double().requires_grad_() for t in (q, k, v)]
    with vaekernels.use_backend("reference"):
        vaekernels.causal_attention(*expected, scale=scale).backward(grad_out.double())
    for got, want in zip(leaves, expected):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ["tanh", "relu", "leaky_relu"])
@pytest.mark.parametrize("layer", [0, 2])
def test_jacobian_of_an_infinite_weight_is_what_forward_mode_gives(device_backend, activation, layer):
    # Through WᵀW an infinite last-layer weight met inf - inf: NaN for every column, where
    # J = T Wᵀ has an infinite entry and its squared norm is inf (NaN only where forward mode
    # itself multiplies the infinite weight by a zero derivative: relu's inactive units).
    device, _ = device_backend
    torch.manual_seed(0)
    act = {"tanh": torch.nn.Tanh(), "relu": torch.nn.ReLU(), "leaky_relu": torch.nn.LeakyReLU(0.1)}[activation]
    decoder = torch.nn.Sequential(torch.nn.Linear(2, 5), act, torch.nn.Linear(5, 3)).to(device)
    with torch.no_grad():
        decoder[layer].weight[0, 0] = INF
    z = torch.randn(4, 2, device=device)
    norms = vaekernels.jacobian_column_sq_norms(decoder, z)
    gram = vaekernels.jacobian_gram(decoder, z)
    # Forward mode written out in float64: J = (act'(pre) * W1ᵀ) W2ᵀ, [B, d, D]. (jacfwd would
    # also multiply W1's infinity by the zero entries of the unit tangents: NaN in every column.)
    first, act64, last = copy.deepcopy(decoder).double()
    pre = first(z.double()).detach().requires_grad_()
    act64(pre).sum().backward()
    jac = (pre.grad[:, None, :] * first.weight.detach().t()) @ last.weight.detach().t()
    expected_norms, expected_gram = jac.square().sum(-1), jac @ jac.transpose(1, 2)
    if layer == 2:
        assert torch.isinf(expected_norms).any()
    torch.testing.assert_close(norms.double(), expected_norms, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(gram.double(), expected_gram, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(torch.diagonal(gram, dim1=1, dim2=2), norms, equal_nan=True)


def test_jacobian_of_a_weight_whose_square_overflows(device_backend):
    # One path z -> 1e-20 z -> 1e20 (.): J = 1 exactly, but WᵀW = 1e40 is inf in float32.
    device, _ = device_backend
    decoder = torch.nn.Sequential(
        torch.nn.Linear(1, 1, bias=False), torch.nn.LeakyReLU(0.5), torch.nn.Linear(1, 2, bias=False)
    ).to(device)
    with torch.no_grad():
        decoder[0].weight.fill_(1e-20)
        decoder[2].weight.copy_(torch.tensor([[1e20], [0.0]]))
    z = torch.tensor([[1.0], [-1.0]], device=device, requires_grad=True)
    norms = vaekernels.jacobian_column_sq_norms(decoder, z)
    torch.testing.assert_close(norms, torch.tensor([[1.0], [0.25]], device=device))
    torch.testing.assert_close(vaekernels.jacobian_gram(decoder, z).flatten(), norms.detach().flatten())
    norms.sum().backward()  # d/dW of (w2 w1 slope)^2 through the direct products: finite
    torch.testing.assert_close(decoder[2].weight.grad, torch.tensor([[2.5e-20], [0.0]], device=device))


@pytest.mark.parametrize("channels", [1, 3])
def test_logistic_mixture_gradient_at_large_log_scales(device_backend, channels):
    # Past a log-scale of ~20 (float32; ~35 in float64) the bin width exp(-s) / 127.5 makes
    # log1p(-exp(-width)) -inf in the branch that is not taken: the reference's gradient was NaN
    # (0 * inf through torch.where), and the float64 oracle with it, up to the width's floor.
    device, _ = device_backend
    M, side = 2, 8
    P = 3 * M if channels == 1 else 10 * M
    x = torch.linspace(-1, 1, side * side, device=device).view(1, 1, side, side).expand(1, channels, side, side)
    params = torch.randn(1, P, side, side, device=device, generator=torch.Generator(device).manual_seed(0))
    for c in range(channels):
        log_scales = M + c * (P - M) // channels + M
        params[:, log_scales] = (
            torch.tensor([20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 88.0, 100.0], device=device)
            .repeat_interleave(side)
            .view(side, side)
        )
    leaf = params.clone().requires_grad_()
    vaekernels.discretized_logistic_mixture_nll(leaf, x, M, reduction="sum").backward()
    expected = params.double().requires_grad_()
    with vaekernels.use_backend("reference"):
        vaekernels.discretized_logistic_mixture_nll(expected, x.double(), M, reduction="sum").backward()
    assert torch.isfinite(expected.grad).all()
    torch.testing.assert_close(leaf.grad.double(), expected.grad, rtol=1e-4, atol=1e-5)


def test_log_mean_exp_of_a_row_holding_plus_inf(device_backend):
    # out = +inf; the softmax's limit puts the gradient evenly on the +inf entries (exp(x - out)
    # was inf / inf = NaN there and made the whole row NaN); a NaN beside +inf stays NaN.
    device, _ = device_backend
    x = torch.tensor(
        [[INF, 1.0, -INF, 0.0], [INF, INF, 2.0, -3.0], [INF, float("nan"), 0.0, 0.0]], device=device, requires_grad=True
    )
    out = vaekernels.log_mean_exp(x)
    assert out[:2].tolist() == [INF, INF] and torch.isnan(out[2])
    grad_finite = torch.autograd.grad(out[:2].sum(), x, retain_graph=True)[0]
    grad_nan = torch.autograd.grad(out[2], x)[0]
    assert grad_finite[:2].tolist() == [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]
    assert torch.isnan(grad_nan[2, :2]).all()
    # Through the bound: a sample of log-weight +inf takes all the weight.
    logits = torch.zeros(1, 3, 2, device=device, requires_grad=True)
    log_pz = torch.tensor([[INF, 0.0, 0.0]], device=device)
    bound = vaekernels.iwae_bound(logits, torch.ones(1, 2, device=device), log_pz, torch.zeros(1, 3, device=device))
    bound.backward()
    assert bound.item() == INF
    torch.testing.assert_close(logits.grad, torch.tensor([[[0.5, 0.5], [0.0, 0.0], [0.0, 0.0]]], device=device))


@pytest.mark.parametrize("distance", [1e4, -1e30])
def test_total_correlation_of_a_far_code_is_finite_and_right(device_backend, distance):
    # z_00 far from every posterior mean: in float32 its log-density terms round by units (1e4
    # out) or overflow to -inf (1e30 out), and the correlation, which subtracts them, was off by
    # those units or inf - inf = NaN. Its value is finite: the nearest posterior j* in that dim
    # outweighs the others by exp(-huge), so row 0's correlation is
    # sum_{k > 0} [l_0j*k - logsumexp_j l_0jk + log N], computed here in float64. (A float64 run of
    # the unshifted formula is no oracle at 1e30: its terms ~ -3e59 swallow the rest.)
    device, _ = device_backend
    generator = torch.Generator(device).manual_seed(0)
    z, mean, log_var = (torch.randn(4, 3, device=device, generator=generator) for _ in range(3))
    z[0, 0] = distance
    inputs = [t.clone().requires_grad_() for t in (z, mean, log_var)]
    correlation = vaekernels.total_correlation(*inputs)
    grads = torch.autograd.grad(correlation, inputs)

    exact_inputs = [t.double().requires_grad_() for t in (z, mean, log_var)]
    z64, mean64, log_var64 = exact_inputs
    with vaekernels.use_backend("reference"):
        joint = vaekernels.aggregate_posterior_log_density(z64[1:], mean64, log_var64)
        marginals = vaekernels.aggregate_posterior_log_density(z64[1:], mean64, log_var64, per_dim=True)
    nearest = ((z64[0, 0] - mean64[:, 0]).abs() * torch.exp(-0.5 * log_var64[:, 0])).argmin()
    terms = -0.5 * (LOG_2PI + log_var64[:, 1:] + (z64[0, 1:] - mean64[:, 1:]) ** 2 / log_var64[:, 1:].exp())
    far_row = (terms[nearest] - torch.logsumexp(terms, 0) + math.log(4)).sum()
    exact = (far_row + (joint - marginals.sum(-1)).sum()) / 4
    exact_grads = torch.autograd.grad(exact, exact_inputs)
    torch.testing.assert_close(correlation.double(), exact, rtol=1e-5, atol=1e-5)
    for grad, exact_grad in zip(grads, exact_grads):
        torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value", [INF, -INF])
def test_aggregate_posterior_of_an_infinite_code_is_minus_inf(device_backend, value):
    # No posterior has density at an infinite z: log q(z_i) = -inf, the other rows as without it.
    # (C++: the padding lanes' 1 / std of 0 times an infinite difference gave NaN for the row.)
    device, _ = device_backend
    generator = torch.Generator(device).manual_seed(0)
    z, mean, log_var = (torch.randn(5, 3, device=device, generator=generator) for _ in range(3))
    z[1, 2] = value
    joint = vaekernels.aggregate_posterior_log_density(z, mean, log_var)
    per_dim = vaekernels.aggregate_posterior_log_density(z, mean, log_var, per_dim=True)
    with vaekernels.use_backend("reference"):
        expected = vaekernels.aggregate_posterior_log_density(z.double(), mean.double(), log_var.double())
        expected_per_dim = vaekernels.aggregate_posterior_log_density(
            z.double(), mean.double(), log_var.double(), per_dim=True
        )
    assert joint[1].item() == -INF and per_dim[1, 2].item() == -INF
    torch.testing.assert_close(joint.double(), expected)
    torch.testing.assert_close(per_dim.double(), expected_per_dim)


def test_gaussian_kl_at_an_infinite_log_var(device_backend):
    # KL = (exp(lv) - 1 - lv + mean^2) / 2 is +inf and so is its slope in lv; the reference's
    # unselected branch expm1(lv) - lv gave its 0 * inf = NaN to the gradient.
    device, _ = device_backend
    mean = torch.tensor([[0.5, 1.0]], device=device, requires_grad=True)
    log_var = torch.tensor([[INF, 0.3]], device=device, requires_grad=True)
    out = vaekernels.gaussian_kl(mean, log_var)
    out.sum().backward()
    assert out.item() == INF
    assert mean.grad.tolist() == [[0.5, 1.0]]
    assert log_var.grad[0, 0].item() == INF
    torch.testing.assert_close(log_var.grad[0, 1], 0.5 * torch.expm1(torch.tensor(0.3, device=device)))


@pytest.mark.parametrize("activation", [torch.nn.ReLU, torch.nn.ELU, torch.nn.Tanh, torch.nn.LeakyReLU])
def test_jacobian_of_a_nan_code_is_nan_where_it_reaches(device_backend, activation):
    # Triton's relu and elu dropped a NaN pre-activation (tl.where(x > 0, x, 0), tl.minimum):
    # finite columns for an example whose code is NaN, where torch's activations keep it NaN.
    device, _ = device_backend
    torch.manual_seed(0)
    decoder = torch.nn.Sequential(
        torch.nn.Linear(2, 5), activation(), torch.nn.Linear(5, 4), torch.nn.Softplus(), torch.nn.Linear(4, 3)
    ).to(device)
    z = torch.randn(3, 2, device=device)
    z[0, 0] = float("nan")
    norms = vaekernels.jacobian_column_sq_norms(decoder, z)
    expected = torch.func.vmap(torch.func.jacfwd(copy.deepcopy(decoder).double()))(z.double()).square().sum(1)
    assert torch.isnan(norms[0]).all()
    torch.testing.assert_close(norms.double(), expected, rtol=1e-5, atol=1e-6, equal_nan=True)


def _same_values(got, want):
    """NaN where want is NaN, the same infinities, and close elsewhere."""
    got, want = got.detach().double(), want.detach().double()
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    assert torch.equal(got[torch.isinf(want)], want[torch.isinf(want)]), (got, want)
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-5)


def _with_grads(fn, tensors, weights):
    """fn(*tensors) and the gradients of sum(fn * weights) with respect to every tensor."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return out, torch.autograd.grad((out * weights.to(out.dtype)).sum(), leaves)


def _two_logistics_with(device, seed, channel, value):
    """Mixture parameters [1, 6, 2, 3] (two logistics, one channel) with ``value`` at ``channel`` of pixel
    (0, 0), a cotangent, and the per-pixel NLL of a random 256-level image under them."""
    generator = torch.Generator(device).manual_seed(seed)
    params = torch.randn(1, 6, 2, 3, device=device, generator=generator)
    params[0, channel, 0, 0] = value
    x = torch.randint(0, 256, (1, 1, 2, 3), device=device, generator=generator) / 127.5 - 1
    weights = torch.randn(1, 2, 3, device=device, generator=generator)

    def nll(p):
        return vaekernels.discretized_logistic_mixture_nll(p, x.to(p.dtype), 2, reduction="none")

    return params, weights, nll


@pytest.mark.parametrize("component", [0, 1])
def test_logistic_mixture_of_a_huge_logit_keeps_the_log_probability(device_backend, component):
    # logit_m + log p_m(x) in float32 lost log p_m(x) to a logit of 1e30 (the NLL came out 0,
    # where it is -log p_m(x) of the one component whose weight is 1: 6.78 here); the kernels now
    # take log pi_m = logit_m - log sum exp(logits) first, as the reference's log_softmax.
    params, weights, nll = _two_logistics_with(device_backend[0], 0, component, 1e30)
    out, (grad,) = _with_grads(nll, [params], weights)
    with vaekernels.use_backend("reference"):
        want, (want_grad,) = _with_grads(nll, [params.double()], weights)
        # The pixel's NLL is that of component `component` alone, its weight 1.
        alone = params.double().clone()
        alone[0, 1 - component, 0, 0] = -INF
        alone[0, component, 0, 0] = 0.0
        assert abs(nll(alone)[0, 0, 0].item() - want[0, 0, 0].item()) < 1e-9
    assert out[0, 0, 0].item() > 1.0
    _same_values(out, want)
    _same_values(grad, want_grad)


@pytest.mark.parametrize("where", [1, 2, 4])  # a logit, a mean, a log-scale of pixel (0, 0)
def test_logistic_mixture_gradient_of_a_nan_pixel_is_nan(device_backend, where):
    # The C++ kernel's exp clamps its argument, NaN included: a pixel whose NLL is NaN got +-inf
    # gradients instead of NaN. NaN now reaches the pixel's gradient wherever autograd's does,
    # and no other pixel.
    params, weights, nll = _two_logistics_with(device_backend[0], 1, where, float("nan"))
    out, (grad,) = _with_grads(nll, [params], weights)
    with vaekernels.use_backend("reference"):
        want, (want_grad,) = _with_grads(nll, [params.double()], weights)
    assert out[0, 0, 0].isnan() and grad[0, :, 0, 0].isnan().any()
    assert torch.isfinite(grad[..., 1:]).all()
    _same_values(out, want)
    _same_values(grad, want_grad)


@pytest.mark.parametrize("value", [INF, -INF, float("nan")])
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_causal_attention_row_zero_reaches_nothing(device_backend, value, tensor):
    # Row 0 attends to no key: its output is 0 and its q reaches nothing. An infinite or NaN q_0
    # made 0 * inf = NaN in every d(k_j) (C++, Triton and the reference, whose d(k) = dS^T q), and
    # an infinite v_0 (seen by every later row) 0 * inf = NaN in row 0's output.
    device, _ = device_backend
    generator = torch.Generator(device).manual_seed(2)
    q, k, v = (torch.randn(2, 9, 4, device=device, generator=generator) for _ in range(3))
    weights = torch.randn(2, 9, 4, device=device, generator=generator)
    planted = {"q": q, "k": k, "v": v}[tensor].clone()
    planted[:, 0, 1] = value
    inputs = [planted if name == tensor else t for name, t in (("q", q), ("k", k), ("v", v))]
    out, grads = _with_grads(vaekernels.causal_attention, inputs, weights)
    with vaekernels.use_backend("reference"):
        want, want_grads = _with_grads(vaekernels.causal_attention, [t.double() for t in inputs], weights)
    assert out[:, 0].eq(0).all()
    if tensor == "q":
        # Nothing depends on q_0: every value and gradient is finite, d(q_0) is 0.
        assert all(torch.isfinite(t).all() for t in (out, *grads)) and grads[0][:, 0].eq(0).all()
        with vaekernels.use_backend("reference"):
            zeroed, zeroed_grads = _with_grads(
                vaekernels.causal_attention,
                [q.double().index_fill(1, torch.tensor([0], device=device), 0.0), k.double(), v.double()],
                weights,
            )
        _same_values(want, zeroed)
        for a, b in zip(want_grads, zeroed_grads):
            _same_values(a, b)
    _same_values(out, want)
    for a, b in zip(grads, want_grads):
        _same_values(a, b)


@pytest.mark.parametrize("value", [INF, float("nan")])
def test_causal_attention_of_one_position_has_zero_gradients(device_backend, value):
    # L = 1: no row attends to anything, every gradient is 0 whatever k and v hold. Triton's
    # padding rows (past L in its block of queries) took key 0 as allowed: their zero q times a
    # NaN or infinite k_0 was NaN, which reached d(k) and d(v) through their zero dO.
    device, _ = device_backend
    generator = torch.Generator(device).manual_seed(6)
    q, k, v = (torch.randn(3, 1, n, device=device, generator=generator) for n in (2, 2, 5))
    k[0, 0, 0] = value
    v[1, 0, 0] = value
    out, grads = _with_grads(vaekernels.causal_attention, [q, k, v], torch.randn(3, 1, 5, device=device))
    assert out.eq(0).all() and all(g.eq(0).all() for g in grads)


def test_causal_attention_of_a_row_without_a_softmax_is_nan(device_backend):
    # A row whose scores are all -inf has no softmax (0 / 0): NaN, as the reference's softmax
    # gives; the kernels returned 0, as for row 0, which has no keys.
    device, _ = device_backend
    q = torch.zeros(1, 3, 2, device=device)
    k = torch.zeros(1, 3, 2, device=device)
    v = torch.ones(1, 3, 2, device=device)
    q[0, 1:, 0] = -1.0
    k[0, 0, 0] = INF  # row 1's only score: -inf; row 2's first score -inf too, its second 0
    out = vaekernels.causal_attention(q, k, v)
    assert out[0, 0].eq(0).all() and out[0, 1].isnan().all() and out[0, 2].eq(1).all()
    with vaekernels.use_backend("reference"):
        _same_values(out, vaekernels.causal_attention(q.double(), k.double(), v.double()))


def test_iwae_bound_gradient_of_a_nan_example_is_nan(device_backend):
    # Triton: an example whose log-weights are all NaN looked like one whose log-weights are all
    # -inf (the row's max skips NaN) and got zero weights: a zero gradient for a NaN bound.
    device, _ = device_backend
    generator = torch.Generator(device).manual_seed(3)
    logits = torch.randn(2, 3, 5, device=device, generator=generator)
    x = torch.rand(2, 5, device=device, generator=generator).round()
    x[0, 1] = float("nan")
    log_pz, log_qz = (torch.randn(2, 3, device=device, generator=generator) for _ in range(2))
    weights = torch.randn(2, device=device, generator=generator)

    def bound(logits, log_pz, log_qz):
        return vaekernels.iwae_bound(logits, x.to(logits.dtype), log_pz, log_qz)

    out, grads = _with_grads(bound, [logits, log_pz, log_qz], weights)
    with vaekernels.use_backend("reference"):
        want, want_grads = _with_grads(bound, [t.double() for t in (logits, log_pz, log_qz)], weights)
    assert out[0].isnan() and all(g[0].isnan().all() and torch.isfinite(g[1]).all() for g in grads)
    _same_values(out, want)
    for a, b in zip(grads, want_grads):
        _same_values(a, b)


@pytest.mark.parametrize("tensor", ["x", "mean"])
@pytest.mark.parametrize("value", [INF, -INF])
def test_gaussian_log_prob_of_an_infinite_value_holds_w_constant(device_backend, tensor, value):
    # An infinite x or mean: w = inf, held constant, d/dlog_var = -g/2 from that element (the
    # kernels'); the reference's d/dlog_var was 0 * inf = NaN (its zero gradient times the
    # infinite x - mean).
    device, _ = device_backend
    generator = torch.Generator(device).manual_seed(4)
    x, mean = torch.randn(2, 3, 5, device=device, generator=generator), torch.randn(2, 1, 5, device=device)
    log_var = torch.randn(5, device=device, generator=generator)
    {"x": x, "mean": mean}[tensor].view(-1)[0] = value
    weights = torch.randn(2, 3, device=device, generator=generator)
    out, grads = _with_grads(vaekernels.gaussian_log_prob, [x, mean, log_var], weights)
    with vaekernels.use_backend("reference"):
        want, want_grads = _with_grads(vaekernels.gaussian_log_prob, [t.double() for t in (x, mean, log_var)], weights)
    assert out.view(-1)[0].item() == -INF and all(torch.isfinite(g).all() for g in grads)
    _same_values(out, want)
    for a, b in zip(grads, want_grads):
        _same_values(a, b)


def test_gaussian_log_prob_of_a_zero_variance(device_backend):
    # log_var = -inf: a density of 0 away from the mean (-inf; the reference gave -inf + inf = NaN),
    # +inf at the mean.
    device, _ = device_backend
    x = torch.tensor([[0.5, 1.0], [0.0, 1.0]], device=device)
    mean = torch.zeros(2, device=device)
    log_var = torch.tensor([-INF, 0.0], device=device)
    out = vaekernels.gaussian_log_prob(x, mean, log_var)
    assert out.tolist() == [-INF, INF]


@pytest.mark.parametrize("tensor", ["z", "mean", "log_var"])
def test_aggregate_posterior_gradients_at_infinite_inputs(device_backend, tensor):
    # An infinite z_i (density 0 under every posterior): no gradient from row i (the kernels' weights
    # were exp(-inf - -inf) = NaN); an infinite mean or a zero variance: that pair weighs 0, its
    # gradients too. Every backend as the float64 reference.
    device, _ = device_backend
    generator = torch.Generator(device).manual_seed(5)
    z, mean, log_var = (torch.randn(4, 3, device=device, generator=generator) for _ in range(3))
    {"z": z, "mean": mean, "log_var": log_var}[tensor][0, 0] = -INF if tensor == "log_var" else INF
    for name in ("aggregate_posterior_log_density", "marginal_kl", "mutual_information", "total_correlation"):
        fn = getattr(vaekernels, name)
        weights = torch.randn(4 if name == "aggregate_posterior_log_density" else (), device=device)
        out, grads = _with_grads(fn, [z, mean, log_var], weights)
        with vaekernels.use_backend("reference"):
            want, want_grads = _with_grads(fn, [t.double() for t in (z, mean, log_var)], weights)
        _same_values(out, want)
        for a, b in zip(grads, want_grads):
            _same_values(a, b)
        if tensor == "z" and name == "aggregate_posterior_log_density":
            assert out[0].item() == -INF and grads[0][0].eq(0).all() and torch.isfinite(grads[1]).all()
