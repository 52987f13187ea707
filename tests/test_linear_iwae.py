"""The decoder's output layer fused into the Bernoulli likelihood and the bound, against the
unfused bound of the same logits: values, every gradient (the forward-computed ones and the
recomputing backward), estimators, chunking, memory kept for backward, registration and compile."""

import pytest
import torch
from conftest import assert_triton_schema_is_cpp, needs_cpp, rel_err

import vaekernels
from vaekernels.reference import linear_iwae as ref

RTOL = {torch.float32: 2e-5, torch.float64: 1e-11}


def layer_inputs(B=6, K=5, H=7, D=11, *, dtype=torch.float64, device="cpu", seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    h, weight = randn(B, K, H), randn(D, H, scale=0.7)
    b = randn(D) if bias else None
    x = torch.bernoulli(torch.full((B, D), 0.4, dtype=torch.float64), generator=g).to(device=device, dtype=dtype)
    return h, weight, b, x, randn(B, K, scale=3), randn(B, K, scale=3)


def leaves(tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def value_and_grads(fn, tensors, cotangent=None):
    inputs = leaves(tensors)
    out = fn(*inputs)
    (out if cotangent is None else out * cotangent).sum().backward()
    return out.detach(), [None if t is None else t.grad for t in inputs]


def assert_close(got, want, dtype):
    assert got.shape == want.shape
    assert rel_err(got, want) <= RTOL[dtype], rel_err(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 1, 10, 20])  # one chunk; one example each; 2 + 2 + 2; 4 + 2
def test_bound_and_gradients_match_the_unfused_bound(device_backend, dtype, reduction, chunk_size):
    device, _ = device_backend
    h, weight, bias, x, log_pz, log_qz = layer_inputs(dtype=dtype, device=device)
    # reduction "none" with a random cotangent: examples get different gradients, the recomputing backward.
    cotangent = (
        None
        if reduction != "none"
        else torch.randn(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(
            device=device, dtype=dtype
        )
    )

    def fused(h, weight, bias, log_pz, log_qz):
        return vaekernels.linear_iwae_bound(
            h, weight, bias, x, log_pz, log_qz, reduction=reduction, chunk_size=chunk_size
        )

    def unfused(h, weight, bias, log_pz, log_qz):
        with vaekernels.use_backend("reference"):
            return vaekernels.iwae_bound(
                torch.nn.functional.linear(h, weight, bias), x.to(h.dtype), log_pz, log_qz, reduction=reduction
            )

    out, grads = value_and_grads(fused, [h, weight, bias, log_pz, log_qz], cotangent)
    expected, expected_grads = value_and_grads(
        unfused,
        [t.double() for t in (h, weight, bias, log_pz, log_qz)],
        None if cotangent is None else cotangent.double(),
    )
    assert out.dtype == dtype
    assert_close(out, expected, dtype)
    for got, want in zip(grads, expected_grads):
        assert_close(got, want, dtype)


def test_a_shared_gradient_reuses_the_forward_and_any_other_recomputes(monkeypatch):
    """The logits are made once per chunk for a mean of the bound (the backward scales what the
    forward computed), twice for per-example gradients; the gradients agree either way."""
    from vaekernels.ops import linear_iwae as module

    h, weight, bias, x, log_pz, log_qz = layer_inputs()
    made = []
    chunk_logits = module._chunk_logits
    monkeypatch.setattr(module, "_chunk_logits", lambda *args: made.append(1) or chunk_logits(*args))
    inputs = [h, weight, bias, log_pz, log_qz]
    _, shared = value_and_grads(
        lambda *t: -vaekernels.linear_iwae_bound(*t[:3], x, *t[3:], reduction="mean", chunk_size=10), inputs
    )
    assert len(made) == 3

    def bound(*t):
        return vaekernels.linear_iwae_bound(*t[:3], x, *t[3:], chunk_size=10)

    uniform = torch.full((6,), -1 / 6, dtype=torch.float64)
    _, per_example_uniform = value_and_grads(bound, inputs, uniform)
    assert len(made) == 3 + 3
    varied = uniform.clone()
    varied[0] = -0.5
    _, per_example = value_and_grads(bound, inputs, varied)
    assert len(made) == 3 + 3 + 6
    _, expected = value_and_grads(lambda *t: ref.linear_iwae_bound(*t[:3], x, *t[3:]), inputs, varied)
    for a, b, c, d in zip(shared, per_example_uniform, per_example, expected):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(c, d, rtol=1e-11, atol=1e-12)


def test_zoo_decoder_features_and_output_layer_are_its_forward():
    """The fused path of the zoo's models reads the decoder in two parts: together they are decode()."""
    from models.vae.zoo import build_model

    torch.manual_seed(0)
    for arch, classes in (("mlp", 0), ("linear", 0), ("mlp", 3)):
        model = build_model(
            "cvae" if classes else "iwae", 12, (3, 4), arch=arch, latent_dim=2, hidden_dim=5, num_classes=classes
        )
        z, y = torch.randn(4, 3, 2), torch.tensor([0, 1, 2, 0]) if classes else None
        decoded = model.decode(z, y)
        fused = model.decoder.output_layer(model.decoder.features(z, model.condition(y)))
        torch.testing.assert_close(fused, decoded, rtol=0, atol=0)


def test_without_bias_and_with_event_dims(device_backend):
    device, _ = device_backend
    h, weight, _, x, log_pz, log_qz = layer_inputs(D=12, device=device, bias=False)
    images = x.view(6, 3, 4)
    out, grads = value_and_grads(
        lambda h, w: vaekernels.linear_iwae_bound(h, w, None, images, log_pz, log_qz), [h, weight]
    )
    expected, expected_grads = value_and_grads(
        lambda h, w: ref.linear_iwae_bound(h, w, None, x, log_pz, log_qz), [h, weight]
    )
    assert_close(out, expected, torch.float64)
    for got, want in zip(grads, expected_grads):
        assert_close(got, want, torch.float64)


@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
def test_estimators_match_iwae_bound_of_the_logits(device_backend, estimator):
    """The encoder's gradients through z and q: the same as iwae_bound's for every estimator."""
    device, _ = device_backend
    B, K, d, H, D = 4, 6, 3, 5, 9
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(B, d, generator=g, dtype=torch.float64).to(device)
    log_var = (0.3 * torch.randn(B, d, generator=g, dtype=torch.float64)).to(device)
    eps = torch.randn(B, K, d, generator=g, dtype=torch.float64).to(device)
    hidden, output = torch.nn.Linear(d, H).double().to(device), torch.nn.Linear(H, D).double().to(device)
    x = torch.bernoulli(torch.full((B, D), 0.5, dtype=torch.float64), generator=g).to(device)

    def run(fused):
        m, lv = mean.clone().requires_grad_(), log_var.clone().requires_grad_()
        z = m.unsqueeze(1) + torch.exp(0.5 * lv).unsqueeze(1) * eps
        log_pz = vaekernels.gaussian_log_prob(z, z.new_zeros(()), z.new_zeros(()))
        h = torch.tanh(hidden(z))
        if fused:
            bound = vaekernels.linear_iwae_bound(
                h, output.weight, output.bias, x, log_pz, estimator=estimator, z=z, q=(m, lv), reduction="mean"
            )
        else:
            bound = vaekernels.iwae_bound(
                output(h), x, log_pz, None, estimator=estimator, z=z, q=(m, lv), reduction="mean"
            )
        params = [m, lv, *hidden.parameters(), *output.parameters()]
        return bound.detach(), torch.autograd.grad(bound, params)

    bound, grads = run(True)
    expected, expected_grads = run(False)
    assert_close(bound, expected, torch.float64)
    for got, want in zip(grads, expected_grads):
        assert_close(got, want, torch.float64)


@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("uniform", [True, False])
def test_expected_log_prob_is_the_mean_log_likelihood(device_backend, K, uniform):
    device, _ = device_backend
    h, weight, bias, x, _, _ = layer_inputs(K=K, device=device)
    cotangent = None if uniform else torch.arange(1.0, 7.0, dtype=torch.float64, device=device)
    out, grads = value_and_grads(
        lambda *t: vaekernels.linear_expected_log_prob(*t, x, chunk_size=K), [h, weight, bias], cotangent
    )
    expected, expected_grads = value_and_grads(
        lambda h, w, b: vaekernels.reference.iwae.bernoulli_log_prob(torch.nn.functional.linear(h, w, b), x).mean(1),
        [h, weight, bias],
        cotangent,
    )
    assert_close(out, expected, torch.float64)
    for got, want in zip(grads, expected_grads):
        assert_close(got, want, torch.float64)


def test_exact_posterior_bound_is_log_px_for_every_K():
    """With q(z|x) = p(z|x), every importance weight is p(x): the bound is log p(x) at any K."""
    B, K, H, D = 3, 7, 4, 5
    h, weight, bias, x, _, _ = layer_inputs(B, K, H, D)
    log_px = vaekernels.reference.iwae.bernoulli_log_prob(torch.nn.functional.linear(h, weight, bias), x)
    log_marginal = torch.randn(B, 1, dtype=torch.float64)
    log_pz = torch.randn(B, K, dtype=torch.float64)
    log_qz = log_px + log_pz - log_marginal  # p(x, z) / q(z | x) = p(x) for every sample
    bound = vaekernels.linear_iwae_bound(h, weight, bias, x, log_pz, log_qz, chunk_size=K)
    torch.testing.assert_close(bound, log_marginal.squeeze(1), rtol=1e-12, atol=1e-12)


@needs_cpp
def test_nothing_of_size_BKD_is_kept_for_backward():
    B, K, H, D = 8, 50, 20, 300
    h, weight, bias, x, log_pz, log_qz = layer_inputs(B, K, H, D, dtype=torch.float32)
    h, weight, bias = leaves([h, weight, bias])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        vaekernels.linear_iwae_bound(h, weight, bias, x, log_pz, log_qz, reduction="mean")
    assert saved and max(t.numel() for t in saved) < B * K * D
    assert sum(t.numel() for t in saved) <= 2 * (B * K * H + D * H) + 4 * B * K + B * D + D


def test_errors_name_the_function_and_argument():
    h, weight, bias, x, log_pz, log_qz = layer_inputs()
    with pytest.raises(ValueError, match=r"^vaekernels.linear_iwae_bound: weight must have shape \[D, H\]"):
        vaekernels.linear_iwae_bound(h, weight.t(), bias, x, log_pz, log_qz)
    with pytest.raises(ValueError, match=r"^vaekernels.linear_iwae_bound: x must have shape \[B, \*event\]"):
        vaekernels.linear_iwae_bound(h, weight, bias, x[:, :5], log_pz, log_qz)
    with pytest.raises(ValueError, match=r"^vaekernels.linear_iwae_bound: bias must have shape \[D\]"):
        vaekernels.linear_iwae_bound(h, weight, bias[:3], x, log_pz, log_qz)
    with pytest.raises(ValueError, match=r"^vaekernels.linear_iwae_bound: log_qz must have shape \[B, K\]"):
        vaekernels.linear_iwae_bound(h, weight, bias, x, log_pz, log_qz[:, :2])
    with pytest.raises(ValueError, match=r"^vaekernels.linear_iwae_bound: x must not require grad"):
        vaekernels.linear_iwae_bound(h, weight, bias, x.clone().requires_grad_(), log_pz, log_qz)
    with pytest.raises(
        ValueError, match=r"^vaekernels.linear_expected_log_prob: chunk_size must be an int >= 1 or None"
    ):
        vaekernels.linear_expected_log_prob(h, weight, bias, x, chunk_size=0)
    with pytest.raises(TypeError, match=r"^vaekernels.linear_expected_log_prob: h must be a torch.Tensor"):
        vaekernels.linear_expected_log_prob(None, weight, bias, x)


def test_module_is_a_linear_layer_with_fused_bounds():
    torch.manual_seed(0)
    layer = vaekernels.nn.BernoulliLinear(7, 11).double()
    plain = torch.nn.Linear(7, 11).double()
    plain.load_state_dict(layer.state_dict())
    h, _, _, x, log_pz, log_qz = layer_inputs()
    torch.testing.assert_close(layer(h), plain(h))
    torch.testing.assert_close(
        layer.iwae_bound(h, x, log_pz, log_qz),
        vaekernels.iwae_bound(plain(h), x, log_pz, log_qz),
        rtol=1e-12,
        atol=1e-12,
    )


@needs_cpp
@pytest.mark.parametrize("namespace", ["vaekernels", "vaekernels_triton"])
@pytest.mark.parametrize("with_grads", [True, False])
@pytest.mark.parametrize("elbo", [True, False])
def test_opcheck(namespace, with_grads, elbo):
    ops = getattr(torch.ops, namespace)
    h, weight, bias, x, log_pz, log_qz = layer_inputs(B=3, K=2, H=3, D=4)
    h, weight, bias, log_ratio = leaves([h, weight, bias, log_pz - log_qz])
    args = (h, weight, bias, x, log_ratio, elbo, with_grads, 2)
    torch.library.opcheck(ops.linear_bernoulli_iwae.default, args)
    _, _, weights, grad_h, grad_weight, grad_bias = ops.linear_bernoulli_iwae(
        *[t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    )
    grad_bound = torch.randn(3, dtype=torch.float64)
    torch.library.opcheck(
        ops.linear_bernoulli_iwae_backward.default,
        (
            grad_bound,
            torch.zeros(3, 2, dtype=torch.float64),
            h.detach(),
            weight.detach(),
            bias.detach(),
            x,
            weights,
            grad_h,
            grad_weight,
            grad_bias,
            2,
        ),
    )


@needs_cpp
def test_triton_ops_have_the_cpp_schemas():
    assert_triton_schema_is_cpp("linear_bernoulli_iwae")
    assert_triton_schema_is_cpp("linear_bernoulli_iwae_backward")


@needs_cpp
def test_gradcheck_float64():
    h, weight, bias, x, log_pz, log_qz = layer_inputs(B=3, K=2, H=3, D=4)

    def bound(h, weight, bias, log_pz):
        return vaekernels.linear_iwae_bound(h, weight, bias, x, log_pz, log_qz, chunk_size=2)

    assert torch.autograd.gradcheck(bound, tuple(leaves([h, weight, bias, log_pz])))


@needs_cpp
@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compiles_without_graph_breaks(backend):
    h, weight, bias, x, log_pz, log_qz = layer_inputs(dtype=torch.float32)
    torch._dynamo.reset()

    def loss(h, weight, bias):
        return -vaekernels.linear_iwae_bound(h, weight, bias, x, log_pz, log_qz, reduction="mean")

    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    out, grads = value_and_grads(compiled, [h, weight, bias])
    expected, expected_grads = value_and_grads(loss, [h, weight, bias])
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_importance_sampled_nll_through_the_output_layer_is_the_same_estimate():
    torch.manual_seed(0)
    encoder, hidden, output = (
        torch.nn.Linear(9, 6),
        torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh()),
        torch.nn.Linear(8, 9),
    )
    x = torch.bernoulli(torch.full((4, 9), 0.3))

    def encode(x):
        return encoder(x).chunk(2, dim=-1)

    def nll(decode, **extra):
        return vaekernels.importance_sampled_nll(
            x, encode, decode, 50, 7, generator=torch.Generator().manual_seed(1), **extra
        )

    fused = nll(hidden, output_layer=output)
    torch.testing.assert_close(fused, nll(torch.nn.Sequential(hidden, output)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"^vaekernels.importance_sampled_nll: output_layer must be a torch.nn.Linear"):
        nll(hidden, output_layer=output, likelihood="gaussian", log_var=torch.zeros(9))
