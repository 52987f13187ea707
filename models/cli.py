"""The reference models' one command line, ``python -m models``.

    python -m models list                          every model, one line each
    python -m models train MODEL [options]         train it (python -m models train MODEL --help: its options)
    python -m models evaluate RUN                  its test metrics, written to RUN/evaluation.json
    python -m models sample RUN                    its pictures drawn again, into a new RUN/pictures-<n>
    python -m models reproduce MODEL [options]     train and evaluate it at its reproduce preset
    python -m models study NAME [options]          one of the studies (python -m models study --help)

A run directory holds ``checkpoint.pt``, ``settings.json``, ``metrics.json`` and the model's PNG grids
(:mod:`models.training.trainer`); ``train MODEL --out RUN --resume`` continues it exactly, with the run's own
options and a new budget where one is given.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

import torch

from models.registry import MEASURED_ON, MODELS, load_run
from models.training.trainer import Budget, Settings, Trainer, distributed, free_run_dir, holds_run, write_json

PROG = "python -m models"
FAMILIES = {
    "vae": "likelihood VAEs (models.vae.zoo)",
    "autoregressive": "autoregressive models",
    "jacobian": "decoder-Jacobian regularised autoencoders",
    "flows": "reversible flows and classifiers",
    "adversarial": "adversarial and disentangling models",
}
# name -> (module with main(argv), what it does)
STUDIES = {
    "seed-tables": (
        "models.studies.seed_tables",
        "the seed tables' rows side by side: VAE, beta-VAE, GECO, IWAE on MNIST",
    ),
    "disentanglement": (
        "models.studies.disentanglement",
        "beta-VAE and FactorVAE on the shapes, both disentanglement metrics",
    ),
    "revnet-memory": (
        "models.studies.revnet_memory",
        "RevNet against its matched ResNet: memory and time against depth",
    ),
    "grae-toy": ("models.studies.grae_toy", "GRAE on a toy with a known decoder: does it find the right directions"),
    "gradient-variance": ("models.studies.toys", "score-function against reparameterised gradient variance"),
    "collapse": ("models.studies.toys", "posterior collapse with a linear decoder, diagonal against full covariance"),
}


def list_models() -> None:
    width = max(map(len, MODELS))
    for family, title in FAMILIES.items():
        print(f"{title}:")
        for name, entry in MODELS.items():
            if entry.family == family:
                print(f"  {name:<{width}}  {entry.description}")


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one (not for None or a flag's False)."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def train_parser(entry) -> argparse.ArgumentParser:
    """The options of ``train MODEL``: the training ones, then the model's own (its config's fields)."""
    parser = argparse.ArgumentParser(
        prog=f"{PROG} train {entry.name}",
        description=entry.description,
        formatter_class=_DefaultsHelp,
    )
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, help=f"run directory (default: runs/{entry.name}-<n>, n the first free)")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint, with its "
        "own options; a budget given here replaces its own",
    )
    run.add_argument("--data-dir", type=Path, help="dataset directory (default: $VAEKERNELS_DATA or ../shared/data)")
    run.add_argument("--download", action="store_true", help="fetch missing data files from their canonical URLs")
    budget = ", ".join(f"{value} {key}" for key, value in entry.budget.items())
    run.add_argument("--steps", type=_positive(int), help=f"optimiser steps in all (default budget: {budget})")
    run.add_argument("--epochs", type=_positive(int), help="epochs in all")
    run.add_argument("--minutes", type=_positive(float), help="CPU minutes of this process in all")
    run.add_argument("--batch-size", type=_positive(int), default=entry.batch_size, help="global batch")
    run.add_argument("--lr", type=_positive(float), default=entry.lr, help="Adam learning rate")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--limit-train", type=_positive(int), metavar="N", help="train on the first N training images")
    run.add_argument("--checkpoint-every", type=_positive(int), default=1000, help="steps between checkpoints")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--threads", type=_positive(int), help="torch CPU threads (default: torch's choice)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    model = parser.add_argument_group(entry.name)
    defaults = entry.default_config()
    for f in fields(entry.config):
        if f.name not in entry.options:
            continue
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        if isinstance(default, bool):
            model.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        else:
            model.add_argument(
                flag, type=type(default), default=default, choices=f.metadata["choices"], help=f.metadata["help"]
            )
    return parser


def new_run_dir(parser, out: Path | None, stem: str, device: str) -> Path:
    """``out``, or runs/<stem>-<n> for the first free n, refused where it holds a run. Under torchrun rank 0
    decides and tells the others, which would otherwise find the directory rank 0 has just begun to write."""
    rank, world, _ = distributed(device)
    out = out or free_run_dir(Path("runs"), stem)
    decision = [out, rank == 0 and holds_run(out)]
    if world > 1:
        torch.distributed.broadcast_object_list(decision)
    out, taken = decision
    if taken:
        parser.error(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return out


def model_entry(command: str, argv: list[str]):
    """The entry of the model ``argv`` starts with; else the usage of ``command`` and the models, and exit (0 after
    --help, else 2)."""
    if argv and argv[0] in MODELS:
        return MODELS[argv[0]]
    given = f"; got {argv[0]!r}" if argv and not argv[0].startswith("-") else ""
    print(f"usage: {PROG} {command} MODEL [options]; MODEL one of{given}:\n", file=sys.stderr)
    list_models()
    raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)


def train(argv: list[str]) -> dict:
    entry = model_entry("train", argv)
    parser = train_parser(entry)
    args = parser.parse_args(argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget(args.steps, args.epochs, args.minutes)
    try:
        if args.resume:
            if args.out is None or not (args.out / "checkpoint.pt").is_file():
                parser.error(f"--resume needs --out RUN holding checkpoint.pt; {args.out}/checkpoint.pt does not exist")
            trainer = Trainer.resume(entry, args.out, budget=budget, device=args.device, progress=not args.no_progress)
        else:
            out = new_run_dir(parser, args.out, entry.name, args.device)
            config = replace(entry.default_config(), **{name: getattr(args, name) for name in entry.options})
            if budget == Budget():
                budget = Budget(**entry.budget)
            settings = Settings(
                args.batch_size,
                args.lr,
                args.seed,
                args.data_dir and str(args.data_dir),
                args.limit_train,
                args.checkpoint_every,
                args.download,
            )
            trainer = Trainer(
                entry, config, settings, out, budget=budget, device=args.device, progress=not args.no_progress
            )
        metrics = trainer.fit()
    except (ValueError, FileNotFoundError) as error:  # a bad option, missing data: the message says what to do
        raise SystemExit(f"{PROG} train {entry.name}: {error}") from None
    if trainer.rank == 0:
        print(
            f"{entry.name}: {metrics['steps']} steps, {metrics['train_cpu_seconds']:.0f} CPU s, last steps "
            + ", ".join(f"{key} {value:.4g}" for key, value in metrics["last_steps_mean"].items())
            + f"; written to {trainer.out}"
        )
    return metrics


def free_path(directory: Path, stem: str, suffix: str = "") -> Path:
    """directory/stem<suffix>, or stem-1, stem-2, ... where taken: nothing is overwritten.

    >>> free_path(Path("/nonexistent"), "evaluation", ".json")
    PosixPath('/nonexistent/evaluation.json')
    """
    path, n = directory / f"{stem}{suffix}", 0
    while path.exists():
        n += 1
        path = directory / f"{stem}-{n}{suffix}"
    return path


def run_parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{PROG} {command}", description=description, formatter_class=_DefaultsHelp)
    parser.add_argument("run", type=Path, help="run directory (holding checkpoint.pt)")
    parser.add_argument("--data-dir", type=Path, help="dataset directory (default: the run's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def _load(parser, args):
    if not (args.run / "checkpoint.pt").is_file():
        parser.error(f"{args.run}/checkpoint.pt does not exist ({PROG} train writes RUN/checkpoint.pt)")
    return load_run(args.run, args.device, args.data_dir)


@torch.no_grad()
def evaluate(argv: list[str]) -> dict:
    parser = run_parser(
        "evaluate",
        "A run's test metrics, printed and written to RUN/evaluation.json (evaluation-1.json, ... where that exists).",
    )
    parser.add_argument("--limit", type=_positive(int), metavar="N", help="the first N test images (default all)")
    parser.add_argument(
        "--num-samples", type=_positive(int), default=5000, help="importance samples K of the likelihood VAEs' NLL"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    entry, config, model, batches = _load(parser, args)
    metrics = entry.evaluate(
        model,
        batches,
        {"limit": args.limit, "num_samples": args.num_samples, "seed": args.seed, "progress": not args.no_progress},
    )
    metrics = {"model": entry.name, "run": str(args.run), **metrics}
    path = free_path(args.run, "evaluation", ".json")
    write_json(path, metrics)
    print(json.dumps({key: value for key, value in metrics.items() if not isinstance(value, list)}, indent=2))
    print(f"written to {path}")
    return metrics


@torch.no_grad()
def sample(argv: list[str]) -> list[Path]:
    parser = run_parser(
        "sample", "A run's pictures (samples, reconstructions, ...) drawn again with --seed, into a new directory."
    )
    parser.add_argument("--out", type=Path, help="directory for the PNGs (default: RUN/pictures-<n>, n the first free)")
    args = parser.parse_args(argv)
    entry, config, model, batches = _load(parser, args)
    out = args.out or free_path(args.run, "pictures")
    if holds_run(out):
        parser.error(f"{out} is not empty; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    from models.training.pictures import save_grid

    written = []
    for name, (images, columns, shape) in entry.pictures(
        model, batches, torch.Generator().manual_seed(args.seed), config
    ).items():
        save_grid(out / name, images, columns, shape)
        written.append(out / name)
    print("written: " + ", ".join(map(str, written)))
    return written


def _cell(value) -> str:
    return "-" if value is None else f"{value:.5g}" if isinstance(value, float) else str(value)


def reproduce(argv: list[str]) -> dict:
    """Trains MODEL at its :class:`~models.registry.Reproduction` preset, evaluates it and prints its numbers next
    to those the preset reached on the development machine and the seed's; writes them to RUN/reproduce.json."""
    entry = model_entry("reproduce", argv)
    preset = entry.reproduce
    parser = argparse.ArgumentParser(
        prog=f"{PROG} reproduce {entry.name}",
        description=f"Train {entry.name} for {preset.steps} steps"
        + (f" with {' '.join(preset.options)}" if preset.options else "")
        + f", then evaluate it on the first {preset.limit} test images. Any option of `{PROG} train "
        f"{entry.name}` replaces the preset's (--steps N: a shorter run).",
        formatter_class=_DefaultsHelp,
    )
    parser.add_argument("--out", type=Path, help=f"run directory (default: runs/{entry.name}-reproduce-<n>)")
    parser.add_argument("--limit", type=_positive(int), default=preset.limit, help="test images evaluated")
    parser.add_argument(
        "--num-samples", type=_positive(int), default=preset.num_samples, help="importance samples of the VAEs' NLL"
    )
    parser.add_argument("--no-progress", action="store_true")
    args, train_options = parser.parse_known_args(argv[1:])
    out = args.out or free_run_dir(Path("runs"), f"{entry.name}-reproduce")
    quiet = ["--no-progress"] if args.no_progress else []
    trained = train(
        [entry.name, "--steps", str(preset.steps), *preset.options, *train_options, "--out", str(out), *quiet]
    )
    evaluation = evaluate([str(out), "--limit", str(args.limit), "--num-samples", str(args.num_samples), *quiet])
    numbers = {
        **{f"train_{key}": value for key, value in trained["last_steps_mean"].items()},
        "train_cpu_seconds": trained["train_cpu_seconds"],
        **{key: value for key, value in evaluation.items() if isinstance(value, (int, float))},
    }
    recorded = preset.reached or {}
    rows = [
        (metric, numbers.get(metric), recorded.get(metric), *preset.seed.get(metric, (None, "")))
        for metric in (*preset.metrics, "train_cpu_seconds")
    ]
    print(
        f"\n{entry.name}: {trained['steps']} steps (preset: {preset.steps}); recorded: "
        + ("a whole run of the preset on " + MEASURED_ON if preset.reached else "not yet measured")
    )
    width = max(len(row[0]) for row in rows)
    print(f"{'metric':<{width}}  {'this run':>10}  {'recorded':>10}  {'seed':>10}")
    for metric, value, kept, seed, source in rows:
        print(f"{metric:<{width}}  {_cell(value):>10}  {_cell(kept):>10}  {_cell(seed):>10}  {source}")
    result = {
        "model": entry.name,
        "run": str(out),
        "steps": trained["steps"],
        "preset_steps": preset.steps,
        "numbers": numbers,
        "recorded": preset.reached,
        "seed": preset.seed,
    }
    write_json(out / "reproduce.json", result)
    return result


def study(argv: list[str]):
    if not argv or argv[0] not in STUDIES:
        print(f"usage: {PROG} study NAME [options] (NAME --help: its options); NAME one of:", file=sys.stderr)
        for name, (_, description) in STUDIES.items():
            print(f"  {name:<18} {description}", file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module, _ = STUDIES[argv[0]]
    toy = [argv[0]] if module == "models.studies.toys" else []
    try:
        return importlib.import_module(module).main(toy + argv[1:])
    except FileNotFoundError as error:
        raise SystemExit(f"{PROG} study {argv[0]}: {error}") from None


COMMANDS = {"train": train, "evaluate": evaluate, "sample": sample, "reproduce": reproduce, "study": study}


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "list":
        return list_models()
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    return COMMANDS[argv[0]](argv[1:])
