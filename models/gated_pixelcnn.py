"""Class-conditional Gated PixelCNN (van den Oord et al., 2016) on binarised MNIST.

Built from :class:`vaekernels.nn.GatedPixelCNN`: a 7x7 type-A gated layer, then 3x3 type-B gated
layers (vertical and horizontal stacks, fused gates, the class as a one-hot condition inside the
gate), skip connections into a 1x1 head. ``--levels 2`` (default) models binary pixels with a
Bernoulli per pixel: training images are binarised afresh each epoch (pixel ~ Bernoulli(intensity
/ 255)), the test set once with a fixed seed. ``--levels 256`` models the raw bytes with a 256-way
softmax. Reports the test NLL in nats per image and writes a grid of samples (a column per class),
drawn with the cached sampler::

    python -m models.gated_pixelcnn --data-dir ../shared/data --epochs 1 --out runs/gated_pixelcnn
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import vaekernels
from ._cli import add_resume_arg, check_run_dir, json_settings, load_training_state, save_training_state, write_json
from .data import default_data_dir, dynamic_binarize, load_mnist
from .iwae import save_grid

CLASSES = 10


def _images(images: torch.Tensor, levels: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28] pixel values: binarised, or the bytes themselves."""
    x = dynamic_binarize(images, generator) if levels == 2 else images.float()
    return x.unsqueeze(1)


@torch.no_grad()
def evaluate(model, images, labels, levels: int, batch_size: int, progress: bool) -> float:
    """Mean test NLL in nats per image."""
    model.eval()
    total = 0.0
    for x, y in tqdm(list(zip(images.split(batch_size), labels.split(batch_size))), desc="test NLL", unit="batch",
                     disable=not progress, dynamic_ncols=True):
        total += model.nll(x, y).sum().item()
    model.train()
    return total / len(images)


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m models.gated_pixelcnn",
                                     description="Train a class-conditional Gated PixelCNN on MNIST with vaekernels.")
    parser.add_argument("--data-dir", type=Path, help="holds mnist/*.gz (default: $VAEKERNELS_DATA or ../shared/data)")
    parser.add_argument("--out", type=Path, default=Path("runs/gated_pixelcnn"), help="run directory")
    add_resume_arg(parser)
    parser.add_argument("--epochs", type=int, default=1, help="total epochs, counting resumed ones")
    parser.add_argument("--max-minutes", type=float, help="stop training after this many minutes (then evaluate)")
    parser.add_argument("--levels", type=int, choices=(2, 256), default=2, help="2: binarised (Bernoulli), 256: bytes")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--layers", type=int, default=6, help="gated layers, the first a 7x7 type A")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--limit-train", type=int, metavar="N", help="train on the first N training images")
    parser.add_argument("--limit-test", type=int, metavar="N", help="evaluate on the first N test images")
    parser.add_argument("--eval-batch-size", type=int, default=250)
    parser.add_argument("--sample-rows", type=int, default=10, help="rows of the sample grid, one image per class each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    check_run_dir(parser, args.out, args.resume)
    return args


def main(argv=None) -> dict:
    """The CLI; returns the metrics it writes to ``<out>/metrics.json``."""
    args = _parse_args(argv)
    device = torch.device(args.device)
    data_dir = args.data_dir or default_data_dir()
    train_images, train_labels = (t[: args.limit_train] for t in load_mnist("train", data_dir))
    test_images, test_labels = (t[: args.limit_test] for t in load_mnist("test", data_dir))
    x_test = _images(test_images, args.levels, torch.Generator().manual_seed(args.seed + 1)).to(device)
    y_test = test_labels.long().to(device)

    torch.manual_seed(args.seed)
    model = vaekernels.nn.GatedPixelCNN(1, args.channels, args.layers, levels=args.levels,
                                        num_classes=CLASSES).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    generators = {"generator": generator}
    checkpoint_path = args.out / "checkpoint.pt"
    history = load_training_state(checkpoint_path, device, model, optimizer, generators) if args.resume else []
    args.out.mkdir(parents=True, exist_ok=True)
    settings = json_settings(args)
    metrics = {"settings": settings, "history": history}
    progress = not args.no_progress
    deadline = time.perf_counter() + 60 * args.max_minutes if args.max_minutes else math.inf

    for epoch in range(len(history), args.epochs):
        started, losses = time.perf_counter(), []
        order = torch.randperm(len(train_images), generator=generator)
        x_all = _images(train_images, args.levels, generator)
        bar = tqdm(order.split(args.batch_size), desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
                   disable=not progress, dynamic_ncols=True)
        for index in bar:
            x, y = x_all[index].to(device), train_labels[index].long().to(device)
            loss = model.nll(x, y).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(nll=f"{loss.item():.2f}")
            if time.perf_counter() > deadline:
                break
        history.append({"epoch": epoch + 1, "train_nll": sum(losses) / len(losses), "batches": len(losses),
                        "seconds": time.perf_counter() - started})
        save_training_state(checkpoint_path, model, optimizer, generators, history, settings)
        write_json(args.out / "metrics.json", metrics)
        if time.perf_counter() > deadline:
            break

    metrics["test_nll_nats"] = evaluate(model, x_test, y_test, args.levels, args.eval_batch_size, progress)
    labels = torch.arange(CLASSES, device=device).repeat(args.sample_rows)
    started = time.perf_counter()
    samples = model.sample(len(labels), (28, 28), labels, generator=torch.Generator().manual_seed(args.seed))
    metrics["sampling_seconds"] = time.perf_counter() - started
    save_grid(args.out / "samples.png", samples.flatten(1) / (args.levels - 1), CLASSES)
    write_json(args.out / "metrics.json", metrics)
    print(f"test NLL: {metrics['test_nll_nats']:.2f} nats per image "
          f"({len(x_test)} test images, {sum(h['batches'] for h in history)} training batches)")
    return metrics


if __name__ == "__main__":
    main()
