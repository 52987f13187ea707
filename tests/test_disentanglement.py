"""The shapes dataset (its factors reproduce its images, draws are deterministic, bad arguments are
named), the disentanglement metrics on constructed representations, and the beta-VAE / FactorVAE
models and command on it."""

import pytest
import torch

from models.data.shapes import Shapes
from models.metrics import disentanglement as metrics

# One pytest-xdist worker runs this module: its metric scores are one module fixture.
pytestmark = pytest.mark.xdist_group("disentanglement")

SMALL = Shapes(scales=3, orientations=8, positions=6, size=16)


def test_factors_reproduce_the_image_and_the_grid_is_complete():
    shapes = Shapes(scales=2, orientations=3, positions=4, size=32)
    images, factors = shapes[torch.arange(len(shapes))]
    assert images.shape == (len(shapes), 32, 32) and set(images.unique().tolist()) == {0, 1}
    assert torch.equal(shapes.render(factors), images)
    assert torch.equal(factors, torch.cartesian_prod(*(torch.arange(n) for n in shapes.sizes)))
    assert (images.flatten(1).sum(1) > 0).all()  # no shape falls off the canvas
    # The whole grid, images apart: every factor changes the picture.
    assert len({bytes(image.flatten().tolist()) for image in images}) > len(shapes) // 2
    full = Shapes()
    index = torch.tensor([0, 12345, len(full) - 1])
    assert torch.equal(full[index][0], full.render(full.index_to_factors(index)))


def test_each_factor_moves_the_shape_the_way_it_says():
    shapes = Shapes()
    base = torch.tensor([[1, 0, 0, 16, 16]])

    def centre(factors):
        image = shapes.render(factors)[0].float()
        rows, columns = image.nonzero().float().mean(0)
        return columns.item(), rows.item(), image.sum().item()

    x0, y0, area0 = centre(base)
    x1, y1, _ = centre(base + torch.tensor([[0, 0, 0, 10, 0]]))
    x2, y2, _ = centre(base + torch.tensor([[0, 0, 0, 0, 10]]))
    _, _, area_big = centre(base + torch.tensor([[0, 5, 0, 0, 0]]))
    assert x1 > x0 + 10 and abs(y1 - y0) < 1 and y2 > y0 + 10 and abs(x2 - x0) < 1
    assert area_big == pytest.approx(4 * area0, rel=0.1)  # scale 0.5 -> 1: four times the area
    upright, turned = (shapes.render(torch.tensor([[1, 5, k, 16, 16]]))[0] for k in (0, 10))  # ellipse, 0 and 90 deg
    assert torch.equal(turned, upright.T)


def test_draws_are_deterministic_under_a_seed():
    first = SMALL.sample(50, torch.Generator().manual_seed(3))
    second = SMALL.sample(50, torch.Generator().manual_seed(3))
    other = SMALL.sample(50, torch.Generator().manual_seed(4))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])
    assert torch.equal(SMALL.values(first[1])[:, 0], first[1][:, 0].float())


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: Shapes(scales=0), "Shapes: scales must be an integer >= 1, got 0"),
        (lambda: Shapes(size=4), "Shapes: size must be an integer >= 8, got 4"),
        (lambda: SMALL.render(torch.zeros(2, 4, dtype=torch.long)), "render: factors must be an integer tensor [N, 5]"),
        (lambda: SMALL.render(torch.zeros(2, 5)), "got torch.float32 tensor of shape [2, 5]"),
        (
            lambda: SMALL.render(torch.tensor([[0, 0, 8, 0, 0]])),
            "factors[0, 2] (orientation) must lie in [0, 8), got 8",
        ),
        (lambda: SMALL.index_to_factors(torch.tensor([len(SMALL)])), "index must be a 1-d tensor of values in [0, "),
        (lambda: SMALL.sample(0), "sample_factors: n must be a positive integer, got 0"),
        (
            lambda: metrics.beta_vae_metric(lambda f: f.float(), SMALL, pairs=1),
            "beta_vae_metric: pairs must be an integer >= 2, got 1",
        ),
        (
            lambda: metrics.factor_vae_metric(lambda f: f.float()[:1], SMALL, train_points=5, eval_points=5),
            "factor_vae_metric: represent must map factors [N, F] to float codes [N, d]",
        ),
    ],
)
def test_bad_arguments_say_what_is_wrong(call, message):
    with pytest.raises((ValueError, TypeError)) as error:
        call()
    assert message in str(error.value)
    assert str(error.value).startswith("models.")


def standardised(factors):
    """The identity representation of the true factors, each scaled to unit variance over its grid."""
    sizes = torch.tensor(SMALL.sizes, dtype=torch.float32)
    return (factors.float() - (sizes - 1) / 2) / ((sizes.square() - 1) / 12).sqrt()


ROTATION = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(0)))[0]
REPRESENTATIONS = {
    "identity": standardised,
    "constant": lambda factors: torch.ones(len(factors), 5),
    "rotation": lambda factors: standardised(factors) @ ROTATION,
}
PROTOCOL = {
    "beta_vae_metric": dict(train_points=200, eval_points=100, pairs=16),
    "factor_vae_metric": dict(train_points=200, eval_points=100, batch_size=32, variance_points=512),
}


@pytest.fixture(scope="module")
def scores():
    return {
        (metric, name): getattr(metrics, metric)(represent, SMALL, **PROTOCOL[metric])["score"]
        for metric in PROTOCOL
        for name, represent in REPRESENTATIONS.items()
    }


@pytest.mark.parametrize("metric", PROTOCOL)
def test_metrics_on_constructed_representations(scores, metric):
    assert scores[metric, "identity"] >= 0.9
    assert scores[metric, "constant"] <= 0.2
    assert scores[metric, "rotation"] < scores[metric, "identity"]


NOISE = torch.randn(10_000, 5, generator=torch.Generator().manual_seed(7))


def noisy(factors):
    """The true factors plus noise fixed per factor row: a deterministic, imperfect representation."""
    return standardised(factors) + NOISE[(factors * torch.tensor([9973, 997, 97, 7, 1])).sum(1) % len(NOISE)]


@pytest.mark.parametrize("metric", PROTOCOL)
def test_metrics_are_deterministic_under_a_seed(metric):
    first, again, other = (getattr(metrics, metric)(noisy, SMALL, seed=seed, **PROTOCOL[metric]) for seed in (0, 0, 1))
    assert first == again
    assert (first["score"], first["train_accuracy"]) != (other["score"], other["train_accuracy"])


def test_factor_vae_metric_drops_collapsed_dimensions():
    def represent(factors):  # the true factors, and five more dimensions of almost no variance
        return torch.cat([standardised(factors), 1e-3 * standardised(factors)], 1)

    result = metrics.factor_vae_metric(represent, SMALL, **PROTOCOL["factor_vae_metric"])
    assert result["kept_dimensions"] == [0, 1, 2, 3, 4] and result["score"] >= 0.9
