"""Command-line pieces the model scripts share: their common training flags, run directories that are never
overwritten, metrics files written whole, and the checkpoints that --resume continues from."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def add_training_args(parser: argparse.ArgumentParser, *, out: str, batch_size: int, epochs: int = 1,
                      limit_test: bool = True) -> None:
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--limit-train", type=int, metavar="N", help="train on the first N training images")
    if limit_test:
        parser.add_argument("--limit-test", type=int, metavar="N", help="evaluate on the first N test images")
    parser.add_argument("--data-dir", type=Path, help="holds mnist/*.gz (default: $VAEKERNELS_DATA or ../shared/data)")
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--seed", type=int, default=0)


def add_resume_arg(parser: argparse.ArgumentParser) -> None:
    """--resume, which :func:`check_run_dir` and :func:`load_training_state` serve."""
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")


def check_run_dir(parser: argparse.ArgumentParser, out: Path, resume: bool | None = None) -> None:
    """Refuses an ``out`` that already holds a run, so that none is overwritten. ``resume`` is None for a script
    that cannot resume; True asks instead for the checkpoint that --resume continues."""
    if resume:
        if not (out / "checkpoint.pt").is_file():
            parser.error(f"--resume: {out / 'checkpoint.pt'} does not exist")
    elif out.is_dir() and any(out.iterdir()):
        hint = "choose another --out" if resume is None else "pass --resume to continue it or choose another --out"
        parser.error(f"{out} already holds a run; {hint}")


def new_run_dir(parser: argparse.ArgumentParser, out: Path) -> Path:
    """``out``, created; a directory that already holds a run is refused, never overwritten."""
    check_run_dir(parser, out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, value: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temporary, path)  # a run killed mid-write keeps the previous file


def save_atomically(value, path: Path) -> None:
    """``torch.save`` through a temporary file, so that a run killed mid-save keeps the previous
    checkpoint to resume from."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(value, temporary)
    os.replace(temporary, path)


def save_training_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        generators: dict[str, torch.Generator], history: list, settings: dict) -> None:
    """The checkpoint that --resume continues from; ``generators`` are stored under their keys."""
    save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     **{name: generator.get_state() for name, generator in generators.items()},
                     "history": history, "settings": settings}, path)


def load_training_state(path: Path, device: torch.device, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        generators: dict[str, torch.Generator]) -> list:
    """Restores what :func:`save_training_state` wrote into ``model``, ``optimizer`` and ``generators``; returns
    the history."""
    checkpoint = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    for name, generator in generators.items():
        generator.set_state(checkpoint[name])
    return checkpoint["history"]


def json_settings(args: argparse.Namespace) -> dict:
    """The parsed flags as JSON values (paths as strings), for metrics.json and checkpoints."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}


def finish_run(out: Path, model: torch.nn.Module, metrics: dict) -> dict:
    """Writes ``model`` and ``metrics`` to ``out`` and prints the metrics but the settings; returns ``metrics``."""
    torch.save({"model": model.state_dict(), "metrics": metrics}, out / "checkpoint.pt")
    write_json(out / "metrics.json", metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "settings"}))
    return metrics
