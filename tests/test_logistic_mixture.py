"""The PixelCNN++ discretised logistic mixture: parity with the reference and with openai/pixel-cnn's
formula, edge bins, extreme parameters, registration (opcheck, gradcheck, compile), bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import device_backends, namespace, rel_err

import vaekernels
from vaekernels import _backend
from vaekernels.reference import logistic_mixture as ref

# ||out - ref|| / ||ref|| bounds against a float64 reference.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-11}
NATIVE = [pair for pair in device_backends() if pair[1] != "reference"]


def make_inputs(B, C, M, H, W, *, dtype=torch.float64, device="cpu", seed=0, scale=1.0):
    """Ordinary network outputs and data on the 256-level grid, the edges 0 and 255 included."""
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(B, ref.num_params(C, M), H, W, generator=g, dtype=torch.float64) * scale
    pixels = torch.randint(0, 256, (B, C, H, W), generator=g)
    pixels.view(-1)[::7] = 0
    pixels.view(-1)[3::7] = 255
    x = pixels.double() / 127.5 - 1
    return params.to(device=device, dtype=dtype), x.to(device=device, dtype=dtype)


def openai_formula(params, x, M):
    """openai/pixel-cnn's discretized_mix_logistic_loss (pixel_cnn_pp/nn.py), transcribed from its
    equations to channels-first PyTorch: sigmoid differences, tf.select branches. Per-pixel NLL."""
    C = x.shape[1]
    logits, means, log_scales, coeffs = ref.unpack(params, C, M)
    log_scales = torch.clamp(log_scales, min=-7.0)
    xs = x.unsqueeze(2)
    if C == 3:
        c = torch.tanh(coeffs)
        means = torch.stack(
            [means[:, 0], means[:, 1] + c[:, 0] * xs[:, 0], means[:, 2] + c[:, 1] * xs[:, 0] + c[:, 2] * xs[:, 1]], 1
        )
    centred, inv_stdv = xs - means, torch.exp(-log_scales)
    plus_in, min_in = inv_stdv * (centred + 1 / 255), inv_stdv * (centred - 1 / 255)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_stdv * centred
    log_pdf_mid = mid_in - log_scales - 2 * F.softplus(mid_in)
    log_probs = torch.where(
        xs < -0.999,
        plus_in - F.softplus(plus_in),
        torch.where(
            xs > 0.999,
            -F.softplus(min_in),
            torch.where(cdf_delta > 1e-5, torch.log(torch.clamp(cdf_delta, min=1e-12)), log_pdf_mid - math.log(127.5)),
        ),
    )
    return -torch.logsumexp(log_probs.sum(1) + torch.log_softmax(logits, 1), 1)


def run(fn, params, x, M):
    """The per-pixel NLL and its params gradient under a fixed random cotangent."""
    params = params.detach().clone().requires_grad_()
    nll = fn(params, x, M, reduction="none")
    cotangent = torch.randn(nll.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (nll * cotangent.to(nll)).sum().backward()
    return nll.detach(), params.grad


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,C,M,H,W", [(1, 1, 1, 1, 1), (2, 3, 3, 5, 7), (3, 1, 4, 3, 11), (1, 3, 2, 6, 13)])
def test_matches_reference(device_backend, dtype, B, C, M, H, W):
    device, _ = device_backend
    params, x = make_inputs(B, C, M, H, W, dtype=dtype, device=device)
    out, grad = run(vaekernels.discretized_logistic_mixture_nll, params, x, M)
    expected, expected_grad = run(ref.discretized_logistic_mixture_nll, params.double(), x.double(), M)
    assert out.dtype == dtype and grad.dtype == dtype
    assert rel_err(out, expected) <= RTOL[dtype]
    assert rel_err(grad, expected_grad) <= RTOL[dtype] * 10


@pytest.mark.parametrize("C", [1, 3])
def test_float32_matches_reference_across_scales(device_backend, C):
    """Log-scales spread over [-7, 3], so that bin widths (2/255) / scale run from 0.0004 to 8.6:
    both sides of 0.7, where the C++ kernel's float expm1 changes formula (csrc/cpu/fast_math.h),
    and into the density branch; coefficients over [-6, 6], where tanh saturates."""
    device, _ = device_backend
    M = 4
    params, x = make_inputs(3, C, M, 5, 9, device=device, seed=11)
    logits, means, log_scales, coeffs = ref.unpack(params, C, M)
    g = torch.Generator().manual_seed(12)
    log_scales.copy_(torch.rand(log_scales.shape, generator=g, dtype=torch.float64) * 10 - 7)
    means.copy_(x.unsqueeze(2) + torch.randn(means.shape, generator=g, dtype=torch.float64) * 0.02)
    if coeffs is not None:
        coeffs.mul_(3)
    out, grad = run(vaekernels.discretized_logistic_mixture_nll, params.float(), x.float(), M)
    expected, expected_grad = run(ref.discretized_logistic_mixture_nll, params, x, M)
    assert ((out.double() - expected).abs() / expected.abs()).max().item() <= 1e-5
    assert rel_err(grad, expected_grad) <= RTOL[torch.float32] * 10


@pytest.mark.parametrize("C", [1, 3])
def test_matches_openai_formula_within_1e_5(device_backend, C):
    device, _ = device_backend
    params, x = make_inputs(2, C, 5, 6, 7, dtype=torch.float32, device=device, seed=C)
    out = vaekernels.discretized_logistic_mixture_nll(params, x, 5, reduction="none")
    expected = openai_formula(params.double(), x.double(), 5)
    assert ((out.double() - expected).abs() / expected.abs()).max().item() <= 1e-5


def test_reductions_and_bits_per_dim(device_backend):
    device, _ = device_backend
    params, x = make_inputs(3, 3, 2, 4, 5, device=device)
    per_pixel = vaekernels.discretized_logistic_mixture_nll(params, x, 2, reduction="none")
    torch.testing.assert_close(vaekernels.discretized_logistic_mixture_nll(params, x, 2), per_pixel.sum())
    torch.testing.assert_close(
        vaekernels.discretized_logistic_mixture_nll(params, x, 2, reduction="mean"), per_pixel.sum((1, 2)).mean()
    )


def test_probabilities_of_all_256_values_sum_to_one(device_backend):
    """The bins tile the real line: the edge bins take the tails, so the masses sum to exactly 1."""
    device, _ = device_backend
    g = torch.Generator().manual_seed(5)
    # One 16x16 image holding every value, the same mixture at every pixel.
    params = (torch.randn(1, 3 * 4, 1, 1, generator=g, dtype=torch.float64) * 0.5).expand(1, -1, 16, 16)
    x = (torch.arange(256, dtype=torch.float64) / 127.5 - 1).view(1, 1, 16, 16)
    nll = vaekernels.discretized_logistic_mixture_nll(params.to(device).contiguous(), x.to(device), 4, "none")
    assert abs(torch.exp(-nll).sum().item() - 1.0) < 1e-6


def test_edges_take_the_logistic_tails_exactly(device_backend):
    """One component, x = -1: log sigmoid((x + 1/255 - mu) / s); x = 1: log sigmoid(-(x - 1/255 - mu) / s)."""
    device, _ = device_backend
    mean, log_scale = 0.3, -2.0
    params = torch.tensor([0.0, mean, log_scale], dtype=torch.float64).view(1, 3, 1, 1).expand(2, 3, 1, 1)
    x = torch.tensor([-1.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1)
    nll = vaekernels.discretized_logistic_mixture_nll(params.to(device).contiguous(), x.to(device), 1, "none")
    s = math.exp(log_scale)
    low = -math.log1p(math.exp(-((-1 + 1 / 255 - mean) / s)))
    high = -math.log1p(math.exp((1 - 1 / 255 - mean) / s))
    torch.testing.assert_close(-nll.flatten().cpu(), torch.tensor([low, high], dtype=torch.float64), rtol=1e-12, atol=0)


def test_tiny_probability_branch_is_density_times_width(device_backend):
    """A bin of mass below 1e-5 (mean far away, narrow scale): log density at x + log(2/255)."""
    device, _ = device_backend
    mean, log_scale, value = 0.9, -4.0, -0.2
    params = torch.tensor([0.0, mean, log_scale], dtype=torch.float64).view(1, 3, 1, 1)
    x = torch.full((1, 1, 1, 1), value, dtype=torch.float64)
    nll = vaekernels.discretized_logistic_mixture_nll(params.to(device), x.to(device), 1, "none").item()
    s, z = math.exp(log_scale), (value - mean) / math.exp(log_scale)
    log_density = -z - log_scale - 2 * math.log1p(math.exp(-z))  # log logistic pdf, the stable form for z < 0
    assert log_density + math.log(2 / 255) < math.log(1e-5)
    assert abs(-nll - (log_density - math.log(127.5))) <= 1e-12 * abs(nll)
    assert s > 0


def test_bin_mass_has_no_cancellation_in_the_tails(device_backend):
    """x about 8.5 scales above the mean (mass 2e-5): sigmoid(p) - sigmoid(m) of two numbers near 1
    loses digits in float32 (openai's form is off by 3.6e-4 relative); the log form keeps them."""
    device, _ = device_backend
    params = torch.tensor([0.0, -0.7, -2.5], dtype=torch.float64).view(1, 3, 1, 1)
    x = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    expected = ref.discretized_logistic_mixture_nll(params, x, 1, "none").item()
    naive = openai_formula(params.float(), x.float(), 1).item()
    out = vaekernels.discretized_logistic_mixture_nll(params.float().to(device), x.float().to(device), 1, "none")
    assert abs(naive - expected) > 1e-4 * abs(expected)
    assert abs(out.item() - expected) <= 1e-6 * abs(expected)


@pytest.mark.parametrize("C", [1, 3])
def test_extreme_parameters_give_finite_values_and_gradients(device_backend, C):
    device, _ = device_backend
    M = 3
    params, x = make_inputs(2, C, M, 4, 5, dtype=torch.float64, device=device)
    logits, means, log_scales, coeffs = ref.unpack(params, C, M)
    with torch.no_grad():
        logits[0] = 1e4
        logits[1, 0] = -1e4
        means[0] = 60.0  # far outside [-1, 1]
        means[1] = -1e3
        log_scales[0] = -7.0  # at the clamp
        log_scales[1, :, 0] = -50.0  # below it
        log_scales[1, :, 1] = 100.0  # a scale of e^100: the bin width underflows
        if coeffs is not None:
            coeffs[0] = 1e3
    for dtype in (torch.float32, torch.float64):
        out, grad = run(vaekernels.discretized_logistic_mixture_nll, params.to(dtype), x.to(dtype), M)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    # Parity in float64, where the gradients' rounding noise (1e-8 in float32 next to exact 1e-17s) is gone.
    expected, expected_grad = run(ref.discretized_logistic_mixture_nll, params, x, M)
    assert rel_err(out, expected) <= 1e-12
    assert rel_err(grad, expected_grad) <= 1e-10


@pytest.mark.parametrize("C", [1, 3])
def test_nan_parameters_stay_in_their_pixel(device_backend, C):
    device, _ = device_backend
    M = 3
    params, x = make_inputs(2, C, M, 4, 5, dtype=torch.float32, device=device)
    poisoned = params.clone()
    _, _, log_scales, _ = ref.unpack(poisoned, C, M)
    log_scales[1, 0, 1, 2, 3] = float("nan")
    clean_out, clean_grad = run(vaekernels.discretized_logistic_mixture_nll, params, x, M)
    out, grad = run(vaekernels.discretized_logistic_mixture_nll, poisoned, x, M)
    pixel = torch.zeros_like(out, dtype=torch.bool)
    pixel[1, 2, 3] = True
    assert out[pixel].isnan().all()
    assert torch.equal(out[~pixel], clean_out[~pixel])
    assert not torch.isfinite(grad[1, :, 2, 3]).all()
    others = torch.ones_like(grad, dtype=torch.bool)
    others[1, :, 2, 3] = False
    assert torch.equal(grad[others], clean_grad[others])


def test_saves_only_inputs_and_the_per_pixel_nll(device_backend):
    device, _ = device_backend
    params, x = make_inputs(2, 3, 4, 5, 6, dtype=torch.float32, device=device)
    params.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        vaekernels.discretized_logistic_mixture_nll(params, x, 4)
    if _backend.choose("discretized_logistic_mixture_nll", params.device, params.dtype) != "reference":
        extra = [t for t in saved if t.data_ptr() not in (params.data_ptr(), x.data_ptr())]
        assert sum(t.numel() for t in extra) <= 2 * 5 * 6


# ----------------------------------------------------------------------------- sampling


def test_sampler_draws_from_the_mixture():
    """A single sharp component: samples sit at its mean; the grid rounding and clamping hold."""
    M, C = 2, 3
    params = torch.zeros(4000, ref.num_params(C, M), 1, 1)
    logits, means, log_scales, coeffs = ref.unpack(params, C, M)
    logits[:, 0], logits[:, 1] = 20.0, -20.0
    means[:, :, 0] = torch.tensor([0.5, -0.2, 3.0]).view(1, 3, 1, 1)
    log_scales[:] = -7.0
    coeffs[:, 0, 0] = 10.0  # tanh -> 1: green = its mean + red
    x = vaekernels.discretized_logistic_mixture_sample(params, C, M, torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.round((x + 1) * 127.5) / 127.5 - 1)
    assert (x[:, 0] - 0.5).abs().max() < 0.01
    assert (x[:, 1] - (-0.2 + x[:, 0])).abs().max() < 0.02  # two roundings to the grid
    assert torch.equal(x[:, 2], torch.ones_like(x[:, 2]))  # clamped


def test_sampler_matches_the_likelihood():
    """Empirical frequencies of one pixel's values, in 16 groups of 16 levels, against exp(-nll)."""
    M = 3
    g = torch.Generator().manual_seed(1)
    one = torch.randn(1, 3 * M, 1, 1, generator=g, dtype=torch.float64) * 0.3
    x = vaekernels.discretized_logistic_mixture_sample(one.expand(20000, -1, -1, -1), 1, M, g)
    levels = torch.round((x.flatten() + 1) * 127.5).long()
    counts = torch.bincount(levels // 16, minlength=16).double() / x.numel()
    grid = (torch.arange(256, dtype=torch.float64) / 127.5 - 1).view(256, 1, 1, 1)
    probs = torch.exp(-ref.discretized_logistic_mixture_nll(one.expand(256, -1, -1, -1), grid, M, "none").flatten())
    assert (counts - probs.view(16, 16).sum(1)).abs().sum() < 0.03  # sampling noise: ~0.015


# ----------------------------------------------------------------------------- registration


@pytest.mark.parametrize("device_backend", NATIVE, ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("C", [1, 3])
def test_opcheck(device_backend, C):
    device, backend = device_backend
    params, x = make_inputs(2, C, 2, 3, 5, device=device)
    ops = namespace(backend)
    torch.library.opcheck(ops.discretized_logistic_mixture_nll.default, (params.requires_grad_(), x, 2))
    nll = ops.discretized_logistic_mixture_nll(params.detach(), x, 2)
    torch.library.opcheck(
        ops.discretized_logistic_mixture_nll_backward.default, (torch.randn_like(nll), params.detach(), x, nll, 2)
    )


@pytest.mark.parametrize("device_backend", NATIVE, ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("C", [1, 3])
def test_gradcheck_float64(device_backend, C):
    device, backend = device_backend
    params, x = make_inputs(1, C, 2, 1, 2, device=device, seed=4)
    with vaekernels.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda p: vaekernels.discretized_logistic_mixture_nll(p, x, 2, "none"),
            (params.requires_grad_(),),
            eps=1e-6,
            atol=1e-7,
            rtol=1e-5,
        )


@pytest.mark.parametrize("device_backend", NATIVE, ids=lambda p: f"{p[0]}-{p[1]}")
def test_compile_fullgraph_matches_eager(device_backend):
    device, backend = device_backend
    params, x = make_inputs(2, 3, 2, 3, 4, device=device)
    params.requires_grad_()

    def loss(p):
        return vaekernels.discretized_logistic_mixture_nll(p, x, 2, reduction="mean")

    torch._dynamo.reset()
    with vaekernels.use_backend(backend):
        eager = loss(params)
        (eager_grad,) = torch.autograd.grad(eager, params)
        out = torch.compile(loss, fullgraph=True)(params)
        (out_grad,) = torch.autograd.grad(out, params)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(out_grad, eager_grad)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda p, x: (p[:, :-1], x), ValueError, r"params must have P = 10 \* num_mixtures = 20 channels"),
        (lambda p, x: (p, x[:, :2]), ValueError, "1 or 3 channels, got 2"),
        (lambda p, x: (p, x[..., :-1]), ValueError, "x must have shape"),
        (lambda p, x: (p[0], x), ValueError, r"params must have shape \[B, P, H, W\]"),
        (lambda p, x: (p.long(), x), TypeError, "params must be a floating-point tensor"),
        (lambda p, x: (p, x.double()), TypeError, "x must have the dtype of params"),
        (lambda p, x: (p[:0], x[:0]), ValueError, "non-empty batch"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, match):
    params, x = make_inputs(2, 3, 2, 3, 4, dtype=torch.float32)
    params, x = change(params, x)
    with pytest.raises(error, match=match):
        vaekernels.discretized_logistic_mixture_nll(params, x, 2)


def test_bad_options_raise_clear_errors():
    params, x = make_inputs(1, 1, 2, 3, 4)
    with pytest.raises(ValueError, match="num_mixtures must be an int >= 1, got 0"):
        vaekernels.discretized_logistic_mixture_nll(params, x, 0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        vaekernels.discretized_logistic_mixture_nll(params, x, 2, reduction="avg")
    with pytest.raises(ValueError, match="discretized_logistic_mixture_sample: the data must have 1 or 3"):
        vaekernels.discretized_logistic_mixture_sample(params, 2, 2)
