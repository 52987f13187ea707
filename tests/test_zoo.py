"""The model zoo on tiny data made here: every model learns, gives the same loss on the fused ops
and on the reference backend, GECO's multiplier moves the documented way, the capacity schedule
hits its values, and the metrics are right on constructed cases."""

import copy
import math

import pytest
import torch

import vaekernels
from models.metrics import likelihood as metrics
from models.studies import toys
from models.vae.zoo import LIKELIHOODS, MODELS, VAE, LagrangeMultiplier, Likelihood, build_model, capacity

MULTIPLIER_MODELS = ("geco", "geco-iwae", "vhp-vae")


def prototypes(n: int = 96, dim: int = 16, seed: int = 0):
    """Noisy copies of four binary prototypes (labels: which one), and their intensities in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.bernoulli(torch.full((4, dim), 0.5), generator=generator)
    labels = torch.randint(0, 4, (n,), generator=generator)
    x = (base[labels] + torch.bernoulli(torch.full((n, dim), 0.05), generator=generator)) % 2
    return x, labels


def tiny(name, **options):
    settings = dict(
        latent_dim=2,
        hidden_dim=16,
        k=3,
        num_classes=4,
        tolerance=4.0,
        rate=1e-2,
        top_latent_dim=2,
        top_hidden_dim=8,
        prior_hidden_dim=8,
        prior_k=3,
        capacity_steps=10,
        capacity_max=2.0,
        gamma=5.0,
    )
    settings.update(options)
    return build_model(name, 16, (4, 4), **settings)


def train(model, x, y, steps=40, lr=1e-2, seed=0):
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    record = []
    for step in range(steps):
        batch = slice((step % 3) * 32, (step % 3 + 1) * 32)
        loss, stats = model(x[batch], y[batch], generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert math.isfinite(loss.item())
        # With a multiplier the loss moves with lambda; the reconstruction is what must fall.
        record.append(stats["reconstruction"].item() if "lambda" in stats else loss.item())
    return record


@pytest.mark.parametrize("name", MODELS)
def test_each_model_learns(name):
    x, y = prototypes()
    record = train(tiny(name), x, y)
    first, last = sum(record[:6]) / 6, sum(record[-6:]) / 6
    assert last < first - 0.5, f"{name}: {first:.2f} -> {last:.2f}"


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_architectures_and_likelihoods_learn(arch, likelihood):
    x, y = prototypes()
    x = x * 0.8 + 0.1 if likelihood != "bernoulli" else x  # intensities, away from the clamped edges
    x = (x * 255).round() / 255
    record = train(tiny("vae", arch=arch, likelihood=likelihood), x, y, steps=30)
    assert sum(record[-5:]) / 5 < sum(record[:5]) / 5 - 0.5


@pytest.mark.parametrize("name", MODELS)
def test_fused_and_reference_backends_agree(name):
    x, y = prototypes(32)
    likelihood = "gaussian" if name == "vae" else "bernoulli"  # the Gaussian path through iwae_bound too
    model = tiny(name, likelihood=likelihood, estimator="stl" if name == "geco-iwae" else "dreg")
    losses, grads = [], []
    for backend in ("auto", "reference"):
        twin = copy.deepcopy(model)
        with vaekernels.use_backend(backend):
            loss, _ = twin(x, y, torch.Generator().manual_seed(1))
            loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in twin.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)


def test_multiplier_rises_while_violated_and_falls_once_met():
    multiplier = LagrangeMultiplier(alpha=0.5, rate=0.1)
    c_hat = torch.tensor(3.0, requires_grad=True)
    lam, constraint = multiplier(c_hat)
    assert lam == 1.0 and multiplier.moving_average.item() == 3.0  # C_ma starts at C_hat
    assert multiplier.value.item() == pytest.approx(math.exp(0.3))
    lam, constraint = multiplier(torch.tensor(1.0, requires_grad=True))
    assert multiplier.moving_average.item() == pytest.approx(2.0)  # 0.5 * 3 + 0.5 * 1
    assert constraint.item() == pytest.approx(2.0)  # straight-through: the moving average's value...
    constraint.backward()
    for _ in range(20):
        multiplier(torch.tensor(-5.0))
    assert multiplier.value.item() < 1.0  # ...and lambda shrinks once the constraint is met
    c = torch.tensor(4.0, requires_grad=True)
    _, straight = multiplier(c)
    straight.backward()
    assert c.grad.item() == 1.0  # ...with the batch's gradient


@pytest.mark.parametrize("tolerance, direction", [(0.0, 1), (1e4, -1)])
def test_geco_lambda_direction(tolerance, direction):
    x, y = prototypes()
    model = tiny("geco", tolerance=tolerance)
    train(model, x, y, steps=5)
    assert (model.multiplier.value.item() - 1.0) * direction > 0


def test_capacity_schedule_hits_its_values():
    assert [capacity(t, 25.0, 1000) for t in (0, 250, 500, 1000, 5000)] == [0.0, 6.25, 12.5, 25.0, 25.0]
    model = tiny("capacity-vae", capacity_max=3.0, capacity_steps=4)
    x, y = prototypes(8)
    seen = [model(x, y)[1]["capacity"].item() for _ in range(6)]
    assert seen == [0.0, 0.75, 1.5, 2.25, 3.0, 3.0]
    model.eval()
    assert model(x, y)[1]["capacity"].item() == 3.0 and model.step.item() == 6  # evaluation does not count


def test_encoder_that_ignores_x_has_no_active_units_and_no_information():
    model = tiny("vae", latent_dim=3)
    with torch.no_grad():
        model.encoder.head[0].weight.zero_()  # the first layer sees x; without it every posterior is the same
    x, _ = prototypes(64)
    results = metrics.evaluate_model(
        model, x, num_samples=20, chunk_size=7, progress=False, generator=torch.Generator().manual_seed(0)
    )
    assert results["active_units"] == 0
    assert abs(results["mutual_information"]) < 1e-5
    assert results["average_kl"] == pytest.approx(results["marginal_kl"], abs=1e-5)


def test_mutual_information_is_at_most_log_n_and_surgery_adds_up():
    generator = torch.Generator().manual_seed(0)
    for spread in (0.1, 1.0, 100.0):
        mean = spread * torch.randn(50, 4, generator=generator)
        log_var = 0.3 * torch.randn(50, 4, generator=generator)
        z = mean + torch.exp(0.5 * log_var) * torch.randn(50, 4, generator=generator)
        parts = metrics.elbo_surgery(z, mean, log_var)
        assert parts["mutual_information"] <= math.log(50) + 1e-5
        assert parts["average_kl"] == pytest.approx(parts["marginal_kl"] + parts["mutual_information"], abs=1e-4)
    assert parts["mutual_information"] == pytest.approx(math.log(50), abs=1e-3)  # far apart: I = log N


def test_active_units_counts_variances_above_threshold():
    means = torch.tensor([[0.0, 0.0, 1.0], [0.05, 0.2, -1.0], [0.0, -0.2, 0.0]])
    count, variances = metrics.active_units(means)
    assert count == 2 and variances[0] < 0.01 < variances[1]


def test_streamed_nll_matches_the_generic_path_and_bounds():
    model = tiny("vae", latent_dim=3)
    x, _ = prototypes(10)
    fused = metrics.importance_sampled_nll(
        model, x, num_samples=30, chunk_size=8, batch_size=4, progress=False, generator=torch.Generator().manual_seed(3)
    )
    model.standard_prior = False  # the hierarchical models' path: log-weights folded chunk by chunk
    generic = metrics.importance_sampled_nll(
        model, x, num_samples=30, chunk_size=8, batch_size=4, progress=False, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(fused, generic, rtol=1e-5, atol=1e-4)
    assert (fused > 0).all()


def test_score_function_gradient_is_unbiased_but_far_noisier():
    result = toys.gradient_variance(3, samples=20000)
    torch.testing.assert_close(
        torch.tensor(result["reparameterised_mean"]), torch.tensor(result["true_gradient"]), atol=0.05, rtol=0
    )
    torch.testing.assert_close(
        torch.tensor(result["score_function_mean"]), torch.tensor(result["true_gradient"]), atol=0.3, rtol=0
    )
    assert result["reparameterised_variance"] == pytest.approx(1.0, rel=0.05)  # d/dmu f = x - z, Var = sigma^2
    assert result["score_function_variance"] > 5 * result["reparameterised_variance"]


def test_posterior_collapse_only_where_the_data_have_no_correlations():
    # The seed's toy: diagonal Sigma leaves every latent unused; rank-2 structure takes two of them.
    assert toys.posterior_collapse("diagonal")["active_units"] == 0
    assert toys.posterior_collapse("full")["active_units"] == 2


@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
def test_composed_bound_matches_the_fused_one(estimator, monkeypatch):
    # The discretised logistic has no fused bound: the zoo composes it, DReG's reweighting included.
    # Composed for a Bernoulli likelihood, it must give the fused bound's value and gradients.
    x, _ = prototypes(8)
    model = tiny("iwae", arch="linear", estimator=estimator)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(Likelihood, "fused", fused)
        monkeypatch.setattr(VAE, "fused_output_layer", None)
        twin = copy.deepcopy(model)
        loss, _ = twin(x, None, torch.Generator().manual_seed(1))
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in twin.parameters()])
    for fused, composed in zip(*results, strict=True):
        torch.testing.assert_close(composed, fused, rtol=1e-5, atol=1e-6)
