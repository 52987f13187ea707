"""The adversarial zoo on tiny data made here: every model trains a few steps without NaN and its
losses move the documented way, the permutation sampler gives independent marginals, the improved
GAN techniques do what they say, and the command lines train, resume exactly, write their PNGs and
refuse bad arguments."""

import json

import pytest
import torch
from fake_data import write_fake_mnist

from models import adversarial
from models.adversarial import HistoricalAverage, Optimizers, Techniques, VirtualBatchNorm, virtual_batch
from models.adversarial.factorvae import FactorVAE, latent_traversals, permute_dims
from models.adversarial.gans import AAE, AVB, BiGAN, InfoGAN, sample_prior
from models.cli import main
from models.studies import disentanglement as disentangle


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and on a busy machine a second one spins waiting for the first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prototypes(n=96, dim=16, seed=0):
    """Noisy copies of four binary prototypes (labels: which one)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.bernoulli(torch.full((4, dim), 0.5), generator=generator)
    labels = torch.randint(0, 4, (n,), generator=generator)
    return (base[labels] + torch.bernoulli(torch.full((n, dim), 0.05), generator=generator)) % 2, labels


def run(model, steps, lr=3e-3, data=None, batch=32):
    torch.manual_seed(0)
    x, y = data if data is not None else prototypes()
    optimizers = Optimizers(model.players(), lr)
    generator = torch.Generator().manual_seed(0)
    history = []
    for step in range(steps):
        rows = slice((step % 3) * batch, (step % 3 + 1) * batch)
        labels = None if y is None else y[rows]
        stats = {key: float(value) for key, value in model.train_step(x[rows], labels, generator, optimizers).items()}
        assert all(torch.isfinite(torch.tensor(list(stats.values())))), (step, stats)
        history.append(stats)
    return history


def mean(history, key, part):
    values = [h[key] for h in history]
    return sum(values[part]) / len(values[part])


FIRST, LAST = slice(0, 5), slice(-5, None)


def test_permutation_keeps_each_marginal_and_breaks_the_correlation():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(4000, 1, generator=generator)
    z = torch.cat([base, base + 0.1 * torch.randn(4000, 1, generator=generator), -base, torch.randn(4000, 1)], 1)
    permuted = permute_dims(z, generator)
    assert torch.equal(permuted.sort(0).values, z.sort(0).values)  # each dimension's values, exactly
    before, after = torch.corrcoef(z.T), torch.corrcoef(permuted.T)
    assert before[0, 1] > 0.99 and before[0, 2] < -0.99
    off_diagonal = after - torch.eye(4)
    assert off_diagonal.abs().max() < 0.06
    assert not torch.equal(permute_dims(z, torch.Generator().manual_seed(1)), permuted)
    with pytest.raises(ValueError, match=r"permute_dims: z must be \[B, d\], got shape \[4\]"):
        permute_dims(torch.zeros(4))


def test_factor_vae_learns_and_its_discriminator_estimates_the_total_correlation():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((96, 256), 0.2)) * torch.bernoulli(torch.full((4, 256), 0.5))[torch.arange(96) % 4]
    model = FactorVAE(256, (16, 16), arch="conv64", latent_dim=4, gamma=5.0)
    history = run(model, 30, data=(x, None))
    assert mean(history, "reconstruction", LAST) < mean(history, "reconstruction", FIRST) - 5
    # The discriminator alone, on latents whose dimensions are copies of one another: TC is large, and
    # D's logit on q(z) (its estimate) grows from 0 to well above it.
    correlated = torch.randn(256, 1).expand(-1, 4) + 0.05 * torch.randn(256, 4)
    optimizer = torch.optim.Adam(model.discriminator.parameters(), lr=3e-3)
    for _ in range(40):
        real, fake = model.discriminator(correlated), model.discriminator(permute_dims(correlated))
        loss = adversarial.discriminator_loss(real, fake)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3 and model.discriminator(correlated).mean().item() > 2.0


def test_beta_vae_traversals_order_rows_by_kl():
    model = FactorVAE(256, (16, 16), arch="conv64", latent_dim=3, gamma=0.0)
    with torch.no_grad():
        model.encoder.head.bias[:3] = torch.tensor([0.0, 3.0, 1.0])  # means: dimension 1 far, then 2, then 0
        model.encoder.head.weight.zero_()
    grid = latent_traversals(model, torch.zeros(256), torch.tensor([-1.0, 1.0]), torch.zeros(5, 256))
    z_rows = [
        model.decode(torch.tensor([[[-1.0 if j == k else b for j, b in enumerate([0.0, 3.0, 1.0])]]]))
        for k in (1, 2, 0)
    ]
    expected = torch.cat([model.likelihood.mean(z).squeeze(1) for z in z_rows])
    torch.testing.assert_close(grid[::2], expected)


def test_infogan_recovers_its_codes():
    history = run(InfoGAN(16, (4, 4), noise_dim=4, categories=4, continuous=2, hidden_dim=32), 60)
    assert mean(history, "information", LAST) < mean(history, "information", FIRST) - 0.5


@pytest.mark.parametrize(
    "prior, condition", [("gaussian", "none"), ("mixture", "discriminator"), ("swiss-roll", "decoder")]
)
def test_aae_reconstructs_and_its_codes_follow_the_prior(prior, condition):
    model = AAE(16, (4, 4), latent_dim=2, hidden_dim=32, prior=prior, condition=condition, classes=4)
    history = run(model, 40)
    assert mean(history, "reconstruction", LAST) < mean(history, "reconstruction", FIRST) - 1.0
    assert 0.3 < mean(history, "discriminator", LAST) < 2.0  # neither player has won outright


def test_avb_reconstructs_and_its_adversary_learns_the_ratio():
    history = run(AVB(16, (4, 4), latent_dim=2, hidden_dim=32, noise_dim=2), 40)
    assert mean(history, "reconstruction", LAST) < mean(history, "reconstruction", FIRST) - 1.0
    assert mean(history, "adversary", LAST) < mean(history, "adversary", FIRST) - 1.0


@pytest.mark.parametrize("techniques", [Techniques(), Techniques(True, 0.1, 0.1, True)])
def test_bigan_trains_with_and_without_the_techniques(techniques):
    model = BiGAN(16, (4, 4), latent_dim=2, hidden_dim=32, techniques=techniques)
    history = run(model, 20)
    assert mean(history, "discriminator", LAST) < mean(history, "discriminator", FIRST)


def test_infogan_with_every_technique_trains():
    model = InfoGAN(
        16, (4, 4), noise_dim=4, categories=4, continuous=1, hidden_dim=32, techniques=Techniques(True, 0.1, 0.2, True)
    )
    history = run(model, 20)
    assert mean(history, "information", LAST) < mean(history, "information", FIRST)
    assert model.histories["generator"].count.item() == 21


def test_priors_put_each_label_in_its_own_part():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(200)
    mixture = sample_prior("mixture", 2000, 2, labels, generator)
    angles = torch.arange(10) * (2 * torch.pi / 10)
    expected = 4 * torch.stack([torch.cos(angles), torch.sin(angles)], 1)  # component k at angle 2 pi k / 10
    torch.testing.assert_close(mixture.reshape(10, 200, 2).mean(1), expected, atol=0.15, rtol=0)
    roll = sample_prior("swiss-roll", 2000, 2, labels, generator)
    radius = roll.norm(dim=1).reshape(10, 200).median(1).values
    assert (radius.diff() > 0.2).all()  # label k: the k-th tenth of the roll, outwards
    assert sample_prior("gaussian", 5, 7).shape == (5, 7)
    with pytest.raises(ValueError, match="the mixture prior is 2-D: dim must be 2, got 3"):
        sample_prior("mixture", 5, 3)


def test_label_smoothing_moves_the_optimal_discriminator_to_one_minus_alpha():
    logit = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([logit], max_iter=100)

    def closure():
        optimizer.zero_grad()
        loss = adversarial.discriminator_loss(logit, torch.full((1,), -30.0), smoothing=0.2)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert torch.sigmoid(logit).item() == pytest.approx(0.8, abs=1e-4)


def test_feature_matching_pulls_only_the_fake_side():
    real, fake = torch.randn(8, 3, requires_grad=True), torch.randn(6, 3, requires_grad=True)
    loss = adversarial.feature_matching_loss(real, fake)
    loss.backward()
    assert real.grad is None and fake.grad.abs().sum() > 0
    assert adversarial.feature_matching_loss(fake, fake).item() == 0.0


def test_historical_average_is_the_mean_of_the_trajectory():
    parameter = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    history = HistoricalAverage([parameter])
    trajectory = [parameter.detach().clone()]
    for value in ([3.0, 0.0], [5.0, 4.0]):
        parameter.data = torch.tensor(value)
        history.update([parameter])
        trajectory.append(parameter.detach().clone())
    torch.testing.assert_close(history.mean0, torch.stack(trajectory).mean(0))
    penalty = history.penalty([parameter])
    penalty.backward()
    torch.testing.assert_close(parameter.grad, 2 * (parameter.detach() - history.mean0))


def test_virtual_batch_norm_makes_examples_independent_of_their_batch():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), VirtualBatchNorm(5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    reference, x = torch.randn(16, 3), torch.randn(6, 3)
    whole = virtual_batch(net, reference, x)
    alone = torch.cat([virtual_batch(net, reference, x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(whole, alone)
    batch_norm = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5))
    assert not torch.allclose(batch_norm(x)[:3], batch_norm(x[:3]))  # what plain batch norm does instead
    # An example's statistics weigh 1 / (N + 1) against the reference's N.
    layer = VirtualBatchNorm(1, eps=0.0)
    ones = torch.ones(3, 1)
    out = virtual_batch(layer, ones, torch.tensor([[5.0]]))  # mean (3 + 5) / 4 = 2, variance (3 + 25) / 4 - 4 = 3
    torch.testing.assert_close(out, torch.tensor([[3 / 3**0.5]]))
    with pytest.raises(RuntimeError, match="no reference statistics"):
        layer(ones)


def test_techniques_a_model_does_not_take_are_refused():
    with pytest.raises(ValueError, match=r"AVB does not take label_smoothing \(it takes none\)"):
        Techniques(label_smoothing=0.1).check("AVB", ())
    with pytest.raises(ValueError, match="AAE does not take feature_matching"):
        AAE(16, (4, 4), techniques=Techniques(feature_matching=True))
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\), got 1.0"):
        Techniques(label_smoothing=1.0).check("BiGAN", ("label_smoothing",))


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_mnist(root, train=40, test=60)
    return root


TINY = ["--steps", "2", "--batch-size", "8", "--no-progress"]


@pytest.mark.parametrize(
    "argv, pictures",
    [
        (
            ["infogan", "--latent-dim", "4", "--hidden-dim", "16"],
            ["samples.png", "traversal-c1.png", "traversal-c2.png"],
        ),
        (
            [
                "aae",
                "--prior",
                "swiss-roll",
                "--condition",
                "decoder",
                "--label-smoothing",
                "0.1",
                "--hidden-dim",
                "16",
            ],
            ["reconstructions.png", "samples.png"],
        ),
        (
            [
                "bigan",
                "--feature-matching",
                "--historical-averaging",
                "0.01",
                "--virtual-batch-norm",
                "--hidden-dim",
                "16",
            ],
            ["reconstructions.png", "samples.png"],
        ),
    ],
)
def test_the_improved_gan_options_train_from_the_command_line(mnist_dir, tmp_path, argv, pictures):
    out = tmp_path / "run"
    metrics = main(["train", *argv, *TINY, "--data-dir", str(mnist_dir), "--out", str(out)])
    assert metrics["steps"] == 2 and metrics["pictures"] == pictures


def test_resume_continues_exactly_with_historical_averaging_and_virtual_batch_norm(mnist_dir, tmp_path):
    common = [
        "--historical-averaging",
        "0.01",
        "--virtual-batch-norm",
        "--batch-size",
        "8",
        "--hidden-dim",
        "16",
        "--no-progress",
        "--data-dir",
        str(mnist_dir),
    ]
    main(["train", "bigan", *common, "--steps", "7", "--out", str(tmp_path / "whole")])  # 5 steps an epoch
    main(["train", "bigan", *common, "--steps", "3", "--out", str(tmp_path / "split")])
    main(["train", "bigan", "--out", str(tmp_path / "split"), "--resume", "--steps", "7", "--no-progress"])
    first, second = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=False) for name in ("whole", "split"))
    for name, value in first["model"].items():
        assert torch.equal(value, second["model"][name]), name
    assert first["history"] == second["history"] and len(first["history"]) == 7


@pytest.mark.parametrize(
    "argv, message",
    [
        (["aae", "--prior", "mixture", "--latent-dim", "3"], "--prior mixture is 2-D: --latent-dim must be 2"),
        (["avb", "--label-smoothing", "0.1"], "unrecognized arguments: --label-smoothing"),
        (["aae", "--feature-matching"], "unrecognized arguments: --feature-matching"),
        (["bigan", "--label-smoothing", "1"], "label_smoothing must lie in [0, 1), got 1.0"),
        (["bigan", "--steps", "0"], "argument --steps: must be positive, got 0"),
        (["factor-vae", "--batch-size", "2"], "needs a batch of >= 4"),
    ],
)
def test_bad_options_say_what_is_wrong(argv, message, mnist_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        main(["train", *argv, "--data-dir", str(mnist_dir), "--out", str(tmp_path / "run"), "--no-progress"])
    assert message in str(error.value.code) + capsys.readouterr().err


def test_disentangle_command_prints_both_metrics_and_reuses_finished_runs(tmp_path, capsys):
    argv = [
        "--budget",
        "1",
        "--steps",
        "1",
        "--train-points",
        "10",
        "--eval-points",
        "5",
        "--pairs",
        "2",
        "--vote-batch",
        "4",
        "--variance-points",
        "32",
        "--reconstruction-points",
        "8",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    results = disentangle.main(argv)
    printed = capsys.readouterr().out
    assert "| beta-VAE, beta = 4 | 1 |" in printed and "- larger beta raises the beta-VAE metric: " in printed
    assert set(results) == {"beta-vae-1", "beta-vae-large", "factor-vae"}
    for result in results.values():
        assert 0 <= result["beta_vae_metric"] <= 1 and 0 <= result["factor_vae_metric"] <= 1
    again = disentangle.main(argv)  # nothing retrained: the finished runs' scores are read back
    assert again == json.loads(json.dumps(results))
    with pytest.raises(SystemExit):
        disentangle.parse_args(["--pairs", "1"])
