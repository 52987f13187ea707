"""Data the model tests write themselves: MNIST-shaped IDX files and binary data with structure to learn."""

import gzip
import struct
from pathlib import Path

import torch

from models import data


def synthetic_binary(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Noisy copies of four random binary prototypes: structure a few training steps can pick up."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.bernoulli(torch.full((4, dim), 0.5), generator=generator)
    x = prototypes[torch.randint(0, 4, (n,), generator=generator)]
    flips = torch.bernoulli(torch.full_like(x, 0.05), generator=generator)
    return (x + flips) % 2


def write_idx(path: Path, array: torch.Tensor, magic: int) -> None:
    header = struct.pack(">I", magic) + struct.pack(f">{array.dim()}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


def write_fake_mnist(root: Path, train: int, test: int) -> None:
    """MNIST-shaped IDX files of random intensities under root/mnist."""
    (root / "mnist").mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("test", test)):
        image_name, label_name = data.MNIST_FILES[split]
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator)
        write_idx(root / "mnist" / image_name, images, data.IDX_IMAGES_MAGIC)
        write_idx(root / "mnist" / label_name, torch.arange(n, dtype=torch.uint8) % 10, data.IDX_LABELS_MAGIC)
