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
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import vaekernels
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
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
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
    if args.resume and not (args.out / "checkpoint.pt").is_file():
        parser.error(f"--resume: {args.out / 'checkpoint.pt'} does not exist")
    if not args.resume and args.out.is_dir() and any(args.out.iterdir()):
        parser.error(f"{args.out} already holds a run; pass --resume to continue it or choose another --out")
    return args


def _write_json(path: Path, value: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temporary, path)  # a run killed mid-write keeps the previous file


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
    history = []
    checkpoint_path = args.out / "checkpoint.pt"
    if args.resume:
        checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        generator.set_state(checkpoint["generator"])
        history = checkpoint["history"]
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
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
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(), "history": history, "settings": settings},
                   checkpoint_path.with_name("checkpoint.pt.tmp"))
        os.replace(checkpoint_path.with_name("checkpoint.pt.tmp"), checkpoint_path)
        _write_json(args.out / "metrics.json", metrics)
        if time.perf_counter() > deadline:
            break

    metrics["test_nll_nats"] = evaluate(model, x_test, y_test, args.levels, args.eval_batch_size, progress)
    labels = torch.arange(CLASSES, device=device).repeat(args.sample_rows)
    started = time.perf_counter()
    samples = model.sample(len(labels), (28, 28), labels, generator=torch.Generator().manual_seed(args.seed))
    metrics["sampling_seconds"] = time.perf_counter() - started
    save_grid(args.out / "samples.png", samples.flatten(1) / (args.levels - 1), CLASSES)
    _write_json(args.out / "metrics.json", metrics)
    print(f"test NLL: {metrics['test_nll_nats']:.2f} nats per image "
          f"({len(x_test)} test images, {sum(h['batches'] for h in history)} training batches)")
    return metrics


if __name__ == "__main__":
    main()
