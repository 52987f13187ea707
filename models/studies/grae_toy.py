"""Does the mean-field family break the rotation symmetry of a VAE? The toy of Kumar & Poole (2020).

Data: x = ν(W z) + ε, z ~ N(0, I_d), ε ~ N(0, 0.05² I_D), with W [D, d] of orthogonal columns of
distinct norms (``--w gaussian``: i.i.d. entries instead). A VAE with decoder ν(A z) + b and encoder
q(z|x) = N(C x + c, Σ), Σ one matrix for all x, is trained on it twice per seed: once with a
diagonal (mean-field) Σ and once with a full Σ = L Lᵀ. A rotation z -> R z, A -> A Rᵀ leaves the
full-covariance ELBO unchanged, so only the mean-field family can single out W's axes.

Printed per family and seed:

- the alignment of A with W: the mean |cosine| between matched columns, best over permutations
  (and, through the absolute value, signs) of A's columns; 1 is W up to permutation, sign and scale;
- the learnt Σ against the optimal one, Σ* = (I + E_x[JᵀJ] / σ²)⁻¹ with J the decoder Jacobian at
  the encoder mean (−H = I/σ² for the Gaussian likelihood, β = 1), JᵀJ from vaekernels.jacobian_gram
  (for the mean-field family the optimum within the family: 1 / diag(I + E_x[JᵀJ] / σ²)).

A box plot of the alignments goes to ``<out>/alignment.png``, the numbers to ``<out>/metrics.json``.

Usage (about 2 CPU minutes; 10 minutes of wall time on a busy 2-core machine)::

    nice -n 10 python -m models study grae-toy --seeds 4 --out runs/grae_toy
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from tqdm.auto import tqdm

import vaekernels
from models.training.trainer import Optimizers, holds_run, train_steps

NONLINEARITIES = {"tanh": nn.Tanh, "softplus": nn.Softplus, "leaky_relu": lambda: nn.LeakyReLU(0.2)}
FAMILIES = ("mean-field", "full")


def true_weights(outputs: int, latent: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(outputs, latent, generator=generator) / math.sqrt(latent)
    basis = torch.linalg.qr(torch.randn(outputs, latent, generator=generator))[0]
    return basis * torch.linspace(2.0, 1.0, latent)  # distinct norms: no rotation among equal columns


def make_data(args, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    weights = true_weights(args.outputs, args.latent, args.w, generator)
    z = torch.randn(args.samples, args.latent, generator=generator)
    x = NONLINEARITIES[args.nu]()(z @ weights.t()) + args.noise * torch.randn(
        args.samples, args.outputs, generator=generator
    )
    return x, weights


class ToyVAE(nn.Module):
    """Decoder ν(A z) + b, encoder N(C x + c, Σ) with one Σ for every x: diagonal or full."""

    def __init__(self, outputs: int, latent: int, nu: str, family: str):
        super().__init__()
        self.decoder = nn.Sequential(nn.Linear(latent, outputs, bias=False), NONLINEARITIES[nu]())
        self.bias = nn.Parameter(torch.zeros(outputs))
        self.encoder = nn.Linear(outputs, latent)
        self.family = family
        # Σ = L Lᵀ; the mean-field family keeps only L's diagonal (log of it, so it stays positive).
        self.log_diag = nn.Parameter(torch.full((latent,), -2.0))
        self.lower = nn.Parameter(torch.zeros(latent, latent)) if family == "full" else None

    def scale_tril(self) -> torch.Tensor:
        tril = torch.diag(self.log_diag.exp())
        if self.lower is not None:
            tril = tril + torch.tril(self.lower, -1)
        return tril

    def covariance(self) -> torch.Tensor:
        tril = self.scale_tril()
        return tril @ tril.t()

    def negative_elbo(self, x: torch.Tensor, noise: float) -> torch.Tensor:
        mean, tril = self.encoder(x), self.scale_tril()
        z = mean + torch.randn_like(mean) @ tril.t()
        reconstruction = (x - self.decoder(z) - self.bias).square().sum(-1) / (2 * noise**2)
        kl = 0.5 * ((tril.square().sum() + mean.square().sum(-1)) - mean.shape[-1]) - self.log_diag.sum()
        return (reconstruction + kl).mean()


def alignment(learnt: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean |cos| of matched columns of learnt and truth [D, d], best over column permutations."""
    cosine = (nn.functional.normalize(learnt, dim=0).t() @ nn.functional.normalize(truth, dim=0)).abs()
    rows, cols = linear_sum_assignment(cosine.numpy(), maximize=True)
    return cosine[rows, cols].mean().item()


def optimal_covariance(model: ToyVAE, x: torch.Tensor, noise: float) -> torch.Tensor:
    """Σ* = (I + E_x[JᵀJ] / σ²)⁻¹, J the decoder Jacobian at the encoder mean; within the
    mean-field family the diagonal 1 / diag(I + E_x[JᵀJ] / σ²)."""
    with torch.no_grad():
        gram = vaekernels.jacobian_gram(model.decoder, model.encoder(x)).mean(0)
        precision = torch.eye(gram.shape[0]) + gram / noise**2
    if model.family == "mean-field":
        return torch.diag(1 / precision.diagonal())
    return torch.linalg.inv(precision)


def train(args, family: str, seed: int, x: torch.Tensor, progress: tqdm) -> ToyVAE:
    """A ToyVAE of ``family`` trained on ``x`` for ``args.steps`` Adam steps, one batch after the other;
    ``progress`` advances a step each."""
    torch.manual_seed(seed)
    model = ToyVAE(args.outputs, args.latent, args.nu, family)
    optimizers = Optimizers({"model": list(model.parameters())}, args.lr, betas=(0.9, 0.999))
    batches = x.split(args.batch_size)

    def update(step: int) -> dict:
        return {"loss": optimizers.step("model", model.negative_elbo(batches[step % len(batches)], args.noise))}

    train_steps(update, args.steps, bar=progress)
    return model


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m models study grae-toy", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/grae_toy"))
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--latent", type=int, default=3, help="d")
    parser.add_argument("--outputs", type=int, default=10, help="D")
    parser.add_argument("--nu", choices=sorted(NONLINEARITIES), default="tanh")
    parser.add_argument(
        "--w",
        choices=("orthogonal", "gaussian"),
        default="orthogonal",
        help="W's columns: orthogonal with distinct norms 2..1, or i.i.d. N(0, 1/d) entries",
    )
    parser.add_argument("--noise", type=float, default=0.05, help="σ of ε")
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if holds_run(args.out):
        parser.error(f"{args.out} already holds a run; choose another --out")
    return args


def main(argv=None) -> dict:
    args = _parse_args(argv)
    # Matrices of a few dozen entries: more threads only add hand-off time.
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {family: [] for family in FAMILIES}
    progress = tqdm(total=args.seeds * len(FAMILIES) * args.steps, disable=args.no_progress, desc="training")
    for seed in range(args.seeds):
        x, weights = make_data(args, torch.Generator().manual_seed(1000 + seed))
        for family in FAMILIES:
            model = train(args, family, seed, x, progress)
            learnt, optimal = model.covariance().detach(), optimal_covariance(model, x, args.noise)
            results[family].append(
                {
                    "seed": seed,
                    "alignment": alignment(model.decoder[0].weight.detach(), weights),
                    "covariance_rel_error": ((learnt - optimal).norm() / optimal.norm()).item(),
                    "negative_elbo": model.negative_elbo(x, args.noise).item(),
                }
            )
    progress.close()
    print(
        f"x = {args.nu}(W z) + ε, d = {args.latent}, D = {args.outputs}, W {args.w}, σ = {args.noise}; "
        f"{args.steps} Adam steps per run"
    )
    print("family      seed  alignment(A, W)  |Σ - Σ*| / |Σ*|  -ELBO")
    for family, runs in results.items():
        for run in runs:
            print(
                f"{family:<11} {run['seed']:>4}  {run['alignment']:>15.3f}  {run['covariance_rel_error']:>15.3f}  "
                f"{run['negative_elbo']:>6.2f}"
            )
    summary = {family: sum(r["alignment"] for r in runs) / len(runs) for family, runs in results.items()}
    print("mean alignment: " + ", ".join(f"{family} {value:.3f}" for family, value in summary.items()))
    _plot(results, args.out / "alignment.png")
    (args.out / "metrics.json").write_text(
        json.dumps(
            {"settings": {k: str(v) for k, v in vars(args).items()}, "runs": results, "mean_alignment": summary},
            indent=2,
        )
        + "\n"
    )
    return results


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(4.5, 3.5))
    for i, runs in enumerate(results.values()):
        values = [r["alignment"] for r in runs]
        axes.scatter([i] * len(values), values, alpha=0.7)
        axes.hlines(sum(values) / len(values), i - 0.2, i + 0.2, color="black")
    axes.set_xticks(range(len(results)), list(results))
    axes.set_ylabel("alignment of A with W\n(mean |cos|, best permutation)")
    axes.set_ylim(0, 1.05)
    axes.set_title("VAE posterior family vs identifiability")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
