"""Reproduce the seed tables' rows side by side: ``python -m models study seed-tables --budget 2``.

Trains, on dynamically binarised MNIST with the IWAE paper's MLP (784-200-200-50 tanh), each
model for ``--budget`` epochs (the same number of optimiser steps for all), evaluates it on the
test set, and prints two tables next to the seeds' numbers:

1. "Taming VAEs" (seed 000): VAE, beta-VAE (beta = 0.5), GECO and GECO + IWAE (k = 5) by marginal
   KL (ELBO surgery, aggregate posterior over the first ``--surgery-limit`` test images) and
   reconstruction loss (-log p(x|z), nats per image).
2. Burda et al. (seed 001): VAE (k-sample ELBO) against IWAE for k = 1, 5, 50 by test NLL
   (K = ``--num-samples`` importance samples over the first ``--nll-limit`` test images) and active
   units. At k = 1 the two objectives coincide, so one model fills both columns.

The seeds' models trained for hundreds to thousands of epochs; at a CPU budget the absolute
numbers are far from theirs and only the orderings can be compared. Each model's run lies in
``--out``/<name>; a rerun skips a model whose evaluation is already there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from models.cli import train
from models.metrics import likelihood as zoo_metrics
from models.registry import load_run
from models.seeds import BURDA_ONE_LAYER, TAMING
from models.training.trainer import free_run_dir

# name -> the model and its options for ``python -m models train``; the GECO models also take --tolerance.
RUNS = {
    "vae": ["vae", "--k", "1"],
    "beta-vae": ["beta-vae", "--beta", "0.5"],
    "geco": ["geco"],
    "geco-iwae": ["geco-iwae", "--k", "5"],
    "vae-k5": ["vae", "--k", "5"],
    "vae-k50": ["vae", "--k", "50"],
    "iwae-k5": ["iwae-k5"],
    "iwae-k50": ["iwae-k50"],
}
TAMING_LABELS = {"vae": "VAE", "beta-vae": "beta-VAE (beta=0.5)", "geco": "GECO", "geco-iwae": "GECO + IWAE (k=5)"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m models study seed-tables", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budget",
        type=float,
        default=2.0,
        help="training epochs per model (2 = 1200 steps of 100 images: 40 min for all eight "
        "models and their evaluation on 2 shared cores, the k = 50 pair taking half; "
        "below about 1 epoch the VAEs have not yet left the mean-image plateau)",
    )
    parser.add_argument("--num-samples", type=int, default=5000, help="importance samples K of the test NLL")
    parser.add_argument("--nll-limit", type=int, default=1000, help="test images in the NLL (10000: all)")
    parser.add_argument("--surgery-limit", type=int, default=2000, help="test images in the ELBO surgery")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=80.0,
        help="GECO's kappa^2 in nats per image, below the VAE's reconstruction loss at this budget",
    )
    parser.add_argument("--only", nargs="+", choices=sorted(RUNS), help="train and evaluate only these models")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--out", type=Path, help="directory of the runs (default: runs/compare-<n>)")
    parser.add_argument("--limit-train", type=int, help="train on the first N training images (tests)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not args.budget > 0:
        parser.error(f"--budget must be a positive number of epochs, got {args.budget}")
    for name in ("num_samples", "nll_limit", "surgery_limit", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    return args


def run_one(name: str, args, out: Path) -> dict:
    """Train ``name`` (unless done) and evaluate it; the metrics with training and evaluation times."""
    run_dir = out / name
    evaluation = run_dir / "evaluation.json"
    if evaluation.is_file():
        return json.loads(evaluation.read_text())
    steps = max(1, round(args.budget * (args.limit_train or 60000) / args.batch_size))
    budget = ["--out", str(run_dir), "--steps", str(steps)] + (["--no-progress"] if args.no_progress else [])
    started = time.perf_counter()
    if (run_dir / "checkpoint.pt").is_file():
        train([RUNS[name][0], "--resume", *budget])
    else:
        argv = RUNS[name] + [
            "--data",
            "mnist",
            "--batch-size",
            str(args.batch_size),
            "--seed",
            str(args.seed),
            "--checkpoint-every",
            str(10 * steps),
        ]
        argv += ["--tolerance", str(args.tolerance)] if name.startswith("geco") else []
        argv += ["--data-dir", str(args.data_dir)] if args.data_dir else []
        argv += ["--limit-train", str(args.limit_train)] if args.limit_train else []
        train(argv + budget)
    train_seconds = time.perf_counter() - started
    _, _, model, batches = load_run(run_dir, data_dir=args.data_dir)
    x, _ = batches.test()
    started = time.perf_counter()
    results = zoo_metrics.evaluate_model(
        model,
        x,
        num_samples=args.num_samples,
        nll_limit=args.nll_limit,
        surgery_limit=args.surgery_limit,
        generator=torch.Generator().manual_seed(args.seed),
        progress=not args.no_progress,
    )
    results.update(train_seconds=train_seconds, eval_seconds=time.perf_counter() - started, steps=steps)
    evaluation.write_text(json.dumps(results, indent=2) + "\n")
    return results


def tables(results: dict, args) -> str:
    """The two tables as Markdown, ours next to the seeds'."""
    lines = [
        f"Budget: {args.budget} epoch(s) per model ({results[next(iter(results))]['steps']} steps of "
        f"{args.batch_size}); NLL with K={args.num_samples} over {args.nll_limit} test images; "
        f"marginal KL over {args.surgery_limit}.",
        "",
    ]
    if any(name in results for name in TAMING):
        lines += [
            "| model | marginal KL | reconstruction loss | avg KL | MI | seed: marginal KL | seed: reconstruction |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, (seed_kl, seed_recon) in TAMING.items():
            if name in results:
                r = results[name]
                lines.append(
                    f"| {TAMING_LABELS[name]} | {r['marginal_kl']:.4f} | {r['reconstruction']:.4f} | "
                    f"{r['average_kl']:.2f} | {r['mutual_information']:.2f} | {seed_kl} | {seed_recon} |"
                )
        lines.append("")
    names = {1: ("vae", "vae"), 5: ("vae-k5", "iwae-k5"), 50: ("vae-k50", "iwae-k50")}
    if any(name in results for pair in names.values() for name in pair):
        lines += [
            "| k | VAE NLL | VAE AU | IWAE NLL | IWAE AU | seed: VAE NLL / AU | seed: IWAE NLL / AU |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for k, (vae, iwae) in names.items():
            cells = []
            for name in (vae, iwae):
                r = results.get(name)
                cells += [f"{r['nll']:.2f}", str(r["active_units"])] if r else ["-", "-"]
            (seed_vae, seed_iwae) = BURDA_ONE_LAYER[k]
            lines.append(
                f"| {k} | {' | '.join(cells)} | {seed_vae[0]} / {seed_vae[1]} | {seed_iwae[0]} / {seed_iwae[1]} |"
            )
        lines.append("")
    lines += ["| run | train s | eval s (NLL s) |", "| --- | ---: | ---: |"]
    lines += [
        f"| {name} | {r.get('train_seconds', 0):.0f} | {r.get('eval_seconds', 0):.0f} ({r['nll_seconds']:.0f}) |"
        for name, r in results.items()
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    """The CLI; returns {run name: metrics}."""
    args = parse_args(argv)
    out = args.out or free_run_dir(Path("runs"), "compare")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {name: run_one(name, args, out) for name in (args.only or RUNS)}
    text = tables(results, args) + f"\n\nWall time: {time.perf_counter() - started:.0f} s.\n"
    (out / "tables.md").write_text(text)
    print(text)
    return results
