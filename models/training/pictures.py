"""PNG grids of images, written with matplotlib."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn


def reconstruction_rows(x: torch.Tensor, reconstruction: torch.Tensor, columns: int = 10) -> torch.Tensor:
    """Rows of ``columns`` images, each followed by the row of their reconstructions (for a PNG grid).

    >>> reconstruction_rows(torch.zeros(20, 4), torch.ones(20, 4))[:, 0].tolist()[::10]
    [0.0, 1.0, 0.0, 1.0]
    """
    rows = len(x) // columns
    pairs = torch.stack(
        [x[: rows * columns].reshape(rows, columns, -1), reconstruction[: rows * columns].reshape(rows, columns, -1)], 1
    )
    return pairs.reshape(-1, pairs.shape[-1])


def save_grid(path: Path, images: torch.Tensor, columns: int, shape=(28, 28)) -> None:
    """Write images (values in [0, 1], [N, prod(shape)] or [N, *shape]) as one PNG grid, tiles framed in grey."""
    import matplotlib.image  # writing PNGs is the only use of matplotlib

    rows = math.ceil(len(images) / columns)
    tiles = images.detach().float().cpu().reshape(-1, *shape)
    tiles = torch.cat([tiles, tiles.new_zeros(rows * columns - len(tiles), *shape)])
    tiles = nn.functional.pad(tiles, (1, 1, 1, 1), value=0.5)
    height, width = tiles.shape[1:]
    grid = tiles.reshape(rows, columns, height, width).permute(0, 2, 1, 3).reshape(rows * height, columns * width)
    matplotlib.image.imsave(path, grid.numpy(), cmap="gray", vmin=0.0, vmax=1.0)
