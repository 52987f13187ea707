"""The whole MLP VAE loss in one op, against its plain-PyTorch composition: values and every
parameter's gradient (any weighting of the two terms per example), closed forms, the zoo's
VAE family on it, extremes, errors, registration and compile."""

import copy
import unittest.mock

import pytest
import torch
from conftest import assert_triton_schema_is_cpp, needs_cpp, rel_err

import vaekernels
from models.vae import zoo
from vaekernels.reference import mlp_vae as ref

RTOL = {torch.float32: 2e-5, torch.float64: 1e-11}


def vae_inputs(B=5, K=3, D=9, d=2, encoder=(7,), decoder=(6, 8), *, dtype=torch.float64, device="cpu", seed=0):
    """x [B, D], eps [B, K, d] and the layers of a D -> encoder... -> 2d and d -> decoder... -> D pair of MLPs."""
    g = torch.Generator().manual_seed(seed)

    def layers(widths):
        weights = [torch.randn(o, i, generator=g, dtype=torch.float64) / i**0.5 for i, o in zip(widths, widths[1:])]
        biases = [torch.randn(o, generator=g, dtype=torch.float64) * 0.3 for o in widths[1:]]
        return [t.to(device=device, dtype=dtype) for t in weights], [t.to(device=device, dtype=dtype) for t in biases]

    x = torch.bernoulli(torch.full((B, D), 0.4, dtype=torch.float64), generator=g).to(device=device, dtype=dtype)
    eps = torch.randn(B, K, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return x, eps, *layers((D, *encoder, 2 * d)), *layers((d, *decoder, D))


def leaves(layers):
    return [[t.detach().clone().requires_grad_() for t in group] for group in layers]


def terms_and_grads(fn, x, eps, layers, rec_weight, kl_weight):
    layers = leaves(layers)
    reconstruction, kl = fn(x, eps, *layers)
    ((reconstruction * rec_weight).sum() + (kl * kl_weight).sum()).backward()
    return reconstruction.detach(), kl.detach(), [t.grad for group in layers for t in group]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("widths", [((7,), (6, 8)), ((), ()), ((5, 4, 6), (3,))], ids=["2-3", "1-1", "4-2"])
def test_terms_and_gradients_match_the_reference(device_backend, dtype, K, widths):
    device, _ = device_backend
    x, eps, *layers = vae_inputs(K=K, encoder=widths[0], decoder=widths[1], dtype=dtype, device=device)
    g = torch.Generator().manual_seed(1)
    # Different weights per example: the backward may not assume a mean over the batch.
    rec_weight, kl_weight = torch.randn(2, 5, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    got = terms_and_grads(vaekernels.mlp_vae, x, eps, layers, rec_weight, kl_weight)
    want = terms_and_grads(
        ref.mlp_vae, x.double(), eps.double(), [[t.double() for t in group] for group in layers],
        rec_weight.double(), kl_weight.double(),
    )  # fmt: skip
    assert got[0].dtype == dtype
    for name, a, b in (("reconstruction", got[0], want[0]), ("kl", got[1], want[1])):
        assert rel_err(a, b) <= RTOL[dtype], (name, rel_err(a, b))
    for i, (a, b) in enumerate(zip(got[2], want[2])):
        assert a.shape == b.shape and rel_err(a, b) <= RTOL[dtype], (i, rel_err(a, b))


def test_closed_forms_with_constant_layers():
    """A decoder whose last weight is zero outputs its bias b whatever z is: the reconstruction is
    the Bernoulli NLL of x under logits b; an encoder whose last weight is zero gives mean and
    log_var from its bias, and the KL its closed form."""
    x, eps, ew, eb, dw, db = vae_inputs(K=4)
    ew[-1].zero_()
    dw[-1].zero_()
    reconstruction, kl = vaekernels.mlp_vae(x, eps, ew, eb, dw, db)
    logits = db[-1].expand_as(x)
    nll = -(x * torch.log(torch.sigmoid(logits)) + (1 - x) * torch.log(torch.sigmoid(-logits))).sum(1)
    torch.testing.assert_close(reconstruction, nll, rtol=1e-12, atol=1e-12)
    mean, log_var = eb[-1].chunk(2)
    closed = 0.5 * (mean**2 + log_var.exp() - 1 - log_var).sum()
    torch.testing.assert_close(kl, closed.expand(5), rtol=1e-12, atol=1e-12)


def test_the_zoo_vae_family_runs_on_it_with_the_same_loss_and_gradients():
    """vae, beta-vae, capacity-vae and GECO (MLP, Bernoulli) take their terms from mlp_vae: the
    same loss and gradients as their own modules composed by hand, on the same noise."""
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((6, 16), 0.3))
    for name in ("vae", "beta-vae", "capacity-vae", "geco"):
        model = zoo.build_model(name, data_dim=16, image_shape=(4, 4), latent_dim=2, hidden_dim=8, k=2)
        twin = copy.deepcopy(model)  # capacity-vae and GECO move their state at every training step
        assert model.fused_layers is not None, name
        loss, _ = model(x, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad(loss, list(model.parameters()))
        eps = torch.randn((6, 2, 2), generator=torch.Generator().manual_seed(3))
        mean, log_var = twin.encode(x)
        z = mean.unsqueeze(1) + torch.exp(0.5 * log_var).unsqueeze(1) * eps
        reconstruction = -vaekernels.bernoulli_log_prob(twin.decode(z), x).mean(1)
        with unittest.mock.patch.object(
            type(twin), "terms", return_value=(reconstruction, vaekernels.gaussian_kl(mean, log_var))
        ):
            expected_loss, _ = twin(x)
        expected_grads = torch.autograd.grad(expected_loss, list(twin.parameters()), allow_unused=True)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, rtol=1e-4, atol=1e-5)


def test_models_outside_its_form_keep_their_own_composition():
    for name, kwargs in (("vae", {"arch": "conv"}), ("vae", {"likelihood": "gaussian"}), ("cvae", {"num_classes": 3})):
        model = zoo.build_model(name, data_dim=64, image_shape=(8, 8), latent_dim=2, hidden_dim=8, **kwargs)
        assert model.fused_layers is None, (name, kwargs)
    relu = zoo.mlp(4, 8, 2, activation=torch.nn.ReLU)
    assert zoo.tanh_mlp_layers(relu) is None


def test_extreme_logits_and_variances_stay_finite():
    x, eps, ew, eb, dw, db = vae_inputs(dtype=torch.float32)
    dw[-1].mul_(1e4)  # logits of order 1e4: softplus and sigmoid saturate, no overflow
    eb[-1][2:].fill_(-60.0)  # log_var -60: a posterior sharper than float32's epsilon
    layers = leaves([ew, eb, dw, db])
    reconstruction, kl = vaekernels.mlp_vae(x, eps, *layers)
    (reconstruction.sum() + kl.sum()).backward()
    with vaekernels.use_backend("reference"):
        want_rec, want_kl = ref.mlp_vae(
            x.double(), eps.double(), *[[t.detach().double() for t in group] for group in layers]
        )
    assert torch.isfinite(reconstruction).all() and torch.isfinite(kl).all()
    assert rel_err(reconstruction, want_rec) <= 1e-4 and rel_err(kl, want_kl) <= 1e-5
    assert all(torch.isfinite(t.grad).all() for group in layers for t in group)


def test_a_nan_logit_gives_a_nan_loss_for_its_example_only():
    x, eps, ew, eb, dw, db = vae_inputs(dtype=torch.float32)
    db[-1][3] = float("nan")  # every example's logit 3
    reconstruction, kl = vaekernels.mlp_vae(x, eps, ew, eb, dw, db)
    assert torch.isnan(reconstruction).all() and torch.isfinite(kl).all()


def test_errors_name_the_function_and_argument():
    x, eps, ew, eb, dw, db = vae_inputs()
    cases = [
        ((x[0], eps, ew, eb, dw, db), ValueError, r"x must have shape \[B, D\]"),
        ((x, eps[:3], ew, eb, dw, db), ValueError, r"eps must have shape \[B, K, d\] with B = 5"),
        ((x, eps.float(), ew, eb, dw, db), TypeError, r"eps must have the dtype of x"),
        ((x, eps, ew[0], eb, dw, db), TypeError, r"encoder_weights must be a non-empty list of tensors"),
        ((x, eps, [], [], dw, db), TypeError, r"encoder_weights must be a non-empty list of tensors"),
        ((x, eps, ew, eb[:1], dw, db), ValueError, r"encoder_biases must hold one bias per layer \(2\), got 1"),
        ((x, eps, ew, eb, [dw[0].t(), *dw[1:]], db), ValueError, r"decoder_weights\[0\] must have shape \[out, in\]"),
        ((x, eps, ew, eb, dw, [*db[:-1], db[-1][:3]]), ValueError, r"decoder_biases\[2\] must have shape \[out\]"),
        ((x, eps, [ew[0].float(), ew[1]], eb, dw, db), TypeError, r"encoder_weights\[0\] must have the dtype of x"),
        ((x.clone().requires_grad_(), eps, ew, eb, dw, db), ValueError, r"x must not require grad"),
        ((x, eps.clone().requires_grad_(), ew, eb, dw, db), ValueError, r"eps must not require grad"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=rf"^vaekernels.mlp_vae: {message}"):
            vaekernels.mlp_vae(*args)


@needs_cpp
def test_a_second_backward_is_refused():
    x, eps, *layers = vae_inputs()
    layers = leaves(layers)
    reconstruction, kl = vaekernels.mlp_vae(x, eps, *layers)
    (grad,) = torch.autograd.grad(reconstruction.sum() + kl.sum(), layers[0][0], create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        grad.sum().backward()


@needs_cpp
@pytest.mark.parametrize("namespace", ["vaekernels", "vaekernels_triton"])
def test_opcheck(namespace):
    ops = getattr(torch.ops, namespace)
    x, eps, ew, eb, dw, db = vae_inputs(B=3, K=2, D=4, encoder=(3,), decoder=(3,))
    ew, eb, dw, db = leaves([ew, eb, dw, db])
    torch.library.opcheck(ops.mlp_vae.default, (x, eps, ew, eb, dw, db))
    _, _, saved = ops.mlp_vae(x, eps, *[[t.detach() for t in group] for group in (ew, eb, dw, db)])
    g = torch.Generator().manual_seed(2)
    grads = torch.randn(2, 3, generator=g, dtype=torch.float64)
    torch.library.opcheck(
        ops.mlp_vae_backward.default,
        (grads[0], grads[1], x, eps, [t.detach() for t in ew], [t.detach() for t in dw], saved),
    )


@needs_cpp
def test_triton_ops_have_the_cpp_schemas():
    assert_triton_schema_is_cpp("mlp_vae")
    assert_triton_schema_is_cpp("mlp_vae_backward")


@needs_cpp
def test_gradcheck_float64():
    x, eps, *layers = vae_inputs(B=3, K=2, D=4, encoder=(3,), decoder=(3,))
    flat = [t.requires_grad_() for group in layers for t in group]
    weights = torch.randn(2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def loss(*params):
        groups = [list(params[0:2]), list(params[2:4]), list(params[4:6]), list(params[6:8])]
        reconstruction, kl = vaekernels.mlp_vae(x, eps, *groups)
        return (reconstruction * weights[0]).sum() + (kl * weights[1]).sum()

    assert torch.autograd.gradcheck(loss, tuple(flat))


@needs_cpp
@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compiles_without_graph_breaks(backend):
    x, eps, *layers = vae_inputs(dtype=torch.float32)
    torch._dynamo.reset()

    def loss(x, eps, ew, eb, dw, db):
        reconstruction, kl = vaekernels.mlp_vae(x, eps, ew, eb, dw, db)
        return reconstruction.mean() + 0.5 * kl.mean()

    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    for fn in (compiled, loss):
        params = leaves(layers)
        fn(x, eps, *params).backward()
        if fn is compiled:
            got = [t.grad for group in params for t in group]
        else:
            want = [t.grad for group in params for t in group]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
