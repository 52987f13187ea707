"""A procedural shapes dataset with known generative factors, in the spirit of dSprites.

Five factors, each on a grid: shape (square, ellipse, heart), scale (6 values in [0.5, 1]),
orientation (40 angles in [0, 2 pi)), x and y position (32 values each in [0.2, 0.8] of the
canvas), rendered as 64x64 binary images. Every image is a function of its factors alone, drawn
by one vectorised pass over a batch of factor rows (a pixel is on when its centre, mapped into
the shape's own frame, satisfies the shape's implicit inequality), so the full grid of 737,280
images or any subset is built on the fly; draws are deterministic under a seed.

Example::

    >>> shapes = Shapes()
    >>> len(shapes), shapes.sizes
    (737280, (3, 6, 40, 32, 32))
    >>> images, factors = shapes.sample(4, torch.Generator().manual_seed(0))
    >>> images.shape, images.dtype, factors.shape
    (torch.Size([4, 64, 64]), torch.uint8, torch.Size([4, 5]))
    >>> torch.equal(shapes.render(factors), images)  # the factors reproduce the image
    True
    >>> shapes.values(torch.tensor([[2, 5, 0, 0, 31]]))  # heart, scale 1, angle 0, x 0.2, y 0.8
    tensor([[2.0000, 1.0000, 0.0000, 0.2000, 0.8000]])
"""

from __future__ import annotations

import math

import torch

FACTORS = ("shape", "scale", "orientation", "x", "y")
SHAPE_NAMES = ("square", "ellipse", "heart")
HALF_EXTENT = 0.2  # of the canvas, at scale 1: a shape stays well inside the positions' margin
POSITION_RANGE = (0.2, 0.8)


def _fail(fn: str, message: str, error: type = ValueError):
    raise error(f"models.data.shapes.{fn}: {message}")


class Shapes:
    """The factor grid and its renderer; ``scales``, ``orientations``, ``positions`` set the grid's sizes.

    >>> Shapes(scales=2, orientations=4, positions=3, size=32).sizes
    (3, 2, 4, 3, 3)
    """

    def __init__(self, scales: int = 6, orientations: int = 40, positions: int = 32, size: int = 64):
        for name, value, least in (
            ("scales", scales, 1),
            ("orientations", orientations, 1),
            ("positions", positions, 1),
            ("size", size, 8),
        ):
            if not isinstance(value, int) or value < least:
                _fail("Shapes", f"{name} must be an integer >= {least}, got {value!r}")
        self.size = size
        self.sizes = (len(SHAPE_NAMES), scales, orientations, positions, positions)
        low, high = POSITION_RANGE
        self.grids = (
            torch.arange(len(SHAPE_NAMES), dtype=torch.float32),
            torch.linspace(0.5, 1.0, scales) if scales > 1 else torch.ones(1),
            torch.arange(orientations, dtype=torch.float32) * (2 * math.pi / orientations),
            torch.linspace(low, high, positions) if positions > 1 else torch.full((1,), 0.5),
            torch.linspace(low, high, positions) if positions > 1 else torch.full((1,), 0.5),
        )
        centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        self._rows, self._columns = torch.meshgrid(centres, centres, indexing="ij")

    def __len__(self) -> int:
        return math.prod(self.sizes)

    def check_factors(self, fn: str, factors) -> torch.Tensor:
        """``factors`` as an int64 [N, 5] tensor of grid indices, or an error saying what is wrong."""
        if (
            not isinstance(factors, torch.Tensor)
            or factors.is_floating_point()
            or factors.dim() != 2
            or factors.shape[1] != len(FACTORS)
        ):
            got = (
                f"{factors.dtype} tensor of shape {list(factors.shape)}"
                if isinstance(factors, torch.Tensor)
                else type(factors).__name__
            )
            _fail(
                fn,
                f"factors must be an integer tensor [N, {len(FACTORS)}] of indices {FACTORS}, got {got}",
                TypeError if not isinstance(factors, torch.Tensor) else ValueError,
            )
        factors = factors.long()
        limits = torch.tensor(self.sizes)
        bad = (factors < 0) | (factors >= limits)
        if bad.any():
            row, column = (int(i) for i in bad.nonzero()[0])
            _fail(
                fn,
                f"factors[{row}, {column}] ({FACTORS[column]}) must lie in [0, {self.sizes[column]}), "
                f"got {int(factors[row, column])}",
            )
        return factors

    def values(self, factors: torch.Tensor) -> torch.Tensor:
        """The factors' values [N, 5] (shape index, scale, angle in radians, x, y in canvas units)."""
        factors = self.check_factors("values", factors)
        return torch.stack([grid[factors[:, j]] for j, grid in enumerate(self.grids)], 1)

    def index_to_factors(self, index: torch.Tensor) -> torch.Tensor:
        """Grid indices [N, 5] of the flat indices [N] (row-major over :data:`FACTORS`).

        >>> Shapes().index_to_factors(torch.tensor([0, 737279]))
        tensor([[ 0,  0,  0,  0,  0],
                [ 2,  5, 39, 31, 31]])
        """
        index = torch.as_tensor(index).long()
        if index.dim() != 1 or ((index < 0) | (index >= len(self))).any():
            _fail("index_to_factors", f"index must be a 1-d tensor of values in [0, {len(self)}), got {index}")
        columns = []
        for size in reversed(self.sizes):
            columns.append(index % size)
            index = index // size
        return torch.stack(columns[::-1], 1)

    def sample_factors(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n factor rows [n, 5], each factor uniform on its grid."""
        if not isinstance(n, int) or n < 1:
            _fail("sample_factors", f"n must be a positive integer, got {n!r}")
        uniform = torch.rand((n, len(FACTORS)), generator=generator)
        return (uniform * torch.tensor(self.sizes)).long()

    def sample(self, n: int, generator: torch.Generator | None = None):
        """(images [n, size, size] uint8 in {0, 1}, factors [n, 5]) for n uniform draws of the factors."""
        factors = self.sample_factors(n, generator)
        return self.render(factors), factors

    def __getitem__(self, index):
        """(images, factors) of flat grid indices: ``shapes[torch.arange(len(shapes))]`` is the full grid."""
        factors = self.index_to_factors(torch.as_tensor(index).reshape(-1))
        return self.render(factors), factors

    def render(self, factors: torch.Tensor) -> torch.Tensor:
        """The images [N, size, size] (uint8, 0 or 1) of factor rows [N, 5]."""
        factors = self.check_factors("render", factors)
        values = self.values(factors)
        image = torch.empty((len(factors), self.size, self.size), dtype=torch.uint8)
        for kind, inside in enumerate((_square, _ellipse, _heart)):
            rows = (factors[:, 0] == kind).nonzero().squeeze(1)  # each shape's test only on its own images
            if len(rows):
                image[rows] = inside(*self._frame(values[rows])).to(torch.uint8)
        return image

    def _frame(self, values: torch.Tensor):
        """Pixel centres (u, v) [N, size, size] in each shape's frame: translated, rotated by -angle and scaled
        to the unit box, v pointing up (rows grow downwards)."""
        _, scale, angle, x, y = (v[:, None, None] for v in values.unbind(1))
        du, dv = self._columns - x, y - self._rows
        cos, sin = torch.cos(angle), torch.sin(angle)
        extent = scale * HALF_EXTENT
        return (cos * du + sin * dv) / extent, (cos * dv - sin * du) / extent


def _square(u, v):
    return (u.abs() <= 0.8) & (v.abs() <= 0.8)


def _ellipse(u, v):
    return u.square() + (2 * v).square() <= 1  # semi-axes 1 and 0.5: its orientation shows


def _heart(u, v):
    u, v = u * 1.14, v * 1.14 + 0.125  # the curve spans [-1.14, 1.14] x [-1, 1.25]: fit it and centre it
    return (u.square() + v.square() - 1).pow(3) <= u.square() * v.pow(3)


class ShapesBatches:
    """An endless stream of shapes as training batches (x [B, size * size] in {0, 1}, no labels), batch t a
    function of (seed, t) alone, as :class:`models.data.Batches` (``steps_per_epoch`` None: there are no epochs).

    >>> batches = ShapesBatches(Shapes(size=16), 4, seed=0)
    >>> batches.batch(3)[0].shape, torch.equal(batches.batch(3)[0], batches.batch(3)[0])
    (torch.Size([4, 256]), True)
    """

    steps_per_epoch = None

    def __init__(self, shapes: Shapes, batch_size: int, seed: int):
        self.shapes, self.batch_size, self.seed = shapes, batch_size, seed
        self.image_shape = (shapes.size, shapes.size)

    def batch(self, step: int):
        images, _ = self.shapes.sample(self.batch_size, torch.Generator().manual_seed(self.seed * 1_000_003 + step))
        return images.flatten(1).float(), None

    def test(self, count: int | None = None):
        # seed - 1: a seed no training batch is drawn with.
        images, _ = self.shapes.sample(count or 1000, torch.Generator().manual_seed(self.seed - 1))
        return images.flatten(1).float(), None
