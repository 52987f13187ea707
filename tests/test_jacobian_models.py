"""The GRAE models and the identifiability toy: quick CPU checks on data made here."""

import math

import pytest
import torch
from tqdm.auto import tqdm

from models.jacobian import grae
from models.studies import grae_toy
from vaekernels.reference import jacobian as ref


def test_alignment_is_one_exactly_for_permuted_signed_rescaled_columns():
    truth = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    learnt = truth[:, [2, 0, 3, 1]] * torch.tensor([-1.0, 2.0, 0.5, -3.0])
    assert grae_toy.alignment(learnt, truth) == pytest.approx(1.0, abs=1e-6)
    rotation = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))[0]
    assert grae_toy.alignment(truth @ rotation, truth) < 0.99


@pytest.mark.parametrize("family", grae_toy.FAMILIES)
def test_toy_optimal_covariance_is_the_jacfwd_one(family):
    torch.manual_seed(0)
    model = grae_toy.ToyVAE(outputs=6, latent=3, nu="tanh", family=family)
    x = torch.randn(20, 6)
    with torch.no_grad():
        jac = ref.jacobian(model.decoder, model.encoder(x))
        precision = torch.eye(3) + (jac.transpose(1, 2) @ jac).mean(0) / 0.05**2
    expected = torch.linalg.inv(precision) if family == "full" else torch.diag(1 / precision.diagonal())
    torch.testing.assert_close(grae_toy.optimal_covariance(model, x, 0.05), expected, rtol=1e-4, atol=1e-7)
    assert math.isfinite(model.negative_elbo(x, 0.05).item())


def test_toy_training_raises_the_elbo():
    args = grae_toy._parse_args(
        ["--out", "/nonexistent/grae_toy", "--samples", "200", "--steps", "30", "--batch-size", "100"]
    )
    x, _ = grae_toy.make_data(args, torch.Generator().manual_seed(0))
    for family in grae_toy.FAMILIES:
        torch.manual_seed(0)  # the initialisation train() starts from
        untrained = grae_toy.ToyVAE(args.outputs, args.latent, args.nu, family)
        trained = grae_toy.train(args, family, 0, x, tqdm(disable=True))
        torch.manual_seed(1)
        before = untrained.negative_elbo(x, args.noise).item()
        torch.manual_seed(1)
        assert trained.negative_elbo(x, args.noise).item() < before


@pytest.mark.parametrize(
    "method,arch", [("grae", "mlp"), ("grae-star", "mlp"), ("grae-star", "conv"), ("beta-vae", "mlp")]
)
def test_grae_objectives_train(method, arch):
    torch.manual_seed(0)
    model = grae.Autoencoder(method, arch, latent=3, hidden=16, beta=0.2, columns=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.rand(8, grae.PIXELS, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(4):
        loss = model.loss(x, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
