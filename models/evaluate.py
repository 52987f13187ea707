"""Evaluate a trained run: ``python -m models.evaluate runs/iwae-mnist-0/checkpoint.pt``.

On the test split of the run's dataset: the importance-sampled NLL (``--num-samples``, 5000 by
default as in Burda et al., over the first ``--nll-limit`` images or all of them), active units,
ELBO surgery (average KL = marginal KL + index-code mutual information, on the first
``--surgery-limit`` images) and the reconstruction loss. Prints them with the NLL's wall time and
the backend that ran it (``VAEKERNELS_BACKEND=reference`` for the PyTorch oracle), and writes them
to ``evaluation.json`` next to the checkpoint (``evaluation-1.json``, ... when that exists).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import vaekernels
from . import metrics as zoo_metrics
from .data import default_data_dir, load_dataset
from .train import make_model, test_input


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m models.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint.pt written by python -m models.train")
    parser.add_argument("--num-samples", type=int, default=5000, help="importance samples K of the NLL")
    parser.add_argument("--nll-limit", type=int, metavar="N", help="NLL over the first N test images (default all)")
    parser.add_argument("--surgery-limit", type=int, default=2000, metavar="N",
                        help="ELBO surgery over the first N test images (its cost grows as N^2)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per NLL batch")
    parser.add_argument("--chunk-size", type=int, default=500, help="importance samples decoded at once")
    parser.add_argument("--data-dir", type=Path, help="dataset directory (default: the run's, else the shared copy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"checkpoint {args.checkpoint} does not exist "
                     "(python -m models.train writes RUN_DIR/checkpoint.pt)")
    for name in ("num_samples", "nll_limit", "surgery_limit", "batch_size", "chunk_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    return args


def load_run(checkpoint_path: Path, device="cpu", data_dir=None):
    """(model with the checkpoint's weights, in eval mode; the run's settings; its dataset)."""
    checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=False)
    settings = checkpoint["settings"]
    data = load_dataset(settings["data"], data_dir or settings["data_dir"] or default_data_dir())
    model = make_model(settings, data).to(device)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), settings, data


def _free_path(directory: Path) -> Path:
    path, n = directory / "evaluation.json", 0
    while path.exists():
        n += 1
        path = directory / f"evaluation-{n}.json"
    return path


def main(argv=None) -> dict:
    """The CLI; returns the metrics it writes."""
    args = parse_args(argv)
    device = torch.device(args.device)
    model, settings, data = load_run(args.checkpoint, device, args.data_dir)
    x, y = test_input(data, settings)
    x, y = x.to(device), None if y is None else y.to(device)
    generator = torch.Generator(device).manual_seed(args.seed)
    started = time.perf_counter()
    results = zoo_metrics.evaluate_model(
        model, x, y, num_samples=args.num_samples, nll_limit=args.nll_limit, surgery_limit=args.surgery_limit,
        batch_size=args.batch_size, chunk_size=args.chunk_size, generator=generator, progress=not args.no_progress)
    results["seconds"] = time.perf_counter() - started
    results["backend"] = os.environ.get("VAEKERNELS_BACKEND", "auto")
    results["available_backends"] = vaekernels.available_backends()
    results["checkpoint"] = str(args.checkpoint)
    path = _free_path(args.checkpoint.parent)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(format_results(results, settings))
    print(f"written to {path}")
    return results


def format_results(results: dict, settings: dict) -> str:
    """One readable block of the metrics."""
    lines = [f"{settings['model']} (k={settings['k']}) on {settings['data']}, backend {results.get('backend', 'auto')}",
             f"  test NLL         {results['nll']:.2f} nats (K={results['nll_samples']}, "
             f"{results['nll_examples']} images, {results['nll_seconds']:.1f} s; "
             f"{results.get('seconds', float('nan')):.1f} s for all metrics)",
             f"  active units     {results['active_units']}"
             + (f" + {results['active_units_top']} (top layer)" if "active_units_top" in results else ""),
             f"  reconstruction   {results['reconstruction']:.2f} nats, squared error {results['squared_error']:.2f}"]
    if "marginal_kl" in results:
        lines.append(f"  ELBO surgery     average KL {results['average_kl']:.2f} = marginal KL "
                     f"{results['marginal_kl']:.2f} + mutual information {results['mutual_information']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except FileNotFoundError as error:
        raise SystemExit(f"python -m models.evaluate: {error}") from None
