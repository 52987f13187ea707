"""Property-based tests (hypothesis) over every public op and module: shapes (1 and primes
included), dtypes, layouts (non-contiguous, expanded, channels_last, storage offsets) and
extreme-but-valid values, each fused backend against the reference in float64 on the same rounded
inputs, outputs and gradients; and bad arguments, which must raise a ValueError or TypeError
whose message starts with the public function and names the argument.

Profiles: ``ci`` (the default: a fixed number of examples, derandomized, no example database) and
``long`` (HYPOTHESIS_PROFILE=long: many more, randomized, for a local hunt).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import vaekernels
from vaekernels import nn as vnn

settings.register_profile(
    "ci",
    max_examples=6,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "quick",
    max_examples=6,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SIZES = st.sampled_from([1, 2, 3, 5, 7, 8, 13])
DTYPES = st.sampled_from([torch.float32, torch.float64])
LAYOUTS = st.sampled_from(["contiguous", "offset", "strided", "transposed", "expanded"])
# Relative error (norm-wise) of a fused result against the float64 reference of its own rounded inputs.
TOLERANCE = {torch.float32: 2e-4, torch.float64: 1e-9}


# ----------------------------------------------------------------------------- strategies


@st.composite
def values(draw, shape, dtype, low=None, high=None, extremes=(), scale_max=100.0):
    """A tensor of ``shape``: normal values at a drawn scale, clamped to [low, high], with some of
    ``extremes`` planted at drawn positions."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([s for s in (1e-3, 1.0, 10.0, 100.0) if s <= scale_max]))
    t = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    if low is not None or high is not None:
        t = t.clamp(low, high)
    if extremes and t.numel() and draw(st.booleans()):
        flat = t.view(-1)
        for _ in range(draw(st.integers(1, min(3, t.numel())))):
            flat[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(extremes))
    return t.to(dtype)


@st.composite
def laid_out(draw, t):
    """The values of ``t`` in a drawn memory layout."""
    layout = draw(LAYOUTS)
    if layout == "offset":
        buffer = torch.empty(t.numel() + 3, dtype=t.dtype)
        out = buffer[3:].view(t.shape)
    elif layout == "strided" and t.dim():
        out = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)[..., ::2]
    elif layout == "transposed" and t.dim() >= 2:
        out = torch.empty(t.transpose(-1, -2).shape, dtype=t.dtype).transpose(-1, -2)
    elif layout == "expanded" and t.dim() and t.shape[0] > 1 and bool((t == t[:1]).all()):
        return t[:1].expand(t.shape)
    else:
        return t
    out.copy_(t)
    return out


def leaves(*tensors):
    # detach() keeps the layout (strides, storage offset, expansion) that clone() would lose.
    return [t.detach().requires_grad_() if t.is_floating_point() else t for t in tensors]


def close(got, want, dtype, what="", rounding=0.0):
    """got (computed in dtype) against the float64 ``want`` rounded to dtype: the same infinities and
    NaNs, finite where want is finite, and a norm-wise relative error within the dtype's bound over
    the rest."""
    # The float64 answer as the dtype can hold it: beyond its range, an infinity.
    got, want = got.detach().double(), want.detach().to(dtype).double()
    assert got.shape == want.shape, what
    finite = torch.isfinite(want)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (what, got, want)
    assert torch.equal(got[~finite & ~torch.isnan(want)], want[~finite & ~torch.isnan(want)]), (what, got, want)
    assert torch.isfinite(got[finite]).all(), (what, got, want)
    error = (got[finite] - want[finite]).norm()
    bound = TOLERANCE[dtype] * want[finite].norm().clamp_min(1.0) + rounding
    assert error <= bound, (what, error.item(), bound.item(), got, want)


def check(fn, tensors, dtype, *, grad=True, data_inputs=(), output_rounding=0.0, **kwargs):
    """fn on the backend under test against the reference in float64, output and every gradient
    (but those of ``data_inputs``, positions of inputs that are data, without a gradient); the
    output may be off by ``output_rounding`` more, an op's documented rounding of its terms."""
    inputs = leaves(*tensors)
    out = fn(*inputs, **kwargs)
    expected_inputs = leaves(*(t.double() if t.is_floating_point() else t for t in tensors))
    with vaekernels.use_backend("reference"):
        expected = fn(*expected_inputs, **kwargs)
    close(out, expected, dtype, "output", output_rounding)
    if not grad or not torch.isfinite(expected.detach().to(dtype)).all():
        return  # an output beyond the dtype's range has no gradient to compare
    seed = torch.Generator().manual_seed(0)
    weights = torch.randn(expected.shape, generator=seed, dtype=torch.float64)
    (out * weights.to(out.dtype)).sum().backward()
    (expected * weights).sum().backward()
    for i, (t, e) in enumerate(zip(inputs, expected_inputs)):
        if t.is_floating_point() and i not in data_inputs:
            # None is autograd's zero gradient (a 1x1 type-A convolution reads no tap of its weight).
            close(
                torch.zeros_like(t) if t.grad is None else t.grad,
                torch.zeros_like(e) if e.grad is None else e.grad,
                dtype,
                f"gradient of input {i}",
            )


def raises_named(fn_name, call):
    with pytest.raises((ValueError, TypeError, IndexError), match=rf"^vaekernels\.{fn_name}: \w"):
        call()


# ----------------------------------------------------------------------------- importance-weighted bounds


@given(data=st.data(), rows=SIZES, n=SIZES, dtype=DTYPES)
def test_log_mean_exp(device_backend, data, rows, n, dtype):
    x = data.draw(values((rows, n), dtype, extremes=(-1e30, 1e7, -1e7, -math.inf)))
    x = data.draw(laid_out(x))
    check(vaekernels.log_mean_exp, [x], dtype)
    # The gradient is a softmax: it sums to 1 in every row that is not all -inf.
    x = x.detach().clone().requires_grad_()
    vaekernels.log_mean_exp(x).sum().backward()
    alive = ~torch.isneginf(x.detach()).all(-1)
    torch.testing.assert_close(
        x.grad.sum(-1)[alive].double(), torch.ones(int(alive.sum()), dtype=torch.float64), rtol=1e-5, atol=0
    )


@given(data=st.data(), b=SIZES, k=SIZES, d=SIZES, dtype=DTYPES)
def test_bernoulli_log_prob(device_backend, data, b, k, d, dtype):
    logits = data.draw(laid_out(data.draw(values((b, k, d), dtype, extremes=(1e4, -1e4, 80.0, -80.0)))))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 100)))
    x = torch.rand(b, d, generator=generator, dtype=torch.float64)
    x = (x.round() if data.draw(st.booleans()) else x).to(dtype)
    check(vaekernels.bernoulli_log_prob, [logits, data.draw(laid_out(x))], dtype)


@given(data=st.data(), b=SIZES, k=SIZES, d=SIZES, dtype=DTYPES)
def test_gaussian_log_prob_and_kl(device_backend, data, b, k, d, dtype):
    x = data.draw(values((b, k, d), dtype))
    mean = data.draw(values((b, 1, d), dtype))  # broadcast over K
    log_var = data.draw(values((d,), dtype, low=-30, high=30, extremes=(-200.0, -100.0, 60.0)))
    if data.draw(st.booleans()):
        x = mean.expand(b, k, d).clone()  # at the mean: finite for any log_var
    check(vaekernels.gaussian_log_prob, [data.draw(laid_out(x)), mean, log_var], dtype)
    kl_mean = data.draw(laid_out(data.draw(values((b, d), dtype))))
    check(vaekernels.gaussian_kl, [kl_mean, data.draw(values((b, d), dtype, low=-20, high=20))], dtype)


@given(
    data=st.data(),
    b=SIZES,
    k=st.sampled_from([1, 2, 5]),
    d=SIZES,
    size=SIZES,
    hidden=st.sampled_from([(), (3,), (8, 5)]),
    dtype=DTYPES,
)
def test_mlp_vae(device_backend, data, b, k, d, size, hidden, dtype):
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 100)))
    x = torch.rand(b, size, generator=generator, dtype=torch.float64)
    x = data.draw(laid_out((x.round() if data.draw(st.booleans()) else x).to(dtype)))
    eps = data.draw(laid_out(data.draw(values((b, k, d), dtype, scale_max=10.0))))
    parameters = []
    for widths in ((size, *hidden, 2 * d), (d, *hidden[::-1], size)):
        pairs = list(zip(widths, widths[1:]))
        weights = [data.draw(values((o, i), dtype, scale_max=10.0)) / i**0.5 for i, o in pairs]
        parameters.append([data.draw(laid_out(w)) for w in weights])
        parameters.append([data.draw(values((o,), dtype, scale_max=10.0)) for _, o in pairs])
    e, n = len(parameters[0]), len(parameters[2])

    def terms(x, eps, *flat):
        groups = [list(flat[:e]), list(flat[e : 2 * e]), list(flat[2 * e : 2 * e + n]), list(flat[2 * e + n :])]
        return torch.stack(vaekernels.mlp_vae(x.detach(), eps.detach(), *groups))

    check(terms, [x, eps, *(t for group in parameters for t in group)], dtype, data_inputs=(0, 1))


@given(
    data=st.data(),
    b=SIZES,
    k=SIZES,
    d=SIZES,
    estimator=st.sampled_from(["iwae", "stl", "dreg"]),
    likelihood=st.sampled_from(["bernoulli", "gaussian"]),
    reduction=st.sampled_from(["none", "mean", "sum"]),
)
def test_iwae_bound_and_module(device_backend, data, b, k, d, estimator, likelihood, reduction):
    dtype = torch.float64
    logits = data.draw(values((b, k, d), dtype, extremes=(30.0, -30.0)))
    x = torch.rand(b, d, generator=torch.Generator().manual_seed(1), dtype=dtype).round()
    log_pz = data.draw(values((b, k), dtype, low=-50, high=0))
    log_var = data.draw(values((d,), dtype, low=-3, high=3)) if likelihood == "gaussian" else None
    mean, q_log_var = data.draw(values((b, 2), dtype)), data.draw(values((b, 2), dtype, low=-3, high=3))
    eps = data.draw(values((b, k, 2), dtype, low=-3, high=3))

    def bound(logits, mean, q_log_var, **kwargs):
        z = mean.unsqueeze(1) + torch.exp(0.5 * q_log_var).unsqueeze(1) * eps
        out = vnn.IWAEBound(likelihood, estimator, reduction)(
            logits, x, log_pz, None, z=z, q=(mean, q_log_var), log_var=log_var
        )
        return out

    check(bound, [logits, mean, q_log_var], dtype)
    # K samples of the exact posterior give log p(x) whatever K: a bound with log_px + log_pz -
    # log_qz constant over k equals that constant.
    constant = data.draw(values((b, 1), dtype)).expand(b, k)
    torch.testing.assert_close(vaekernels.log_mean_exp(constant, dim=1), constant[:, 0])


@given(data=st.data(), b=SIZES, d=SIZES, dataset_size=st.sampled_from([None, 1, 1000]))
def test_aggregate_posterior_estimators(device_backend, data, b, d, dataset_size):
    dtype = data.draw(DTYPES)
    mean = data.draw(values((b, d), dtype))
    log_var = data.draw(values((b, d), dtype, low=-20, high=5, extremes=(-200.0,)))
    z = mean.clone() if data.draw(st.booleans()) else data.draw(values((b, d), dtype))
    # MI and TC subtract log-density terms of size (z - mean)^2 / var: their documented rounding in
    # the input's precision (aggregate_posterior_log_density's "float32 limits").
    terms = -0.5 * ((z.double()[:, None] - mean.double()[None]) ** 2 / log_var.double().exp()[None] + log_var.double())
    rounding = 4 * (d + 1) * torch.finfo(dtype).eps * terms.sum(-1).abs().max().item()
    for estimator in ("aggregate_posterior_log_density", "marginal_kl", "mutual_information", "total_correlation"):
        check(
            getattr(vaekernels, estimator),
            [z, mean, log_var],
            dtype,
            dataset_size=dataset_size,
            output_rounding=rounding,
        )
    check(vaekernels.aggregate_posterior_log_density, [z, mean, log_var], dtype, per_dim=True)


def test_importance_sampled_nll_streams_to_the_reference():
    x = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)).round()

    def encode(x):
        return x[:, :2] * 0.5, torch.full((len(x), 2), -1.0)

    decoder = nn.Linear(2, 4)

    def decode(z):
        return decoder(z)

    with torch.no_grad():
        got = vaekernels.importance_sampled_nll(x, encode, decode, 50, 7, generator=torch.Generator().manual_seed(3))
        with vaekernels.use_backend("reference"):
            want = vaekernels.importance_sampled_nll(
                x, encode, decode, 50, 7, generator=torch.Generator().manual_seed(3)
            )
    # Same samples (the reference draws all K at once, the fused op chunk by chunk: both from one stream).
    assert torch.isfinite(got).all() and (got > 0).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- PixelCNN


@given(
    data=st.data(),
    b=SIZES,
    c=st.sampled_from([1, 2, 3]),
    h=SIZES,
    w=SIZES,
    dtype=DTYPES,
    gate=st.sampled_from(["tanh", "linear"]),
    with_cond=st.booleans(),
)
def test_gated_activation(device_backend, data, b, c, h, w, dtype, gate, with_cond):
    x = data.draw(values((b, 2 * c, h, w), dtype, extremes=(1e4, -1e4, 50.0)))
    if data.draw(st.booleans()):
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = data.draw(laid_out(x))
    cond = data.draw(values((b, 2 * c), dtype)) if with_cond else None
    tensors = [x] + ([cond] if with_cond else [])
    check(lambda x, *cond: vaekernels.gated_activation(x, cond[0] if cond else None, gate), tensors, dtype)


@given(data=st.data(), b=SIZES, c=SIZES, h=SIZES, w=SIZES, dtype=DTYPES)
def test_concat_elu(device_backend, data, b, c, h, w, dtype):
    x = data.draw(values((b, c, h, w), dtype, extremes=(1e4, -1e4, 88.0, -88.0, 0.0)))
    if data.draw(st.booleans()):
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = data.draw(laid_out(x))
    padding = data.draw(st.none() | st.tuples(*[st.integers(0, 2)] * 4))
    check(lambda t: vaekernels.concat_elu(t, padding=padding), [x], dtype)


@given(
    data=st.data(),
    b=st.sampled_from([1, 2]),
    c=st.sampled_from([1, 3]),
    h=SIZES,
    w=SIZES,
    kernel=st.sampled_from([(1, 1), (3, 3), (5, 3), (1, 5)]),
    mask_type=st.sampled_from(["A", "B"]),
    groups=st.sampled_from([1, 3]),
)
def test_masked_conv2d_and_module(device_backend, data, b, c, h, w, kernel, mask_type, groups):
    dtype = torch.float64
    channels = c * groups
    conv = vnn.MaskedConv2d(channels, 2 * groups, kernel, mask_type, channel_groups=groups, dtype=dtype)
    x = data.draw(values((b, channels, h, w), dtype))
    if data.draw(st.booleans()):
        x = x.contiguous(memory_format=torch.channels_last)
    check(
        lambda x, weight, bias: vaekernels.masked_conv2d(x, weight, bias, mask_type, channel_groups=groups),
        [x, conv.weight, conv.bias],
        dtype,
    )
    # Causality, with zero tolerance: the last pixel in raster order moves no output.
    moved = x.clone()
    moved[..., -1, -1] += 1.0
    delta = (conv(moved) - conv(x)).detach()
    delta[..., -1, -1] = 0 if mask_type == "B" or groups > 1 else delta[..., -1, -1]
    assert delta.abs().max() == 0


@given(
    data=st.data(),
    h=st.sampled_from([1, 2, 5]),
    w=st.sampled_from([1, 3, 4]),
    mask_type=st.sampled_from("AB"),
    skip=st.sampled_from([0, 2]),
    cond=st.sampled_from([0, 3]),
)
def test_gated_pixelcnn_layer_matches_its_reference(device_backend, data, h, w, mask_type, skip, cond):
    from vaekernels.reference.pixelcnn import gated_pixelcnn_layer

    dtype = torch.float64
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    layer = vnn.GatedPixelCNNLayer(2, 2, 3, mask_type, skip_channels=skip, cond_features=cond, dtype=dtype)
    v, hh = data.draw(values((2, 2, h, w), dtype)), data.draw(values((2, 2, h, w), dtype))
    c = data.draw(values((2, cond), dtype)) if cond else None
    got = layer(v, hh, c)
    want = gated_pixelcnn_layer(layer, v, hh, c)
    for g, e in zip(got, want):
        if e is not None:
            close(g, e, dtype)


def test_gated_pixelcnn_samples_and_likelihood(device_backend):
    model = vnn.GatedPixelCNN(channels=4, layers=2, first_kernel=3, num_classes=2)
    y = torch.tensor([0, 1])
    x, logits = model.sample(2, (3, 3), y, generator=torch.Generator().manual_seed(0), return_logits=True)
    naive, naive_logits = model.sample(
        2, (3, 3), y, cached=False, generator=torch.Generator().manual_seed(0), return_logits=True
    )
    assert torch.equal(x, naive)
    torch.testing.assert_close(logits, naive_logits, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(model.nll(x, y)).all()


@given(
    data=st.data(),
    b=st.sampled_from([1, 2]),
    h=SIZES,
    w=SIZES,
    m=st.sampled_from([1, 2, 5]),
    c=st.sampled_from([1, 3]),
    dtype=DTYPES,
    reduction=st.sampled_from(["none", "mean", "sum"]),
)
def test_discretized_logistic_mixture(device_backend, data, b, h, w, m, c, dtype, reduction):
    p = m * (10 if c == 3 else 3)
    # Log-scales up to 12 (a scale of 1.6e5 on data in [-1, 1]): the Triton backward's gradient is
    # NaN at a log-scale of 30 in float32, and the float64 reference's past 88 (issue 19's report).
    params = data.draw(values((b, p, h, w), dtype, scale_max=10.0, extremes=(-30.0, 12.0)))
    levels = torch.randint(0, 256, (b, c, h, w), generator=torch.Generator().manual_seed(data.draw(st.integers(0, 9))))
    x = (levels / 127.5 - 1).to(dtype)
    check(
        vaekernels.discretized_logistic_mixture_nll,
        [params, x],
        dtype,
        num_mixtures=m,
        reduction=reduction,
        data_inputs=(1,),
    )
    sample = vaekernels.discretized_logistic_mixture_sample(params, c, m, torch.Generator().manual_seed(0))
    assert sample.shape == x.shape and sample.abs().max() <= 1
    # Quantised: every value on the 256-level grid.
    torch.testing.assert_close((sample + 1) * 127.5, ((sample + 1) * 127.5).round(), rtol=0, atol=1e-3)


@given(
    data=st.data(),
    n=st.sampled_from([1, 2]),
    length=st.sampled_from([1, 2, 7, 13, 65]),
    d=st.sampled_from([1, 3, 8]),
    dv=st.sampled_from([1, 5]),
    dtype=DTYPES,
    scale=st.sampled_from([None, 0.5, 1e4]),
)
def test_causal_attention(device_backend, data, n, length, d, dv, dtype, scale):
    q, k = data.draw(values((n, length, d), dtype)), data.draw(values((n, length, d), dtype))
    v = data.draw(laid_out(data.draw(values((n, length, dv), dtype))))
    check(vaekernels.causal_attention, [q, k, v], dtype, scale=scale)
    # Strict causality with zero tolerance (finite inputs): the last position moves nothing.
    out = vaekernels.causal_attention(q, k, v, scale)
    moved = v.clone()
    moved[..., -1, :] += 1.0
    assert torch.equal(out, vaekernels.causal_attention(q, k, moved, scale))


def test_causal_attention_module(device_backend):
    attend = vnn.CausalAttention2d(3, 4, key_channels=4, value_channels=6, heads=2).double()
    query, context = torch.randn(2, 3, 3, 5, dtype=torch.float64), torch.randn(2, 4, 3, 5, dtype=torch.float64)
    out = attend(query, context)
    assert out.shape == (2, 6, 3, 5) and out[..., 0, 0].abs().max() == 0


# ----------------------------------------------------------------------------- reversible networks


@given(data=st.data(), shape=st.sampled_from([(1, 2), (3, 7), (2, 4, 3, 5)]), dtype=DTYPES)
def test_coupling_backward_step(device_backend, data, shape, dtype):
    stream, update, grad, grad_update = (data.draw(values(shape, dtype)) for _ in range(4))
    want_stream, want_grad = stream.double() - update.double(), grad.double() + grad_update.double()
    vaekernels.coupling_backward_step(stream, update, grad, grad_update)
    close(stream, want_stream, dtype)
    close(grad, want_grad, dtype)


@given(data=st.data(), depth=st.sampled_from([1, 3]), block=st.sampled_from(["additive", "affine", "downsample"]))
def test_reversible_stack_inverts_and_matches_ordinary_backprop(device_backend, data, depth, block):
    dtype = torch.float64
    torch.manual_seed(data.draw(st.integers(0, 1000)))

    def make():
        if block == "additive":
            return vnn.AdditiveCoupling(nn.Linear(3, 3), nn.Linear(3, 3))
        if block == "affine":
            return vnn.AffineCoupling(nn.Sequential(nn.Linear(3, 6), nn.Tanh()))
        return vnn.InvertibleDownsample(2)

    blocks = [make().double() for _ in range(depth if block != "downsample" else 1)]
    x = data.draw(values((2, 4, 4, 4) if block == "downsample" else (3, 6), dtype))
    net = vnn.ReversibleSequential(*blocks)
    x1 = x.clone().requires_grad_()
    out = net(x1)
    y, logdet = out if net.returns_logdet else (out, torch.zeros(()))
    torch.testing.assert_close(net.inverse(y.detach()), x)
    (y.square().sum() + logdet.sum()).backward()
    x2 = x.clone().requires_grad_()
    h, total = x2, 0
    for b in blocks:
        out = b(h)
        h, total = (
            (out if isinstance(out, torch.Tensor) else out[0]),
            total + (0 if isinstance(out, torch.Tensor) else out[1]),
        )
    (h.square().sum() + (total.sum() if isinstance(total, torch.Tensor) else 0)).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


# ----------------------------------------------------------------------------- decoder Jacobians


@given(
    data=st.data(),
    b=SIZES,
    d=st.sampled_from([1, 2, 3]),
    hidden=st.sampled_from([1, 4, 7]),
    activation=st.sampled_from([nn.Tanh, nn.Sigmoid, nn.ReLU, nn.Softplus, nn.ELU, nn.GELU]),
    conv=st.booleans(),
)
def test_jacobian_ops_and_module(device_backend, data, b, d, hidden, activation, conv):
    dtype = torch.float64
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    if conv:  # the general (torch.func) path
        decoder = nn.Sequential(nn.Linear(d, 4), activation(), nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 2, 1))
    else:
        decoder = nn.Sequential(nn.Linear(d, hidden), activation(), nn.Linear(hidden, 5))
    decoder = decoder.double()
    z = data.draw(values((b, d), dtype, extremes=(30.0, -30.0)))
    check(lambda z: vaekernels.jacobian_column_sq_norms(decoder, z), [z], dtype)
    check(lambda z: vaekernels.jacobian_gram(decoder, z), [z], dtype)
    columns = sorted(set(data.draw(st.lists(st.integers(0, d - 1), min_size=1, max_size=d))))
    check(lambda z: vaekernels.jacobian_column_sq_norms(decoder, z, columns), [z], dtype)
    beta = data.draw(st.sampled_from([1e-3, 0.5, 10.0]))
    check(lambda z: vnn.GRAERegularizer(beta)(decoder, z), [z], dtype)
    exact = vaekernels.grae_regularizer(decoder, z, beta, exact=True)
    bound = vaekernels.grae_regularizer(decoder, z, beta)
    assert (exact <= bound + 1e-9 * bound.abs().clamp_min(1)).all()  # log det <= sum of log diagonal


# ----------------------------------------------------------------------------- bad arguments


def _rows(*shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0))


_MLP = nn.Sequential(nn.Linear(4, 2))
_BLOCK = vnn.AdditiveCoupling(nn.Linear(2, 2))
# Each public op as (call(a, b), a, b): a valid call, whose tensor arguments a and b the
# bad-argument test replaces one at a time. Arguments are passed through untouched, so that the op
# itself meets the bad one.
OPS = {
    "log_mean_exp": (lambda a, b: vaekernels.log_mean_exp(a), _rows(2, 3), None),
    "bernoulli_log_prob": (vaekernels.bernoulli_log_prob, _rows(2, 3, 4), _rows(2, 4)),
    "gaussian_log_prob": (lambda a, b: vaekernels.gaussian_log_prob(a, b, b), _rows(2, 4), _rows(2, 4)),
    "gaussian_kl": (vaekernels.gaussian_kl, _rows(2, 4), _rows(2, 4)),
    "mlp_vae": (
        lambda a, b: vaekernels.mlp_vae(a, b, [_rows(2, 4)], [_rows(2)], [_rows(4, 1)], [_rows(4)]),
        _rows(2, 4).round(),
        _rows(2, 3, 1),
    ),
    "iwae_bound": (lambda a, b: vaekernels.iwae_bound(a, _rows(2, 4), b, b), _rows(2, 3, 4), _rows(2, 3)),
    "importance_sampled_nll": (
        lambda a, b: vaekernels.importance_sampled_nll(
            a, lambda x: (b, b), lambda z: torch.zeros(*z.shape[:2], 4), 4, 2
        ),
        _rows(2, 4).round(),
        _rows(2, 3),
    ),
    "aggregate_posterior_log_density": (
        lambda a, b: vaekernels.aggregate_posterior_log_density(a, b, b),
        _rows(3, 2),
        _rows(3, 2),
    ),
    "marginal_kl": (lambda a, b: vaekernels.marginal_kl(a, b, b), _rows(3, 2), _rows(3, 2)),
    "mutual_information": (lambda a, b: vaekernels.mutual_information(a, b, b), _rows(3, 2), _rows(3, 2)),
    "total_correlation": (lambda a, b: vaekernels.total_correlation(a, b, b), _rows(3, 2), _rows(3, 2)),
    "causal_attention": (lambda a, b: vaekernels.causal_attention(a, b, b), _rows(2, 5, 4), _rows(2, 5, 4)),
    "gated_activation": (vaekernels.gated_activation, _rows(2, 4, 3), _rows(2, 4)),
    "concat_elu": (lambda a, b: vaekernels.concat_elu(a), _rows(2, 4, 3), None),
    "masked_conv2d": (vaekernels.masked_conv2d, _rows(1, 2, 3, 4), _rows(3, 2, 3, 3)),
    "coupling_backward_step": (
        lambda a, b: vaekernels.coupling_backward_step(a, b, torch.zeros(2, 4), b),
        _rows(2, 4),
        _rows(2, 4),
    ),
    "reversible_sequential": (lambda a, b: vaekernels.reversible_sequential([_BLOCK], a), _rows(3, 4), None),
    "discretized_logistic_mixture_nll": (
        lambda a, b: vaekernels.discretized_logistic_mixture_nll(a, b, 1),
        _rows(2, 3, 3, 4),
        _rows(2, 1, 3, 4).round(),
    ),
    "discretized_logistic_mixture_sample": (
        lambda a, b: vaekernels.discretized_logistic_mixture_sample(a, 1, 1),
        _rows(2, 3, 3, 4),
        None,
    ),
    "jacobian_column_sq_norms": (lambda a, b: vaekernels.jacobian_column_sq_norms(_MLP, a), _rows(3, 4), None),
    "jacobian_gram": (lambda a, b: vaekernels.jacobian_gram(_MLP, a), _rows(3, 4), None),
    "grae_regularizer": (lambda a, b: vaekernels.grae_regularizer(_MLP, a, 1.0), _rows(3, 4), None),
}

# Stand-ins that no op accepts in place of a floating-point tensor argument; "another float dtype"
# is wrong only beside a tensor that fixes the dtype (the second position).
BAD = {
    "an integer tensor": lambda t: t.long(),
    "a bool tensor": lambda t: t > 0,
    "a complex tensor": lambda t: t.to(torch.complex64),
    "a list": lambda t: t.tolist(),
    "a string": lambda t: "t",
    "another float dtype": lambda t: t.double(),
}


@pytest.mark.parametrize("name", sorted(OPS))
@given(bad=st.sampled_from(sorted(BAD)), position=st.sampled_from([0, 1]))
def test_bad_arguments_name_the_function(name, bad, position):
    call, *args = OPS[name]
    if args[position] is None or position == 0 and bad == "another float dtype":
        return
    call(*args)  # the valid call runs
    args[position] = BAD[bad](args[position])
    raises_named(name, lambda: call(*args))
