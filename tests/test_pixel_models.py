"""The autoregressive MNIST models: exact causality of their networks, a few training steps that
lower the loss, and sampling (their training command: tests/test_models_cli.py)."""

import pytest
import torch

from models.autoregressive import pixelcnnpp, pixelsnail, pixelvae, vlae


def tiny_networks():
    torch.manual_seed(0)
    return {
        "pixelcnnpp": pixelcnnpp.PixelCNNPlusPlus(1, filters=8, blocks=2, mixtures=2).double(),
        "pixelsnail": pixelsnail.PixelSNAIL(
            1, filters=8, blocks=2, resnets=1, key_channels=4, heads=2, mixtures=2
        ).double(),
    }


def receptive_field(fn, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """Which input pixels the output at (i, j) depends on: |d out[:, :, i, j] / d x| summed over channels."""
    x = x.clone().requires_grad_()
    fn(x)[:, :, i, j].sum().backward()
    return x.grad.abs().sum((0, 1))


def strictly_before(H: int, W: int, i: int, j: int) -> torch.Tensor:
    position = torch.arange(H * W).view(H, W)
    return position < i * W + j


@pytest.mark.parametrize("name", ["pixelcnnpp", "pixelsnail"])
@pytest.mark.parametrize("i,j", [(0, 0), (3, 0), (4, 6), (6, 6)])
def test_mixture_networks_see_exactly_the_pixels_before(name, i, j):
    """Zero tolerance: no gradient from the pixel itself or any later one; every earlier pixel reaches it
    (no blind spot)."""
    net = tiny_networks()[name]
    x = torch.rand(2, 1, 7, 7, dtype=torch.float64) * 2 - 1
    reach = receptive_field(net, x, i, j)
    before = strictly_before(7, 7, i, j)
    assert torch.equal(reach[~before], torch.zeros_like(reach[~before]))
    if name == "pixelsnail":  # attention reaches the whole past
        assert (reach[before] > 0).all()
    neighbours = [(i, j - 1), (i - 1, j - 1), (i - 1, j), (i - 1, j + 1)]
    assert all(reach[a, b] > 0 for a, b in neighbours if 0 <= a < 7 and 0 <= b < 7)


def test_vlae_decoder_sees_only_its_window():
    torch.manual_seed(0)
    decoder = vlae.LocalWindowDecoder(latent_dim=3, channels=4).double()
    z = torch.randn(2, 3, dtype=torch.float64)
    reach = receptive_field(lambda x: decoder(x, z), torch.rand(2, 1, 28, 28, dtype=torch.float64), 10, 10)
    window = torch.zeros(28, 28, dtype=torch.bool)
    window[9, 9:12] = True
    window[10, 9] = True
    assert torch.equal(reach > 0, window)


def test_pixelvae_decoder_is_causal_given_z():
    torch.manual_seed(0)
    decoder = pixelvae.GatedDecoder(latent_dim=3, channels=4, layers=3).double()
    z = torch.randn(2, 3, dtype=torch.float64)
    reach = receptive_field(lambda x: decoder(x, z), torch.rand(2, 1, 12, 12, dtype=torch.float64), 6, 5)
    before = strictly_before(12, 12, 6, 5)
    assert torch.equal(reach[~before], torch.zeros_like(reach[~before]))
    assert reach[6, 4] > 0 and reach[5, 5] > 0 and reach[5, 6] > 0  # left, above, above-right: no blind spot


def few_steps(model, batches, steps=8, lr=3e-3):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        loss = model.loss(batches[step % len(batches)]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def synthetic_digits(n, generator):
    """28x28 images of a bright bar at a random column on a dark background, 256 levels."""
    images = torch.zeros(n, 1, 28, 28)
    columns = torch.randint(4, 24, (n,), generator=generator)
    for image, column in zip(images, columns, strict=True):
        image[:, 4:24, column - 2 : column + 2] = 1.0
    return images


MODELS = {
    "pixelcnnpp": lambda: pixelcnnpp.MixtureModel(pixelcnnpp.PixelCNNPlusPlus(1, 8, 1, 2)),
    "pixelsnail": lambda: pixelcnnpp.MixtureModel(pixelsnail.PixelSNAIL(1, 8, 1, 1, 4, 1, 2)),
    "pixelvae": lambda: pixelvae.LatentAutoregressiveModel(pixelvae.GatedDecoder(4, 8, 2), latent_dim=4),
    "vlae": lambda: pixelvae.LatentAutoregressiveModel(vlae.LocalWindowDecoder(4, 8), latent_dim=4),
}
BINARY = {"pixelvae", "vlae"}


def model_and_data(name):
    torch.manual_seed(0)
    x = synthetic_digits(8, torch.Generator().manual_seed(0))
    return MODELS[name](), (x if name in BINARY else x * 2 - 1)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_few_training_steps_lower_the_loss(name):
    model, x = model_and_data(name)
    losses = few_steps(model, [x])
    assert losses[-1] < losses[0]


# One model per sampler, on an 8x8 canvas (64 forward passes).
@pytest.mark.parametrize("name", ["pixelcnnpp", "pixelvae"])
def test_samples_are_images_on_the_grid(name):
    model, _ = model_and_data(name)
    images = model.sample(2, torch.Generator().manual_seed(0), size=8)
    assert images.shape == (2, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    levels = 1 if name in BINARY else 255
    assert (images * levels - torch.round(images * levels)).abs().max() < 1e-4
