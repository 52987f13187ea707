"""One training loop for every model of :data:`models.registry.MODELS`.

A run lives in its own directory (``runs/<model>-<n>``, n the first free, or ``--out``); a directory
that already holds a run is written to only to resume it. In it: ``checkpoint.pt`` every
``checkpoint_every`` steps and at the end, ``metrics.json``, ``settings.json`` and the model's PNG
grids. Resuming continues exactly: parameters, buffers, every optimiser's state, the random number
generators of every process and the data order are those of a run that never stopped, because batch t
is a function of (seed, t) alone (:class:`models.data.Batches`).

The budget is the first of ``steps``, ``epochs`` and ``minutes`` (CPU minutes of this process, all
its threads, so that a shared machine does not shrink it) to run out, counted over resumes. A loss or
statistic that is not finite stops the run with a message; the last checkpoint is from before it.

Under ``torchrun --nproc_per_node N`` every process trains on its share of each batch and the
gradients are averaged over the processes before each optimiser step (gloo on CPU, NCCL on GPUs),
as DistributedDataParallel does; rank 0 writes the run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from models.training.pictures import save_grid


class Optimizers:
    """Named Adam optimisers, one per player, that checkpoint as one (``state_dict`` / ``load_state_dict``).

    A model with one player names it ``"model"``. A player is a list of parameters or, as
    ``torch.optim.Adam`` takes them, of parameter groups (dicts with their own ``weight_decay``, say).
    Under torchrun, :meth:`step` averages the player's gradients over the processes before updating it.

    >>> optimizers = Optimizers({"g": [torch.nn.Parameter(torch.zeros(2))]}, lr=1e-3)
    >>> sorted(optimizers.state_dict())
    ['g']
    """

    def __init__(self, groups: dict, lr: float, betas=(0.5, 0.999), eps: float = 1e-8):
        # fused: one pass over all of a player's parameters rather than a few ops per parameter.
        self.optimizers = {
            name: torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True) for name, params in groups.items()
        }

    def step(self, name: str, loss: torch.Tensor) -> torch.Tensor:
        """One update of player ``name`` on ``loss``; only that player's gradients are zeroed first. Returns
        ``loss`` detached, the statistic an update reports."""
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dist.is_initialized() and dist.get_world_size() > 1:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        optimizer.step()
        return loss.detach()

    def state_dict(self) -> dict:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[name])


class NonFiniteStatistic(FloatingPointError):
    """Raised by :func:`train_steps` when an update reports a statistic that is not finite; ``step`` (counted from
    1) is the update that did, ``stats`` what it reported."""

    def __init__(self, step: int, stats: dict):
        super().__init__(f"models.training.train_steps: update {step} reported a statistic that is not finite: {stats}")
        self.step, self.stats = step, stats


def train_steps(
    update: Callable[[int], dict],
    steps: float,
    *,
    start: int = 0,
    cpu_seconds: float = 0.0,
    cpu_seconds_allowed: float = math.inf,
    bar: tqdm | None = None,
    after_step: Callable[[int, dict, float], None] | None = None,
) -> tuple[int, float]:
    """The one training loop, which the :class:`Trainer` and the studies' small models train through.

    Calls ``update(step)`` (one update of every player on batch ``step``; its statistics, tensors or numbers)
    for step = ``start``, ``start`` + 1, ... until ``steps`` updates are done or the CPU seconds of this
    process, counted on from ``cpu_seconds``, reach ``cpu_seconds_allowed``. After each update: ``bar``
    advances and shows the statistics, then ``after_step(updates done, statistics as floats, CPU seconds)``.
    A statistic that is not finite raises :class:`NonFiniteStatistic` before ``after_step`` sees it.
    Returns (updates done, CPU seconds).

    >>> weight = torch.nn.Parameter(torch.tensor([3.0]))
    >>> optimizers = Optimizers({"model": [weight]}, lr=0.1, betas=(0.9, 0.999))
    >>> train_steps(lambda step: {"loss": optimizers.step("model", weight.square().sum())}, 200)[0]
    200
    >>> abs(weight.item()) < 0.1
    True
    """
    step, started, before = start, time.process_time(), cpu_seconds
    while step < steps and cpu_seconds < cpu_seconds_allowed:
        stats = {key: float(value) for key, value in update(step).items()}
        if not all(math.isfinite(value) for value in stats.values()):
            raise NonFiniteStatistic(step + 1, stats)
        step += 1
        cpu_seconds = before + time.process_time() - started
        if bar is not None:
            bar.update()
            bar.set_postfix({key: f"{value:.4g}" for key, value in stats.items()}, refresh=False)
        if after_step is not None:
            after_step(step, stats, cpu_seconds)
    return step, cpu_seconds


def free_run_dir(base: Path, stem: str) -> Path:
    """base/stem-n for the first n not taken yet.

    >>> free_run_dir(Path("/nonexistent"), "vae")
    PosixPath('/nonexistent/vae-0')
    """
    n = 0
    while (base / f"{stem}-{n}").exists():
        n += 1
    return base / f"{stem}-{n}"


def holds_run(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def write_json(path: Path, value: dict) -> None:
    """``value`` as JSON through a temporary file, so that a run killed mid-write keeps the previous file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temporary, path)


def save_atomically(value, path: Path) -> None:
    """``torch.save`` through a temporary file, so that a run killed mid-save keeps the previous checkpoint."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(value, temporary)
    os.replace(temporary, path)


@dataclass
class Budget:
    """When training stops: the first of these to run out (None: no limit), each counted over resumes."""

    steps: int | None = None
    epochs: int | None = None
    minutes: float | None = None

    def total_steps(self, steps_per_epoch: int | None) -> float:
        """The steps the budget allows, inf where only ``minutes`` limit it.

        >>> Budget(steps=30, epochs=2).total_steps(10), Budget(minutes=1).total_steps(10)
        (20, inf)
        """
        by_epochs = math.inf if self.epochs is None or steps_per_epoch is None else self.epochs * steps_per_epoch
        return min(math.inf if self.steps is None else self.steps, by_epochs)


@dataclass
class Settings:
    """How a run trains, whatever the model: what ``train`` takes besides the model's own options."""

    batch_size: int
    lr: float
    seed: int = 0
    data_dir: str | None = None
    limit_train: int | None = None
    checkpoint_every: int = 1000
    download: bool = False


def distributed(device_name: str):
    """(rank, world size, device) from torchrun's environment; one process is rank 0 of 1."""
    device = torch.device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def _gather(value, world: int) -> list:
    values = [None] * world
    if world > 1:
        dist.all_gather_object(values, value)
        return values
    return [value]


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    """Trains ``entry`` (a :class:`models.registry.ModelEntry`) with its ``config`` into the run directory
    ``out``; :meth:`resume` continues a run from its checkpoint. :meth:`fit` returns the metrics.

    ``entry`` provides ``build(config)``, ``data(config, settings)`` (a :class:`models.data.Batches`),
    ``optimizer(model, lr)``, ``update(model, optimizers, batch)`` (a dict of statistics with
    ``"loss"``) and ``pictures(model, batches, generator, config)`` (file name -> (images, columns, image shape)):
    every model, adversarial ones included, trains
    through this one loop.
    """

    def __init__(
        self,
        entry,
        config,
        settings: Settings,
        out: Path,
        *,
        budget: Budget,
        device: str = "cpu",
        progress: bool = True,
        checkpoint: dict | None = None,
    ):
        self.entry, self.config, self.settings, self.budget = entry, config, settings, budget
        self.rank, self.world, self.device = distributed(device)
        self.out, self.progress = out, progress and self.rank == 0
        torch.manual_seed(settings.seed)
        self.model = entry.build(config).to(self.device)  # before the data, so that a bad option fails fast
        self.optimizers = entry.optimizer(self.model, settings.lr)
        self.data = entry.data(config, settings)
        # Each process draws its own noise; the parameters above start equal in all of them.
        torch.manual_seed(settings.seed * 7919 + self.rank)
        self.step, self.history, self.cpu_seconds = 0, [], 0.0
        if checkpoint is not None:
            if checkpoint["world_size"] != self.world:
                raise SystemExit(
                    f"models: {out} was trained by {checkpoint['world_size']} process(es); resume it "
                    f"with as many, got {self.world}"
                )
            self.model.load_state_dict(checkpoint["model"])
            self.optimizers.load_state_dict(checkpoint["optimizers"])
            _set_rng_state(checkpoint["rng"][self.rank], self.device)
            self.step, self.history = checkpoint["step"], checkpoint["history"]
            self.cpu_seconds = checkpoint["cpu_seconds"]

    @classmethod
    def resume(cls, entry, out: Path, *, budget: Budget, device: str = "cpu", progress: bool = True) -> Trainer:
        """The run in ``out`` at its last checkpoint; ``budget`` replaces the run's own (None fields keep it)."""
        checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
        config = entry.config(**checkpoint["config"])
        kept = Budget(**checkpoint["budget"])
        budget = Budget(
            **{key: value if value is not None else getattr(kept, key) for key, value in asdict(budget).items()}
        )
        return cls(
            entry,
            config,
            Settings(**checkpoint["settings"]),
            out,
            budget=budget,
            device=device,
            progress=progress,
            checkpoint=checkpoint,
        )

    def state(self) -> dict:
        return {
            "model_name": self.entry.name,
            "config": asdict(self.config),
            "settings": asdict(self.settings),
            "budget": asdict(self.budget),
            "model": self.model.state_dict(),
            "optimizers": self.optimizers.state_dict(),
            "rng": _gather(_rng_state(self.device), self.world),
            "step": self.step,
            "history": self.history,
            "cpu_seconds": self.cpu_seconds,
            "world_size": self.world,
        }

    def save(self) -> None:
        state = self.state()  # every process joins the gathering of the generators' states
        if self.rank == 0:
            save_atomically(state, self.out / "checkpoint.pt")

    def fit(self) -> dict:
        """Trains until the budget runs out; writes the checkpoint, the pictures and metrics.json."""
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(
                self.out / "settings.json",
                {
                    "model": self.entry.name,
                    "config": asdict(self.config),
                    "settings": asdict(self.settings),
                    "budget": asdict(self.budget),
                    "world_size": self.world,
                },
            )
        total = self.budget.total_steps(self.data.steps_per_epoch)
        if not math.isfinite(total) and self.budget.minutes is None:
            raise ValueError(
                "models.training.Trainer: the budget has no limit (a dataset without epochs needs steps or minutes)"
            )
        wall_started = time.perf_counter()
        self.model.train()
        with tqdm(
            total=total if math.isfinite(total) else None,
            initial=self.step,
            unit="step",
            desc=self.entry.name,
            disable=not self.progress,
            dynamic_ncols=True,
        ) as bar:
            try:
                train_steps(
                    self.update,
                    total,
                    start=self.step,
                    cpu_seconds=self.cpu_seconds,
                    cpu_seconds_allowed=math.inf if self.budget.minutes is None else 60 * self.budget.minutes,
                    bar=bar,
                    after_step=self.after_step,
                )
            except NonFiniteStatistic as error:
                raise SystemExit(
                    f"models: training {self.entry.name} stopped at step {error.step}: a statistic is not finite "
                    f"({error.stats}). The checkpoint in {self.out} is from before it; lower --lr and resume, or "
                    f"start again."
                ) from None
        self.save()
        metrics = self.metrics(time.perf_counter() - wall_started)
        if self.rank == 0:
            metrics["pictures"] = self.write_pictures(self.out)
            write_json(self.out / "metrics.json", metrics)
        return metrics

    def update(self, step: int) -> dict:
        """One update on this process's share of batch ``step``."""
        x, y = self.data.batch(step)
        batch = (
            x[self.rank :: self.world].to(self.device),
            None if y is None else y[self.rank :: self.world].to(self.device),
        )
        return self.entry.update(self.model, self.optimizers, batch)

    def after_step(self, step: int, stats: dict, cpu_seconds: float) -> None:
        self.step, self.cpu_seconds = step, cpu_seconds
        self.history.append(stats)
        if step % self.settings.checkpoint_every == 0:
            self.save()

    def metrics(self, seconds: float) -> dict:
        last = self.history[-50:]
        steps_per_epoch = self.data.steps_per_epoch
        return {
            "model": self.entry.name,
            "description": self.entry.description,
            "config": asdict(self.config),
            "settings": asdict(self.settings),
            "steps": self.step,
            "epochs": None if steps_per_epoch is None else self.step / steps_per_epoch,
            "train_cpu_seconds": self.cpu_seconds,
            "train_seconds_this_session": seconds,
            "last_steps_mean": {key: sum(s[key] for s in last) / len(last) for key in last[0]} if last else {},
        }

    @torch.no_grad()
    def write_pictures(self, directory: Path) -> list[str]:
        """The model's PNG grids in ``directory``; the random number generators are left as they were, so that
        training goes on as if no picture had been drawn."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.model.eval()
            pictures = self.entry.pictures(
                self.model, self.data, torch.Generator().manual_seed(self.settings.seed), self.config
            )
            self.model.train()
        for name, (images, columns, shape) in pictures.items():
            save_grid(directory / name, images, columns, shape)
        return sorted(pictures)
