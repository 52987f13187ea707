"""Train the adversarial and disentangling models: ``python -m models.train_adversarial --model infogan``.

Models: ``beta-vae`` and ``factor-vae`` (on the shapes dataset, :mod:`models.shapes`, by default),
``infogan``, ``aae``, ``avb`` and ``bigan`` (on MNIST, read through :mod:`models.data`). Writes to
a run directory (``--out``, default ``runs/<model>-<data>-<n>`` with the first free n; one that
holds a run is never written to without ``--resume``): ``checkpoint.pt`` every
``--checkpoint-every`` steps and at the end (``--resume`` continues it exactly: parameters, every
player's optimiser, noise and data order as in a run that never stopped), ``samples.png``,
``reconstructions.png`` for the models with an encoder, latent traversals (``traversals.png``
for the VAEs, ``traversal-<code>.png`` for InfoGAN's codes) and ``metrics.json``. Training stops
after ``--steps`` steps or ``--budget`` CPU minutes of this process, whichever comes first; a
statistic that is not finite stops it with a message.

Examples::

    python -m models.train_adversarial --model factor-vae --gamma 10 --steps 2000
    python -m models.train_adversarial --model infogan --steps 3000 --label-smoothing 0.1
    python -m models.train_adversarial --model aae --prior mixture --condition discriminator
    python -m models.train_adversarial --model bigan --feature-matching --virtual-batch-norm
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import _cli
from .adversarial import TECHNIQUE_NAMES, Optimizers, Techniques
from .data import default_data_dir, load_dataset
from .factorvae import FactorVAE, latent_traversals
from .gans import AAE, AVB, BiGAN, CONDITIONS, InfoGAN, PRIORS
from .iwae import reconstruction_rows, save_grid
from .shapes import Shapes
from .train import epoch_batches, free_run_dir, test_input
from .zoo import VAE

MODELS = ("beta-vae", "factor-vae", "infogan", "aae", "avb", "bigan")
VAE_MODELS = ("beta-vae", "factor-vae")
DATA = ("shapes", "mnist")
DEFAULT_LATENT = {"beta-vae": 10, "factor-vae": 10, "aae": 2, "avb": 8, "bigan": 16, "infogan": 62}
# Which improved-GAN options each model takes: those that fit its players (AVB's adversary must stay a
# calibrated density ratio, so it takes none; feature matching and VBN need a generator of images).
TECHNIQUES = {"infogan": InfoGAN.SUPPORTED, "bigan": BiGAN.SUPPORTED, "aae": AAE.SUPPORTED, "avb": AVB.SUPPORTED,
              "beta-vae": (), "factor-vae": ()}
RESUMABLE = ("steps", "budget", "checkpoint_every", "no_progress")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models.train_adversarial", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="factor-vae")
    parser.add_argument("--data", choices=DATA, help="default: shapes for the VAEs, mnist for the others")
    parser.add_argument("--data-dir", type=Path, help="holds mnist/*.gz (default: $VAEKERNELS_DATA or ../shared/data)")
    parser.add_argument("--out", type=Path, help="run directory (default: runs/<model>-<data>-<n>, n the first free)")
    _cli.add_resume_arg(parser)
    parser.add_argument("--steps", type=int, help="optimiser steps (of every player) in all (default 1000)")
    parser.add_argument("--budget", type=float, help="stop after this many CPU minutes of this process as well")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3 for the VAEs, 2e-4 otherwise)")
    parser.add_argument("--latent-dim", type=int, help="latent units (InfoGAN: incompressible noise); default "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_LATENT.items()))
    parser.add_argument("--hidden-dim", type=int, default=512, help="hidden units of the MNIST models' MLPs")
    parser.add_argument("--beta", type=float, default=1.0, help="beta-vae, factor-vae: KL weight")
    parser.add_argument("--gamma", type=float, default=10.0, help="factor-vae: weight of the total correlation")
    parser.add_argument("--categories", type=int, default=10, help="infogan: values of the categorical code")
    parser.add_argument("--continuous", type=int, default=2, help="infogan: continuous codes, uniform on [-1, 1]")
    parser.add_argument("--info-weight", type=float, default=1.0, help="infogan: lambda of the information term")
    parser.add_argument("--prior", choices=PRIORS, default="gaussian", help="aae: the code's prior")
    parser.add_argument("--condition", choices=CONDITIONS, default="none",
                        help="aae: one-hot label into the discriminator (with the prior's matching part) or decoder")
    parser.add_argument("--noise-dim", type=int, default=8, help="avb: noise units into the black-box encoder")
    parser.add_argument("--feature-matching", action="store_true", help="improved GAN: generator matches D features")
    parser.add_argument("--historical-averaging", type=float, default=0.0, metavar="WEIGHT",
                        help="improved GAN: weight of ||theta - mean of past theta||^2")
    parser.add_argument("--label-smoothing", type=float, default=0.0, metavar="ALPHA",
                        help="improved GAN: one-sided, real target 1 - ALPHA")
    parser.add_argument("--virtual-batch-norm", action="store_true",
                        help="improved GAN: the generator's normalisation against a fixed reference batch")
    parser.add_argument("--limit-train", type=int, metavar="N", help="mnist: train on the first N training images")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 keeps a shared "
                                                    "machine's budget from going to threads waiting on each other)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The CLI's arguments, checked: a bad combination exits with a message saying what to change."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "latent_dim", "hidden_dim", "categories", "continuous", "noise_dim",
                 "limit_train", "checkpoint_every", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    for name in ("lr", "budget"):
        value = getattr(args, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            parser.error(f"--{name} must be a positive number, got {value}")
    for name in ("beta", "gamma", "info_weight", "historical_averaging"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.label_smoothing < 1:
        parser.error(f"--label-smoothing must lie in [0, 1), got {args.label_smoothing}")
    if args.data is None:
        args.data = "shapes" if args.model in VAE_MODELS else "mnist"
    if args.model not in VAE_MODELS and args.data != "mnist":
        parser.error(f"--model {args.model} trains on --data mnist, got {args.data}")
    if args.model in VAE_MODELS and args.data != "shapes":
        parser.error(f"--model {args.model} (the 64x64 conv64 network) trains on --data shapes, got {args.data}; "
                     f"python -m models.train has the zoo's VAEs for MNIST")
    if args.model == "factor-vae" and args.batch_size < 4:
        parser.error(f"--model factor-vae needs --batch-size >= 4 (two halves), got {args.batch_size}")
    if args.model == "aae" and args.prior != "gaussian" and args.latent_dim not in (None, 2):
        parser.error(f"--prior {args.prior} is 2-D: --latent-dim must be 2, got {args.latent_dim}")
    techniques = techniques_of(vars(args))
    on = [name for name in TECHNIQUE_NAMES if getattr(techniques, name) and name not in TECHNIQUES[args.model]]
    if on:
        parser.error(f"--model {args.model} does not take --{on[0].replace('_', '-')} (it takes "
                     f"{', '.join('--' + t.replace('_', '-') for t in TECHNIQUES[args.model]) or 'none of them'})")
    if args.out is not None:
        _cli.check_run_dir(parser, args.out, args.resume)
    elif args.resume:
        parser.error("--resume needs --out RUN_DIR holding checkpoint.pt")
    return args


def techniques_of(settings: dict) -> Techniques:
    return Techniques(**{name: settings[name] for name in TECHNIQUE_NAMES})


def build_model(settings: dict, data_dim: int, image_shape) -> torch.nn.Module:
    """The model a run's settings describe."""
    name = settings["model"]
    latent = settings["latent_dim"] or DEFAULT_LATENT[name]
    techniques = techniques_of(settings)
    hidden = settings["hidden_dim"]
    if name == "beta-vae":
        return VAE(data_dim, image_shape, arch="conv64", latent_dim=latent, beta=settings["beta"])
    if name == "factor-vae":
        return FactorVAE(data_dim, image_shape, arch="conv64", latent_dim=latent, beta=settings["beta"],
                         gamma=settings["gamma"])
    if name == "infogan":
        return InfoGAN(data_dim, image_shape, noise_dim=latent, categories=settings["categories"],
                       continuous=settings["continuous"], hidden_dim=hidden, info_weight=settings["info_weight"],
                       techniques=techniques)
    if name == "aae":
        return AAE(data_dim, image_shape, latent_dim=latent, hidden_dim=hidden, prior=settings["prior"],
                   condition=settings["condition"], techniques=techniques)
    if name == "avb":
        return AVB(data_dim, image_shape, latent_dim=latent, hidden_dim=hidden, noise_dim=settings["noise_dim"])
    return BiGAN(data_dim, image_shape, latent_dim=latent, hidden_dim=hidden, techniques=techniques)


class ShapesStream:
    """An endless stream of shapes batches, batch t a function of (seed, t) alone, so --resume sees the same."""

    def __init__(self, shapes: Shapes, batch_size: int, seed: int):
        self.shapes, self.batch_size, self.seed = shapes, batch_size, seed

    def batch(self, step: int):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        images, factors = self.shapes.sample(self.batch_size, generator)
        return images.flatten(1).float(), factors

    def test(self, count: int):
        images, _ = self.shapes.sample(count, torch.Generator().manual_seed(self.seed - 1))  # no step draws seed - 1
        return images.flatten(1).float(), None


class MnistStream:
    """MNIST batches as :mod:`models.train` makes them (dynamically binarised for the likelihood models,
    intensities in [0, 1] for the GANs), epoch order a function of (seed, epoch)."""

    def __init__(self, data, batch_size: int, seed: int, binary: bool, limit: int | None):
        self.data, self.batch_size, self.seed, self.limit = data, batch_size, seed, limit
        self.likelihood = "bernoulli" if binary else "gaussian"  # what to_model_input turns intensities into
        self.steps_per_epoch = math.ceil(len(data.train[:limit]) / batch_size)
        self._epoch, self._batches = None, None

    def batch(self, step: int):
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = epoch_batches(self.data.train, self.data.train_labels, False, self.likelihood,
                                          self.batch_size, self.seed, epoch, self.limit)
        return self._batches[index]

    def test(self, count: int):
        return test_input(self.data, {"seed": self.seed, "likelihood": self.likelihood}, count)


def players(model) -> dict:
    return model.players() if hasattr(model, "players") else {"model": list(model.parameters())}


def train_step(model, x, y, generator, optimizers: Optimizers) -> dict:
    """One step of every player: the model's own ``train_step``, or one Adam step on a zoo model's loss."""
    if hasattr(model, "train_step"):
        return model.train_step(x, y, generator, optimizers)
    loss, stats = model(x, y, generator)
    optimizers.step("model", loss)
    return {"loss": loss.detach(), **stats}


@torch.no_grad()
def save_pictures(model, stream, out: Path, seed: int) -> list[str]:
    """The run's PNG grids; returns their names."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    x, y = stream.test(50)
    image_shape = model.image_shape
    if isinstance(model, VAE):
        pictures = {"samples.png": (model.sample(100, None, generator), 10),
                    "reconstructions.png": (reconstruction_rows(x, model.reconstruct(x)), 10),
                    "traversals.png": (latent_traversals(model, x[0], torch.linspace(-2.5, 2.5, 10), x), 10)}
    else:
        pictures = model.pictures(x, y, generator)
    for name, (images, columns) in pictures.items():
        save_grid(out / name, images, columns, image_shape)
    model.train()
    return sorted(pictures)


def load_stream(settings: dict):
    if settings["data"] == "shapes":
        return ShapesStream(Shapes(), settings["batch_size"], settings["seed"]), 64 * 64, (64, 64)
    data = load_dataset("mnist", settings["data_dir"] or default_data_dir())
    binary = settings["model"] in ("aae", "avb")  # the Bernoulli decoders; the GANs draw intensities
    return MnistStream(data, settings["batch_size"], settings["seed"], binary, settings["limit_train"]), 784, (28, 28)


def train(settings: dict, checkpoint: Path | None = None):
    """Trains the model ``settings`` describe into ``settings["out"]``; returns (model, metrics)."""
    out = Path(settings["out"])
    stream, data_dim, image_shape = load_stream(settings)
    torch.manual_seed(settings["seed"])
    model = build_model(settings, data_dim, image_shape)
    lr = settings["lr"] or (1e-3 if settings["model"] in VAE_MODELS else 2e-4)
    # GANs train with Adam's beta1 = 0.5 (Radford et al.); the VAEs with the usual 0.9.
    optimizers = Optimizers(players(model), lr, (0.9, 0.999) if settings["model"] in VAE_MODELS else (0.5, 0.999))
    noise = torch.Generator().manual_seed(settings["seed"] * 7919)
    history = []
    if checkpoint is not None:
        history = _cli.load_training_state(checkpoint, torch.device("cpu"), model, optimizers, {"noise": noise})
    out.mkdir(parents=True, exist_ok=True)
    _cli.write_json(out / "settings.json", settings)
    step = len(history)
    bar = tqdm(total=settings["steps"], initial=step, unit="step", desc=f"{settings['model']} on {settings['data']}",
               disable=settings["no_progress"], dynamic_ncols=True)
    budget = math.inf if settings["budget"] is None else settings["budget"] * 60
    started, wall_started = time.process_time(), time.perf_counter()

    def save():
        _cli.save_training_state(out / "checkpoint.pt", model, optimizers, {"noise": noise}, history, settings)

    model.train()
    while step < settings["steps"] and time.process_time() - started < budget:
        x, y = stream.batch(step)
        stats = {key: float(value) for key, value in train_step(model, x, y, noise, optimizers).items()}
        if not all(math.isfinite(value) for value in stats.values()):
            bar.close()
            raise SystemExit(f"python -m models.train_adversarial: a statistic became non-finite at step {step + 1}: "
                             f"{stats}; stopped. The last checkpoint in {out} is from before it: lower --lr, "
                             f"then --resume.")
        history.append(stats)
        step += 1
        bar.update()
        bar.set_postfix({key: f"{value:.3g}" for key, value in stats.items()}, refresh=False)
        if step % settings["checkpoint_every"] == 0:
            save()
    bar.close()
    save()
    pictures = save_pictures(model, stream, out, settings["seed"])
    last = history[-min(len(history), 50):]
    metrics = {"settings": settings, "steps": step, "train_cpu_seconds": time.process_time() - started,
               "train_seconds": time.perf_counter() - wall_started, "pictures": pictures,
               "last_50_steps": {key: sum(s[key] for s in last) / len(last) for key in last[0]} if last else {}}
    _cli.write_json(out / "metrics.json", metrics)
    return model, metrics


def main(argv=None):
    """The CLI; returns (model, metrics) (the metrics are also in ``<out>/metrics.json``)."""
    args = parse_args(argv)
    if args.resume:
        checkpoint = args.out / "checkpoint.pt"
        settings = dict(torch.load(checkpoint, weights_only=False)["settings"])
        settings.update({key: getattr(args, key) for key in RESUMABLE if getattr(args, key) not in (None, False)})
    else:
        checkpoint = None
        settings = _cli.json_settings(args)
        settings["out"] = str(args.out or free_run_dir(Path("runs"), f"{args.model}-{args.data}"))
        settings["steps"] = settings["steps"] or 1000
        settings["checkpoint_every"] = settings["checkpoint_every"] or 500
    if args.threads:
        torch.set_num_threads(args.threads)
    model, metrics = train(settings, checkpoint)
    if not settings["no_progress"]:
        print(f"trained {settings['model']} for {metrics['steps']} steps; run written to {settings['out']}")
    return model, metrics


if __name__ == "__main__":
    try:
        main()
    except FileNotFoundError as error:  # missing data: the message says which file to place where
        raise SystemExit(f"python -m models.train_adversarial: {error}") from None
