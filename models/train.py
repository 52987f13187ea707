"""Train any model of the zoo on real data: ``python -m models.train --model iwae --k 5 --data mnist``.

Writes to a run directory (``--out``, default ``runs/<model>-<data>-<n>`` with the first free n; an
existing non-empty directory is never written to without ``--resume``): ``checkpoint.pt`` every
``--checkpoint-every`` steps and at the end, ``reconstructions.png`` (test images, each row
followed by its reconstruction) and ``samples.png`` (draws from the prior), ``history.json``.
``--resume`` continues from the checkpoint exactly: same parameters, optimiser state, noise and
data order as a run that never stopped. A loss that is not finite stops the run with a message.
Several processes (``torchrun --nproc_per_node N -m models.train ...``) train with DDP, each on
its share of every batch (NCCL on GPUs, gloo on CPU).

Examples::

    python -m models.train --model iwae --k 5 --data mnist --data-dir ../shared/data --epochs 1
    python -m models.train --model geco --tolerance 60 --data mnist --steps 2000
    python -m models.train --model vae --likelihood logistic --arch conv --data frey
    python -m models.evaluate runs/iwae-mnist-0/checkpoint.pt
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import _cli
from .data import DATASETS, default_data_dir, load_dataset, to_model_input
from .iwae import reconstruction_rows, save_grid
from .zoo import ARCHITECTURES, ESTIMATORS, LIKELIHOODS, MODELS, build_model

# What a resumed run may change; everything else comes from the checkpoint.
RESUMABLE = ("epochs", "steps", "checkpoint_every", "no_progress")
DEFAULT_LATENT = {"hvae": 100, "hiwae": 100}  # Burda et al.'s two-layer model: z1 100, z2 50
DEFAULT_HIDDEN = {"hvae": 100, "hiwae": 100}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="vae")
    parser.add_argument("--data", choices=DATASETS, default="mnist")
    parser.add_argument("--data-dir", type=Path, help="dataset directory (default: $VAEKERNELS_DATA or ../shared/data)")
    parser.add_argument("--download", action="store_true", help="fetch missing data files from their canonical URLs")
    parser.add_argument("--out", type=Path, help="run directory (default: runs/<model>-<data>-<n>, n the first free)")
    _cli.add_resume_arg(parser)
    parser.add_argument("--arch", choices=ARCHITECTURES, default="mlp")
    parser.add_argument("--likelihood", choices=LIKELIHOODS, default="bernoulli")
    parser.add_argument("--k", type=int, default=1, help="samples per example (bound or averaged ELBO)")
    parser.add_argument("--estimator", choices=ESTIMATORS, default="iwae", help="IWAE gradient estimator")
    parser.add_argument("--beta", type=float, help="KL weight (vae: 1, beta-vae: 0.5 as in the seed table)")
    parser.add_argument("--gamma", type=float, default=100.0, help="capacity-vae: weight of |KL - C|")
    parser.add_argument("--capacity-max", type=float, default=25.0, help="capacity-vae: C_max in nats")
    parser.add_argument("--capacity-steps", type=int, default=10000, help="capacity-vae: steps to reach C_max")
    parser.add_argument("--tolerance", type=float, default=60.0,
                        help="geco, geco-iwae, vhp-vae: kappa^2, the bound on E[-log p(x|z)] in nats per example")
    parser.add_argument("--geco-alpha", type=float, default=0.99, help="moving-average factor of the constraint")
    parser.add_argument("--geco-rate", type=float, default=1e-4, help="log lambda step per nat of constraint")
    parser.add_argument("--prior-k", type=int, default=8, help="vhp-vae: samples of zeta in the prior's bound")
    parser.add_argument("--latent-dim", type=int, help="latent units (50; 100 for z1 of hvae/hiwae)")
    parser.add_argument("--hidden-dim", type=int, help="hidden units (200; 100 for hvae/hiwae)")
    parser.add_argument("--epochs", type=int, help="epochs in all, counting resumed ones (default 10)")
    parser.add_argument("--steps", type=int, help="stop after this many optimiser steps in all")
    parser.add_argument("--batch-size", type=int, default=100, help="global batch, split over processes")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--limit-train", type=int, metavar="N", help="train on the first N training images")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The CLI's arguments, checked: a bad combination exits with a message saying what to change."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("k", "batch_size", "epochs", "steps", "checkpoint_every", "prior_k", "latent_dim", "hidden_dim",
                 "limit_train", "capacity_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if not args.lr > 0 or not math.isfinite(args.lr):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.model == "geco-iwae" and args.estimator == "dreg":
        parser.error("--model geco-iwae takes --estimator iwae or stl, got dreg (DReG would reweight the "
                     "constraint's gradient too)")
    if args.model in ("hvae", "hiwae") and args.estimator != "iwae":
        parser.error(f"--model {args.model} takes only --estimator iwae, got {args.estimator}")
    if args.model == "cvae" and args.data == "binarized-mnist":
        parser.error("--model cvae needs labels; --data binarized-mnist has none (use --data mnist or caltech)")
    if args.resume:
        if args.out is None or not (args.out / "checkpoint.pt").is_file():
            parser.error(f"--resume needs --out RUN_DIR holding checkpoint.pt; {args.out}/checkpoint.pt does not exist")
    # Only rank 0 checks: the other processes would find the directory it has just started.
    elif args.out is not None and args.out.is_dir() and any(args.out.iterdir()) and os.environ.get("RANK", "0") == "0":
        parser.error(f"{args.out} already holds a run; pass --resume to continue it or choose another --out")
    return args


def free_run_dir(base: Path, stem: str) -> Path:
    """base/stem-n for the first n not taken yet.

    >>> free_run_dir(Path("/nonexistent"), "vae-mnist")
    PosixPath('/nonexistent/vae-mnist-0')
    """
    n = 0
    while (base / f"{stem}-{n}").exists():
        n += 1
    return base / f"{stem}-{n}"


def epoch_batches(images, labels, binary, likelihood, batch_size, seed, epoch, limit=None):
    """The epoch's shuffled batches [(x, y)], with a fresh dynamic binarisation: a function of
    (seed, epoch) alone, so a resumed run sees the same data as one that never stopped."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    images = images[:limit]
    order = torch.randperm(len(images), generator=generator)
    x = to_model_input(images[order], binary, likelihood, generator)
    y = None if labels is None else labels[:limit][order]
    return [(x[i:i + batch_size], None if y is None else y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def model_options(settings: dict, data) -> dict:
    model = settings["model"]
    beta = settings["beta"] if settings["beta"] is not None else (0.5 if model == "beta-vae" else 1.0)
    return {
        "arch": settings["arch"], "likelihood": settings["likelihood"], "k": settings["k"], "beta": beta,
        "estimator": settings["estimator"], "gamma": settings["gamma"], "capacity_max": settings["capacity_max"],
        "capacity_steps": settings["capacity_steps"], "tolerance": settings["tolerance"],
        "alpha": settings["geco_alpha"], "rate": settings["geco_rate"], "prior_k": settings["prior_k"],
        "latent_dim": settings["latent_dim"] or DEFAULT_LATENT.get(model, 50),
        "hidden_dim": settings["hidden_dim"] or DEFAULT_HIDDEN.get(model, 200),
        "num_classes": data.num_classes if model == "cvae" else 0,
    }


def make_model(settings: dict, data):
    """The model a run's settings describe (also what :mod:`models.evaluate` rebuilds)."""
    return build_model(settings["model"], data.train.shape[1], data.image_shape, **model_options(settings, data))


def test_input(data, settings, count=None):
    """The test split as model input, binarised once with a fixed seed so every evaluation sees the same data."""
    generator = torch.Generator().manual_seed(settings["seed"] + 1)
    x = to_model_input(data.test[:count], data.binary, settings["likelihood"], generator)
    return x, None if data.test_labels is None else data.test_labels[:count]


@torch.no_grad()
def save_pictures(model, data, settings, out: Path, device) -> None:
    """reconstructions.png (rows of test images, each followed by its reconstructions) and samples.png."""
    model.eval()
    columns = 10
    x, y = test_input(data, settings, 5 * columns)
    x, y = x.to(device), None if y is None else y.to(device)
    rows = len(x) // columns
    x, y = x[: rows * columns], None if y is None else y[: rows * columns]
    save_grid(out / "reconstructions.png", reconstruction_rows(x, model.reconstruct(x, y), columns), columns,
              data.image_shape)
    generator = torch.Generator(device).manual_seed(settings["seed"])
    # A conditional model draws one row per class label.
    labels = torch.arange(columns * columns, device=device) // columns % max(model.num_classes, 1)
    samples = model.sample(columns * columns, labels if model.num_classes else None, generator)
    save_grid(out / "samples.png", samples, columns, data.image_shape)
    model.train()


def _distributed(device_name: str):
    """(rank, world size, device) from torchrun's environment; one process is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device_name)
    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def main(argv=None) -> dict:
    """The CLI; returns the run's summary (also written to ``<out>/history.json``)."""
    args = parse_args(argv)
    rank, world, device = _distributed(args.device)
    checkpoint = None
    if args.resume:
        checkpoint = torch.load(args.out / "checkpoint.pt", map_location=device, weights_only=False)
        settings = dict(checkpoint["settings"])
        settings.update({key: getattr(args, key) for key in RESUMABLE if getattr(args, key) not in (None, False)})
        settings["out"] = str(args.out)
    else:
        settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        if args.out is None:
            out = [str(free_run_dir(Path("runs"), f"{args.model}-{args.data}"))]
            if world > 1:
                dist.broadcast_object_list(out)  # every process writes (nothing but) to rank 0's choice
            settings["out"] = out[0]
    out = Path(settings["out"])
    settings["epochs"] = settings["epochs"] or 10
    checkpoint_every = settings["checkpoint_every"] or 1000
    data_dir = settings["data_dir"] or default_data_dir()
    data = load_dataset(settings["data"], data_dir, download=settings["download"])

    torch.manual_seed(settings["seed"])
    model = make_model(settings, data).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"], eps=1e-4)  # eps as in Burda et al.
    noise = torch.Generator(device).manual_seed(settings["seed"] * 7919 + rank)
    step, history = 0, {"loss": [], "epochs": []}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        noise.set_state(checkpoint["noise"][rank].cpu() if device.type == "cpu" else checkpoint["noise"][rank])
        step, history = checkpoint["step"], checkpoint["history"]
        if checkpoint["world_size"] != world:
            raise SystemExit(f"python -m models.train: {out} was trained with {checkpoint['world_size']} "
                             f"process(es); resume it with the same number, got {world}")
    trainer = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _cli.write_json(out / "settings.json", settings)
    steps_per_epoch = math.ceil(len(data.train[: settings["limit_train"]]) / settings["batch_size"])
    total_steps = min(settings["steps"] or math.inf, settings["epochs"] * steps_per_epoch)
    progress = not settings["no_progress"] and rank == 0
    bar = tqdm(total=total_steps if math.isfinite(total_steps) else None, initial=step, unit="step",
               desc=f"{settings['model']} on {settings['data']}", disable=not progress, dynamic_ncols=True)

    def save():
        noises = [None] * world
        state = noise.get_state()
        if world > 1:
            dist.all_gather_object(noises, state)
        else:
            noises = [state]
        if rank == 0:
            _cli.save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "noise": noises,
                                  "step": step, "history": history, "settings": settings, "world_size": world},
                                 out / "checkpoint.pt")
            _cli.write_json(out / "history.json", {"settings": settings, "step": step, "history": history})
            save_pictures(model, data, settings, out, device)

    model.train()
    started = time.perf_counter()
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        batches = epoch_batches(data.train, data.train_labels, data.binary, settings["likelihood"],
                                settings["batch_size"], settings["seed"], epoch, settings["limit_train"])
        epoch_losses = []
        for x, y in batches[skip:]:
            x, y = x[rank::world].to(device), None if y is None else y[rank::world].to(device)
            loss, stats = trainer(x, y, noise)
            if not torch.isfinite(loss):
                bar.close()
                raise SystemExit(
                    f"python -m models.train: the loss became {loss.item()} at step {step + 1} (epoch {epoch + 1}) "
                    f"with stats { {key: float(value) for key, value in stats.items()} }; stopped. The last "
                    f"checkpoint in {out} is from before it: lower --lr or check the data, then --resume.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            history["loss"].append(loss.item())
            epoch_losses.append(history["loss"][-1])
            bar.update()
            bar.set_postfix({key: f"{float(value):.3g}" for key, value in {"loss": loss.detach(), **stats}.items()},
                            refresh=False)
            if step % checkpoint_every == 0 and step < total_steps:
                save()
            if step >= total_steps:
                break
        history["epochs"].append({"epoch": epoch + 1, "steps": step, "mean_loss": sum(epoch_losses) / len(epoch_losses),
                                  "seconds": time.perf_counter() - started})
    bar.close()
    save()
    if world > 1:
        dist.barrier()  # the others wait while rank 0 writes, then all leave together
        dist.destroy_process_group()
    if rank == 0 and progress:
        print(f"trained {settings['model']} for {step} steps; run written to {out} "
              f"(evaluate with: python -m models.evaluate {out / 'checkpoint.pt'})")
    return {"settings": settings, "step": step, "history": history, "out": str(out)}


if __name__ == "__main__":
    try:
        main()
    except FileNotFoundError as error:  # missing data: the message says which file to place where
        raise SystemExit(f"python -m models.train: {error}") from None
