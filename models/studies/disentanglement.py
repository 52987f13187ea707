"""beta-VAE (beta = 1 and a larger beta) and FactorVAE on the shapes dataset, scored by both
disentanglement metrics: ``python -m models study disentanglement --budget 18``.

Trains each of the three models (``python -m models train beta-vae --data shapes --arch conv64`` and
``train factor-vae``: Burgess et al.'s conv64 network, 10 latents, VAE updates on batches of 64, Adam 1e-3,
one thread) for an equal share of ``--budget`` CPU minutes of this process, then scores its posterior means
with the beta-VAE metric and the FactorVAE metric (:mod:`models.metrics.disentanglement`, the protocol stated
there, ``--metric-seed`` fixed) and measures its reconstruction loss (-log p(x|z) in nats per image,
z = E_q[z], on 1000 fixed shapes). Prints one table, the seed's qualitative claims beside it, and whether they
hold here. Each model's run lies in ``--out``/<name>; a rerun with the same ``--out`` skips a model whose
scores are already there.

The seeds' models trained for 300k+ steps on a GPU; at a CPU budget each model sees a few thousand
batches, so only the direction of the differences can be compared, and a difference of a few
points is within the metrics' spread (300 evaluation points each).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from models.cli import train
from models.data.shapes import Shapes
from models.metrics.disentanglement import beta_vae_metric, encoder_representation, factor_vae_metric
from models.registry import load_run
from models.training.trainer import free_run_dir, write_json

CLAIMS = {
    "beta-vae-1": "baseline: the plain VAE (Higgins et al.: entangled)",
    "beta-vae-large": "larger beta raises the beta-VAE metric (Higgins et al. 2017)",
    "factor-vae": "TC penalty raises the FactorVAE metric over beta-VAE (Kim & Mnih 2018)",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m models study disentanglement", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=18.0,
        help="training CPU minutes of this process for the three models together (with one thread "
        "about as many wall minutes on a quiet core; the metrics add about 3)",
    )
    parser.add_argument("--steps", type=int, default=100_000, help="at most this many steps per model")
    parser.add_argument(
        "--large-beta", type=float, default=4.0, help="the larger beta (Higgins et al.'s dSprites choice)"
    )
    parser.add_argument("--gamma", type=float, default=10.0, help="FactorVAE's TC weight (the seed's gamma = 10)")
    parser.add_argument("--train-points", type=int, default=500, help="metric training points (both metrics)")
    parser.add_argument("--eval-points", type=int, default=300, help="metric evaluation points (both metrics)")
    parser.add_argument("--pairs", type=int, default=32, help="beta-VAE metric: pairs averaged per point")
    parser.add_argument("--vote-batch", type=int, default=64, help="FactorVAE metric: points per vote")
    parser.add_argument(
        "--variance-points", type=int, default=4096, help="FactorVAE metric: points of the global variance"
    )
    parser.add_argument("--reconstruction-points", type=int, default=1000, help="fixed shapes of the reconstruction")
    parser.add_argument("--metric-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: the budget is then about wall time, and on a busy machine no CPU "
        "time goes to threads spinning while they wait for each other)",
    )
    parser.add_argument("--out", type=Path, help="directory of the three runs (default: runs/disentangle-<n>)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not args.budget > 0:
        parser.error(f"--budget must be a positive number of CPU minutes, got {args.budget}")
    for name in ("steps", "train_points", "eval_points", "reconstruction_points", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("pairs", "vote_batch", "variance_points"):
        if getattr(args, name) < 2:
            parser.error(f"--{name.replace('_', '-')} must be an integer >= 2, got {getattr(args, name)}")
    return args


def runs(args) -> dict:
    """name -> (label, ``python -m models train`` arguments)."""
    beta_vae = ["beta-vae", "--data", "shapes", "--arch", "conv64", "--latent-dim", "10", "--batch-size", "64"]
    return {
        "beta-vae-1": ("beta-VAE, beta = 1 (VAE)", beta_vae + ["--beta", "1"]),
        "beta-vae-large": (f"beta-VAE, beta = {args.large_beta:g}", beta_vae + ["--beta", str(args.large_beta)]),
        # Batches of 128: the VAE steps on one half (64 images, as beta-VAE), the discriminator on the other.
        "factor-vae": (
            f"FactorVAE, gamma = {args.gamma:g}",
            ["factor-vae", "--latent-dim", "10", "--gamma", str(args.gamma), "--batch-size", "128"],
        ),
    }


@torch.no_grad()
def score(model, args) -> dict:
    """Both metrics on the model's posterior means, and its reconstruction loss on fixed shapes."""
    model.eval()
    shapes = Shapes()
    represent = encoder_representation(lambda x: model.encode(x)[0], shapes)
    beta = beta_vae_metric(
        represent,
        shapes,
        train_points=args.train_points,
        eval_points=args.eval_points,
        pairs=args.pairs,
        seed=args.metric_seed,
    )
    factor = factor_vae_metric(
        represent,
        shapes,
        train_points=args.train_points,
        eval_points=args.eval_points,
        batch_size=args.vote_batch,
        variance_points=args.variance_points,
        seed=args.metric_seed,
    )
    images, _ = shapes.sample(args.reconstruction_points, torch.Generator().manual_seed(args.metric_seed + 1))
    x = images.flatten(1).float()
    reconstruction = (
        torch.cat(
            [
                -model.likelihood.log_prob(model.decode(model.encode(part)[0].unsqueeze(1)), part)
                for part in x.split(250)
            ]
        )
        .mean()
        .item()
    )
    return {
        "beta_vae_metric": beta["score"],
        "factor_vae_metric": factor["score"],
        "kept_dimensions": factor["kept_dimensions"],
        "reconstruction": reconstruction,
    }


def main(argv=None) -> dict:
    """The command; returns name -> results (also in ``<out>/<name>/disentanglement.json``)."""
    args = parse_args(argv)
    out = args.out or free_run_dir(Path("runs"), "disentangle")
    started = time.perf_counter()
    results = {}
    plan = runs(args)
    for name, (label, model_args) in plan.items():
        done = out / name / "disentanglement.json"
        if done.is_file():
            results[name] = json.loads(done.read_text())
            continue
        model_started = time.perf_counter()
        argv = model_args + [
            "--minutes",
            str(args.budget / len(plan)),
            "--steps",
            str(args.steps),
            "--seed",
            str(args.seed),
            "--threads",
            str(args.threads),
            "--out",
            str(out / name),
        ]
        argv += ["--no-progress"] if args.no_progress else []
        metrics = train(argv)
        model = load_run(out / name)[2]
        results[name] = {
            "label": label,
            "steps": metrics["steps"],
            "train_cpu_minutes": metrics["train_cpu_seconds"] / 60,
            **score(model, args),
            "seconds": time.perf_counter() - model_started,
        }
        write_json(done, results[name])
    print_table(results, args, time.perf_counter() - started)
    return results


def print_table(results: dict, args, seconds: float) -> None:
    print(
        f"\nDisentanglement on the shapes dataset (metric protocol: {args.train_points} train / {args.eval_points} "
        f"eval points, {args.pairs} pairs per beta-VAE point, {args.vote_batch} points per FactorVAE vote, "
        f"seed {args.metric_seed}); {seconds / 60:.1f} wall minutes\n"
    )
    print(
        "| model | steps | train CPU min | beta-VAE metric | FactorVAE metric | reconstruction (nats) | seed's claim |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, r in results.items():
        print(
            f"| {r['label']} | {r['steps']} | {r['train_cpu_minutes']:.1f} | {r['beta_vae_metric']:.3f} | "
            f"{r['factor_vae_metric']:.3f} | {r['reconstruction']:.1f} | {CLAIMS[name]} |"
        )
    base, large, factor = (results[name] for name in ("beta-vae-1", "beta-vae-large", "factor-vae"))
    print()
    for claim, holds in (
        ("larger beta raises the beta-VAE metric", large["beta_vae_metric"] > base["beta_vae_metric"]),
        ("larger beta raises the FactorVAE metric", large["factor_vae_metric"] > base["factor_vae_metric"]),
        (
            "FactorVAE's TC penalty raises the FactorVAE metric over beta = 1",
            factor["factor_vae_metric"] > base["factor_vae_metric"],
        ),
        (
            "FactorVAE's TC penalty raises the beta-VAE metric over beta = 1",
            factor["beta_vae_metric"] > base["beta_vae_metric"],
        ),
        (
            "FactorVAE scores above the larger beta on the FactorVAE metric",
            factor["factor_vae_metric"] > large["factor_vae_metric"],
        ),
        ("FactorVAE reconstructs better than the larger beta", factor["reconstruction"] < large["reconstruction"]),
    ):
        print(f"- {claim}: {'yes' if holds else 'no'}")
