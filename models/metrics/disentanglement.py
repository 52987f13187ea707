"""Disentanglement metrics on data with known factors: the beta-VAE metric and the FactorVAE metric.

Both score a representation given as ``represent(factors [N, F]) -> codes [N, d]`` (for a model:
render the factors, encode, take the posterior means; see :func:`encoder_representation`), so a
constructed representation of the factors themselves is scored the same way. Each draws its
factor rows from :class:`models.data.shapes.Shapes` with a generator seeded by ``seed``, so a score is
a function of the representation and the protocol alone. The factor a training or evaluation
point is about cycles through the F factors (point i: factor i mod F), so both sets are balanced
and a representation that carries no information scores exactly 1/F.

Protocols (the defaults; Higgins et al. 2017 and Kim & Mnih 2018 used more points, at GPU cost):

* beta-VAE metric: ``train_points`` = 500 and ``eval_points`` = 300 points, each the mean of
  z_diff = |z_1 - z_2| over ``pairs`` = 32 pairs of posterior means whose factor rows share
  factor y and are otherwise independent; a linear softmax classifier (standardised inputs,
  full-batch L-BFGS, 200 iterations) predicts y; the score is its evaluation accuracy.
* FactorVAE metric: each code dimension's variance over ``variance_points`` = 4096 random
  points (the global variance); dimensions with global variance below ``collapsed`` = 0.05 are
  dropped; a vote fixes factor k at one random value over ``batch_size`` = 64 points, divides
  each code by its global standard deviation and takes the argmin over the kept dimensions of
  the batch's variances; ``train_points`` = 500 votes fit the majority-vote classifier
  (dimension -> its most frequent factor), ``eval_points`` = 300 fresh votes measure its accuracy.

Example::

    >>> from models.data.shapes import Shapes
    >>> shapes = Shapes(scales=3, orientations=4, positions=5, size=16)
    >>> def standardised_factors(f):
    ...     return (f.float() - f.float().mean(0)) / f.float().std(0).clamp(min=1e-6)
    >>> beta_vae_metric(standardised_factors, shapes, train_points=50, eval_points=25, pairs=8)["score"]
    1.0
    >>> factor_vae_metric(standardised_factors, shapes, train_points=50, eval_points=25)["score"]
    1.0
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.data.shapes import Shapes

Representation = Callable[[torch.Tensor], torch.Tensor]


def _fail(fn: str, message: str, error: type = ValueError):
    raise error(f"models.metrics.disentanglement.{fn}: {message}")


def _check_counts(fn: str, **counts) -> None:
    for name, value in counts.items():
        least = 2 if name in ("pairs", "batch_size", "variance_points") else 1  # a variance needs two points
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            _fail(fn, f"{name} must be an integer >= {least}, got {value!r}")


def _represent(fn: str, represent: Representation, factors: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    codes = torch.cat([represent(part) for part in factors.split(chunk)])
    if codes.dim() != 2 or codes.shape[0] != len(factors) or not codes.is_floating_point():
        _fail(
            fn,
            f"represent must map factors [N, F] to float codes [N, d]; for N = {len(factors)} it returned "
            f"{codes.dtype} {list(codes.shape)}",
        )
    return codes.float()


def _fixed_factor_rows(shapes: Shapes, factor: torch.Tensor, group: int, generator) -> torch.Tensor:
    """Factor rows [len(factor), group, F], independent uniform draws but for factor[i], which is one value
    shared across row i's group."""
    rows = shapes.sample_factors(len(factor) * group, generator).reshape(len(factor), group, -1)
    shared = shapes.sample_factors(len(factor), generator).gather(1, factor[:, None])
    rows.scatter_(2, factor[:, None, None].expand(-1, group, 1), shared[:, None, :].expand(-1, group, 1))
    return rows


def linear_classifier_accuracy(train_x, train_y, eval_x, eval_y, classes: int, iterations: int = 200) -> tuple:
    """(train accuracy, evaluation accuracy) of a multinomial logistic regression, the beta-VAE metric's
    low-capacity classifier: inputs standardised on the training set, weights from zero, full-batch
    L-BFGS, so the result is deterministic.

    >>> x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    >>> linear_classifier_accuracy(x, torch.tensor([0, 0, 1, 1]), x, torch.tensor([0, 0, 1, 1]), 2)
    (1.0, 1.0)
    """
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-8)
    train_x, eval_x = (train_x - mean) / std, (eval_x - mean) / std
    weight = torch.zeros(train_x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(train_x @ weight + bias, train_y)
        loss = loss + 1e-4 * weight.square().sum()  # separable classes would otherwise send the weights off
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return tuple(
            ((x @ weight + bias).argmax(1) == y).sum().item() / len(y)
            for x, y in ((train_x, train_y), (eval_x, eval_y))
        )


@torch.no_grad()
def beta_vae_metric(
    represent: Representation,
    shapes: Shapes,
    *,
    train_points: int = 500,
    eval_points: int = 300,
    pairs: int = 32,
    seed: int = 0,
) -> dict:
    """Higgins et al.'s metric: accuracy of a linear classifier predicting the shared factor y from z_diff.

    Returns ``score`` (evaluation accuracy), ``train_accuracy`` and the protocol's counts.
    """
    fn = "beta_vae_metric"
    _check_counts(fn, train_points=train_points, eval_points=eval_points, pairs=pairs)
    generator = torch.Generator().manual_seed(seed)
    count = len(shapes.sizes)
    points = train_points + eval_points
    factor = torch.arange(points) % count
    first, second = shapes.sample_factors(2 * points * pairs, generator).reshape(2, points, pairs, -1)
    shared = factor[:, None, None].expand(-1, pairs, 1)
    second.scatter_(2, shared, first.gather(2, shared))  # each pair agrees on its point's factor y, and only on it
    codes = _represent(fn, represent, torch.cat([first, second]).flatten(0, 1)).unflatten(0, (2, points, pairs))
    z_diff = (codes[0] - codes[1]).abs().mean(1)
    train, test = slice(0, train_points), slice(train_points, None)
    train_accuracy, score = linear_classifier_accuracy(z_diff[train], factor[train], z_diff[test], factor[test], count)
    return {
        "score": score,
        "train_accuracy": train_accuracy,
        "train_points": train_points,
        "eval_points": eval_points,
        "pairs": pairs,
        "seed": seed,
    }


@torch.no_grad()
def factor_vae_metric(
    represent: Representation,
    shapes: Shapes,
    *,
    train_points: int = 500,
    eval_points: int = 300,
    batch_size: int = 64,
    variance_points: int = 4096,
    collapsed: float = 0.05,
    seed: int = 0,
) -> dict:
    """Kim & Mnih's metric: accuracy of the majority-vote classifier from argmin normalised variance to the
    fixed factor. A representation whose every dimension collapsed scores 0.

    Returns ``score`` (evaluation accuracy), ``train_accuracy``, the kept dimensions and the protocol's counts.
    """
    fn = "factor_vae_metric"
    _check_counts(
        fn, train_points=train_points, eval_points=eval_points, batch_size=batch_size, variance_points=variance_points
    )
    generator = torch.Generator().manual_seed(seed)
    scale = _represent(fn, represent, shapes.sample_factors(variance_points, generator)).var(0)
    kept = (scale >= collapsed).nonzero().squeeze(1)
    count = len(shapes.sizes)
    points = train_points + eval_points
    factor = torch.arange(points) % count
    rows = _fixed_factor_rows(shapes, factor, batch_size, generator)
    codes = _represent(fn, represent, rows.flatten(0, 1)).unflatten(0, (points, batch_size))
    result = {
        "kept_dimensions": kept.tolist(),
        "train_points": train_points,
        "eval_points": eval_points,
        "batch_size": batch_size,
        "variance_points": variance_points,
        "seed": seed,
    }
    if not len(kept):
        return {"score": 0.0, "train_accuracy": 0.0, **result}
    normalised = codes[..., kept] / scale[kept].sqrt()
    dimension = normalised.var(1).argmin(1)
    votes = torch.zeros(len(kept), count, dtype=torch.long)
    votes.index_put_(
        (dimension[:train_points], factor[:train_points]), torch.ones(train_points, dtype=torch.long), accumulate=True
    )
    majority = votes.argmax(1)  # the classifier: each dimension predicts its most frequent factor
    train_accuracy = votes.max(1).values.sum().item() / train_points
    score = (majority[dimension[train_points:]] == factor[train_points:]).sum().item() / eval_points
    return {"score": score, "train_accuracy": train_accuracy, **result}


def encoder_representation(encode: Callable[[torch.Tensor], torch.Tensor], shapes: Shapes) -> Representation:
    """``represent`` for a model: factors -> rendered images [N, size * size] (float) -> ``encode`` (e.g. the
    posterior means).

    >>> shapes = Shapes(size=16)
    >>> represent = encoder_representation(lambda x: x[:, :3], shapes)
    >>> represent(torch.zeros(2, 5, dtype=torch.long)).shape
    torch.Size([2, 3])
    """

    def represent(factors):
        return encode(shapes.render(factors).flatten(1).float())

    return represent
