"""IWAE and VAE of Burda, Grosse & Salakhutdinov (2016) on dynamically binarised MNIST.

One stochastic layer as in the paper: encoder 784-200-200-(2x50) and decoder 50-200-200-784 with
tanh, a diagonal Gaussian q(z|x), the prior N(0, I) and a Bernoulli p(x|z). The bound, the
log-densities and the test NLL all come from vaekernels; K=1 is the VAE (the ELBO).

Train, then evaluate the test NLL (5000 importance samples) and the active units::

    python -m models.iwae --data-dir ../shared/data --epochs 10 --k 50 --estimator iwae \\
        --batch-size 100 --out runs/iwae

The paper's numbers (``BURDA_MNIST_IWAE``) come after 3280 epochs of its learning-rate schedule,
``--schedule burda --epochs 3280 --batch-size 20``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import vaekernels
from ._cli import add_resume_arg, check_run_dir, json_settings, load_training_state, save_training_state, write_json
from .data import default_data_dir, dynamic_binarize, load_mnist

ESTIMATORS = ("iwae", "dreg", "stl")
# Burda et al., Table 1, MNIST, one stochastic layer, IWAE column: k -> (test NLL, active units).
BURDA_MNIST_IWAE = {1: (86.76, 19), 5: (85.54, 22), 50: (84.78, 25)}
ACTIVE_UNIT_THRESHOLD = 1e-2  # Burda's criterion: unit u is active when Cov_x(E_q[z_u]) > 1e-2


class IWAE(nn.Module):
    """Gaussian-encoder, Bernoulli-decoder MLP; ``bound(x, k)`` is the k-sample importance-weighted bound.

    >>> model = IWAE()
    >>> x = torch.bernoulli(torch.full((8, 784), 0.3))
    >>> model.bound(x, k=5, estimator="dreg").shape
    torch.Size([8])
    """

    def __init__(self, data_dim: int = 784, hidden_dim: int = 200, latent_dim: int = 50):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(
            nn.Linear(data_dim, hidden_dim),
            nn.Tanh(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.Tanh(),
            nn.Linear(hidden_dim, 2 * latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.Tanh(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.Tanh(),
            nn.Linear(hidden_dim, data_dim),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, D] -> (mean, log_var) of q(z|x), each [B, d]."""
        mean, log_var = self.encoder(x).chunk(2, dim=-1)
        return mean, log_var

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, K, d] -> Bernoulli logits [B, K, D]."""
        return self.decoder(z)

    def bound(
        self, x: torch.Tensor, k: int, estimator: str = "iwae", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Per-example k-sample bound [B]; its gradient is the one of ``estimator`` (iwae, dreg or stl)."""
        mean, log_var = self.encode(x)
        noise = torch.randn(
            (x.shape[0], k, self.latent_dim), generator=generator, device=x.device, dtype=x.dtype
        )
        z = mean.unsqueeze(1) + noise * torch.exp(0.5 * log_var).unsqueeze(1)
        standard = z.new_zeros(self.latent_dim)
        log_pz = vaekernels.gaussian_log_prob(z, standard, standard)
        return vaekernels.iwae_bound(
            self.decode(z), x, log_pz, None, z=z, q=(mean, log_var), estimator=estimator
        )


class BinarizedBatches:
    """Shuffled minibatches of ``images`` (uint8 [N, D]), freshly binarised on every pass.

    >>> images = torch.randint(0, 256, (10, 784), dtype=torch.uint8)
    >>> [x.shape[0] for x in BinarizedBatches(images, batch_size=4, generator=torch.Generator())]
    [4, 4, 2]
    """

    def __init__(self, images: torch.Tensor, batch_size: int, generator: torch.Generator, device="cpu"):
        self.images, self.batch_size, self.generator, self.device = images, batch_size, generator, device

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.images), generator=self.generator)
        for indices in order.split(self.batch_size):
            yield dynamic_binarize(self.images[indices], self.generator).to(self.device)


def train_epoch(
    model: IWAE,
    optimizer: torch.optim.Optimizer,
    batches,
    *,
    k: int,
    estimator: str = "iwae",
    generator: torch.Generator | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[float]:
    """One pass of Adam steps on -mean(bound) over ``batches`` (binary float [B, D]); the loss of each step.

    >>> model = IWAE(data_dim=16, hidden_dim=8, latent_dim=2)
    >>> batches = [torch.bernoulli(torch.full((4, 16), 0.5)) for _ in range(3)]
    >>> len(train_epoch(model, torch.optim.Adam(model.parameters()), batches, k=2, progress=False))
    3
    """
    model.train()
    losses = []
    bar = tqdm(batches, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True)
    for x in bar:
        loss = -model.bound(x, k, estimator, generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.2f}", refresh=False)
    return losses


@torch.no_grad()
def evaluate(
    model: IWAE,
    x: torch.Tensor,
    *,
    k: int,
    num_samples: int = 5000,
    batch_size: int = 500,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> dict:
    """Test NLL (``num_samples`` importance samples), the k-sample bound and the active units on binary ``x``.

    Returns mean values in nats per example.

    >>> model = IWAE(data_dim=16, hidden_dim=8, latent_dim=2)
    >>> sorted(evaluate(model, torch.ones(3, 16), k=2, num_samples=10, progress=False))
    ['active_units', 'bound', 'k', 'latent_variances', 'nll', 'num_samples', 'size']
    """
    model.eval()
    nll, bound, means = [], [], []
    for batch in tqdm(x.split(batch_size), desc="test NLL", unit="batch", disable=not progress, dynamic_ncols=True):
        means.append(model.encode(batch)[0])
        bound.append(model.bound(batch, k, "iwae", generator))
        nll.append(
            vaekernels.importance_sampled_nll(
                batch, model.encode, model.decode, num_samples=num_samples, progress=progress, generator=generator
            )
        )
    latent_variances = torch.cat(means).var(dim=0)
    return {
        "nll": torch.cat(nll).mean().item(),
        "bound": torch.cat(bound).mean().item(),
        "k": k,
        "num_samples": num_samples,
        "size": len(x),
        "active_units": int((latent_variances > ACTIVE_UNIT_THRESHOLD).sum()),
        "latent_variances": latent_variances.tolist(),
    }


def burda_learning_rate(epoch: int) -> float:
    """Burda et al.'s schedule: 1e-3 * 10^(-i/7) during the 3^i epochs of stage i = 0..7 (3280 in all).

    >>> [round(burda_learning_rate(e) * 1e4, 3) for e in (0, 1, 3, 4, 3279)]
    [10.0, 7.197, 7.197, 5.179, 1.0]
    """
    stage, stage_end = 0, 1
    while epoch >= stage_end and stage < 7:
        stage += 1
        stage_end += 3**stage
    return 1e-3 * 10 ** (-stage / 7)


def reconstruction_rows(x: torch.Tensor, reconstruction: torch.Tensor, columns: int = 10) -> torch.Tensor:
    """Rows of ``columns`` images, each followed by the row of their reconstructions (for a PNG grid).

    >>> reconstruction_rows(torch.zeros(20, 4), torch.ones(20, 4))[:, 0].tolist()[::10]
    [0.0, 1.0, 0.0, 1.0]
    """
    rows = len(x) // columns
    pairs = torch.stack([x[: rows * columns].reshape(rows, columns, -1),
                         reconstruction[: rows * columns].reshape(rows, columns, -1)], 1)
    return pairs.reshape(-1, x.shape[-1])


def save_grid(path: Path, images: torch.Tensor, columns: int, shape=(28, 28)) -> None:
    """Write images (values in [0, 1], [N, prod(shape)]) as one PNG grid, tiles framed in grey."""
    import matplotlib.image  # writing PNGs is the only use of matplotlib

    rows = math.ceil(len(images) / columns)
    tiles = images.detach().float().cpu().reshape(-1, *shape)
    tiles = torch.cat([tiles, tiles.new_zeros(rows * columns - len(tiles), *shape)])
    tiles = nn.functional.pad(tiles, (1, 1, 1, 1), value=0.5)
    height, width = tiles.shape[1:]
    grid = tiles.reshape(rows, columns, height, width).permute(0, 2, 1, 3).reshape(rows * height, columns * width)
    matplotlib.image.imsave(path, grid.numpy(), cmap="gray", vmin=0.0, vmax=1.0)


@torch.no_grad()
def save_pictures(model: IWAE, x_test: torch.Tensor, out: Path, generator: torch.Generator) -> None:
    """reconstructions.png: rows of test digits, each followed by its reconstruction; samples.png: the prior's."""
    model.eval()
    columns = 10
    x = x_test[: 5 * columns]
    reconstruction = torch.sigmoid(model.decode(model.encode(x)[0]))
    blank = -len(x) % columns  # a short test set leaves the last row part empty
    x, reconstruction = (nn.functional.pad(t, (0, 0, 0, blank)) for t in (x, reconstruction))
    pairs = torch.stack([x.reshape(-1, columns, x.shape[-1]), reconstruction.reshape(-1, columns, x.shape[-1])], 1)
    save_grid(out / "reconstructions.png", pairs.reshape(-1, x.shape[-1]), columns)
    z = torch.randn((columns * columns, model.latent_dim), generator=generator, device=x.device)
    save_grid(out / "samples.png", torch.sigmoid(model.decode(z)), columns)


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m models.iwae", description="Train an IWAE/VAE on dynamically binarised MNIST with vaekernels."
    )
    parser.add_argument("--data-dir", type=Path, help="holds mnist/*.gz (default: $VAEKERNELS_DATA or ../shared/data)")
    parser.add_argument("--out", type=Path, default=Path("runs/iwae"), help="run directory (default: runs/iwae)")
    add_resume_arg(parser)
    parser.add_argument("--epochs", type=int, default=10, help="total epochs, counting resumed ones")
    parser.add_argument("--k", type=int, default=50, help="importance samples per example; 1 gives the VAE")
    parser.add_argument("--estimator", choices=ESTIMATORS, default="iwae", help="gradient estimator")
    parser.add_argument("--batch-size", type=int, default=20, help="Burda et al. used 20")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate for --schedule constant")
    parser.add_argument("--schedule", choices=("constant", "burda"), default="constant")
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--hidden-dim", type=int, default=200)
    parser.add_argument("--limit-train", type=int, metavar="N", help="train on the first N training images")
    parser.add_argument("--limit-test", type=int, metavar="N", help="evaluate on the first N test images")
    parser.add_argument("--eval-samples", type=int, default=5000, help="importance samples for the test NLL")
    parser.add_argument("--eval-batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--verify-md5", action="store_true", help="check the MNIST files' MD5 sums first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    check_run_dir(parser, args.out, args.resume)
    return args


def main(argv=None) -> dict:
    """The CLI; returns the metrics it writes to ``<out>/metrics.json``."""
    args = _parse_args(argv)
    device = torch.device(args.device)
    data_dir = args.data_dir or default_data_dir()
    train_images = load_mnist("train", data_dir, verify_md5=args.verify_md5)[0].flatten(1)[: args.limit_train]
    test_images = load_mnist("test", data_dir, verify_md5=args.verify_md5)[0].flatten(1)[: args.limit_test]
    # The test set is binarised once, with its own seed, so every evaluation sees the same digits.
    x_test = dynamic_binarize(test_images, torch.Generator().manual_seed(args.seed + 1)).to(device)

    torch.manual_seed(args.seed)
    model = IWAE(train_images.shape[1], args.hidden_dim, args.latent_dim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, eps=1e-4)  # eps as in Burda et al.
    data_generator = torch.Generator().manual_seed(args.seed)
    noise_generator = torch.Generator(device).manual_seed(args.seed)
    generators = {"data_generator": data_generator, "noise_generator": noise_generator}
    checkpoint_path = args.out / "checkpoint.pt"
    history = load_training_state(checkpoint_path, device, model, optimizer, generators) if args.resume else []
    args.out.mkdir(parents=True, exist_ok=True)
    settings = json_settings(args)
    metrics = {"settings": settings, "history": history}

    batches = BinarizedBatches(train_images, args.batch_size, data_generator, device)
    progress = not args.no_progress
    for epoch in range(len(history), args.epochs):
        lr = burda_learning_rate(epoch) if args.schedule == "burda" else args.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        losses = train_epoch(
            model,
            optimizer,
            batches,
            k=args.k,
            estimator=args.estimator,
            generator=noise_generator,
            progress=progress,
            desc=f"epoch {epoch + 1}/{args.epochs}",
        )
        history.append(
            {"epoch": epoch + 1, "loss": sum(losses) / len(losses), "lr": lr, "seconds": time.perf_counter() - started}
        )
        save_training_state(checkpoint_path, model, optimizer, generators, history, settings)
        save_pictures(model, x_test, args.out, torch.Generator(device).manual_seed(args.seed))
        write_json(args.out / "metrics.json", metrics)

    metrics["test"] = evaluate(
        model,
        x_test,
        k=args.k,
        num_samples=args.eval_samples,
        batch_size=args.eval_batch_size,
        generator=torch.Generator(device).manual_seed(args.seed + 2),
        progress=progress,
    )
    if args.estimator == "iwae" and args.k in BURDA_MNIST_IWAE:
        nll, active_units = BURDA_MNIST_IWAE[args.k]
        metrics["burda2016"] = {"nll": nll, "active_units": active_units, "after": "3280 epochs, --schedule burda"}
    write_json(args.out / "metrics.json", metrics)
    test = metrics["test"]
    print(
        f"test NLL {test['nll']:.2f} nats ({test['num_samples']} samples, {test['size']} digits), "
        f"{test['k']}-sample bound {test['bound']:.2f}, active units {test['active_units']}/{args.latent_dim}; "
        f"written to {args.out}"
    )
    return metrics


if __name__ == "__main__":
    try:
        main()
    except FileNotFoundError as error:  # missing data: the message says what to place where
        raise SystemExit(f"python -m models.iwae: {error}") from None
