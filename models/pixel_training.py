"""What the autoregressive MNIST models (PixelCNN++, PixelSNAIL, PixelVAE, VLAE) share: the command
line, the data, a training loop under a CPU-time budget, test evaluation, sample grids,
checkpoints that never overwrite an earlier run, and metrics.json.

A model plugs in with ``loss(x) -> per-image loss in nats [B]`` (the NLL, or the negative ELBO:
an upper bound on it) and ``sample(n, generator, size) -> images in [0, 1], [n, 1, size, size]``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ._cli import check_run_dir, json_settings, write_json
from .data import default_data_dir, dynamic_binarize, load_mnist
from .iwae import save_grid

PIXELS = 28 * 28


def parse_args(prog: str, description: str, argv=None, *, batch_size: int = 32, lr: float = 2e-3,
               minutes: float = 2.0, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--data-dir", type=Path, help="holds mnist/*.gz (default: $VAEKERNELS_DATA or ../shared/data)")
    parser.add_argument("--out", type=Path, default=Path(f"runs/{prog.split('.')[-1]}"),
                        help="run directory; must be new or empty")
    parser.add_argument("--minutes", type=float, default=minutes,
                        help="training budget in CPU minutes of this process (all its threads), so that a "
                             "shared machine does not shrink it")
    parser.add_argument("--epochs", type=int, default=1000, help="at most this many epochs within the budget")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr, help="Adam learning rate")
    parser.add_argument("--limit-train", type=int, metavar="N", help="train on the first N training images")
    parser.add_argument("--limit-test", type=int, default=1000, metavar="N", help="evaluate on the first N test images")
    parser.add_argument("--samples", type=int, default=16, help="images in samples.png")
    parser.add_argument("--sample-size", type=int, default=28, help=argparse.SUPPRESS)  # small canvases for tests
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    check_run_dir(parser, args.out)
    return args


def mnist(args, binarized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test images [N, 1, 28, 28] as uint8 (binarised on the fly later) or, for the
    256-level models, in [-1, 1] on the 256-level grid."""
    data_dir = args.data_dir or default_data_dir()
    train = load_mnist("train", data_dir)[0][: args.limit_train].unsqueeze(1)
    test = load_mnist("test", data_dir)[0][: args.limit_test].unsqueeze(1)
    if binarized:
        # The test digits are binarised once, with their own seed, so every evaluation sees the same.
        return train, dynamic_binarize(test, torch.Generator().manual_seed(args.seed + 1))
    return train.float() / 127.5 - 1, test.float() / 127.5 - 1


@torch.no_grad()
def evaluate(loss: Callable[[torch.Tensor], torch.Tensor], test: torch.Tensor, batch_size: int, device) -> float:
    """Mean per-image loss (nats) over the test images."""
    total = 0.0
    for batch in test.split(batch_size):
        total += loss(batch.to(device)).sum().item()
    return total / len(test)


def train(model: nn.Module, train_images: torch.Tensor, test_images: torch.Tensor, args, *, binarized: bool,
          bits_per_dim: bool, describe: str) -> dict:
    """Adam on the mean per-image loss until ``args.minutes`` of CPU time or ``args.epochs`` run out; then the
    test loss, samples.png, checkpoint.pt and metrics.json in ``args.out``."""
    device = torch.device(args.device)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    budget, started, steps, history = args.minutes * 60, time.process_time(), 0, []
    wall_started = time.perf_counter()
    progress = not args.no_progress
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_images), generator=generator)
        batches = tqdm(order.split(args.batch_size), desc=f"epoch {epoch + 1}", disable=not progress, leave=False)
        model.train()
        for indices in batches:
            x = train_images[indices]
            x = dynamic_binarize(x, generator) if binarized else x
            loss = model.loss(x.to(device)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            history.append(loss.item())
            batches.set_postfix(loss=f"{loss.item():.2f}")
            if time.process_time() - started > budget:
                break
        if time.process_time() - started > budget:
            break
    cpu_seconds, seconds = time.process_time() - started, time.perf_counter() - wall_started
    model.eval()
    test_nats = evaluate(model.loss, test_images, 100, device)
    metrics = {
        "model": describe,
        "settings": json_settings(args),
        "train_steps": steps,
        "train_images_seen": steps * args.batch_size,
        "train_cpu_seconds": cpu_seconds,
        "train_wall_seconds": seconds,
        "final_train_loss_nats": sum(history[-20:]) / max(1, len(history[-20:])),
        "test_images": len(test_images),
        "test_nll_nats": test_nats,
    }
    if bits_per_dim:
        metrics["test_bits_per_dim"] = test_nats / (PIXELS * math.log(2))
    images = model.sample(args.samples, torch.Generator(device).manual_seed(args.seed), args.sample_size)
    save_grid(args.out / "samples.png", images.flatten(1), columns=int(math.ceil(math.sqrt(args.samples))),
              shape=images.shape[-2:])
    torch.save({"model": model.state_dict(), "metrics": metrics}, args.out / "checkpoint.pt")
    write_json(args.out / "metrics.json", metrics)
    return metrics


@torch.no_grad()
def sample_autoregressively(step: Callable[[torch.Tensor, int, int], torch.Tensor], n: int, device,
                            start: float = 0.0, size: int = 28) -> torch.Tensor:
    """Fills an [n, 1, size, size] canvas pixel by pixel in raster order: ``step(canvas, i, j)``
    returns the values of pixel (i, j) for the whole batch (one full forward per pixel)."""
    canvas = torch.full((n, 1, size, size), start, device=device)
    for i in range(size):
        for j in range(size):
            canvas[:, :, i, j] = step(canvas, i, j)
    return canvas
