"""Every reference model by name: its options (a config dataclass with the defaults it trains at), how to
build it, the data it trains on, the scalar it minimises or the step that updates its players, the
pictures it draws and how it is evaluated.

``python -m models train NAME`` trains :data:`MODELS` ``[NAME]`` through the one
:class:`~models.training.trainer.Trainer`; the model-step benchmark (``bench/test_models.py``) and the
compile tests take :data:`REGISTRY`, the models whose training step is benchmarked, so a model added
there is measured and compiled without more code.

Example::

    >>> entry = MODELS["iwae-k5"]
    >>> _ = torch.manual_seed(0)
    >>> model = entry.build(**entry.small)
    >>> x, y = entry.batch(torch.Generator().manual_seed(0), 4)
    >>> entry.loss(model, (x, y)).shape
    torch.Size([])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import vaekernels
from models.adversarial import TECHNIQUE_NAMES, Techniques
from models.adversarial.factorvae import FactorVAE, latent_traversals
from models.adversarial.gans import AAE, AVB, CONDITIONS, PRIORS, BiGAN, InfoGAN
from models.autoregressive.pixelcnnpp import MixtureModel, PixelCNNPlusPlus
from models.autoregressive.pixelsnail import PixelSNAIL
from models.autoregressive.pixelvae import GatedDecoder, LatentAutoregressiveModel
from models.autoregressive.vlae import LocalWindowDecoder
from models.data import Batches, default_data_dir, dynamic_binarize, load_dataset, to_model_input
from models.data.shapes import Shapes, ShapesBatches
from models.flows.irevnet import IRevNet
from models.flows.nice import NICE, bits_per_dim, dequantised
from models.flows.revnet import MODES, RevNet
from models.jacobian.grae import Autoencoder
from models.metrics import likelihood as zoo_metrics
from models.seeds import BURDA_ONE_LAYER, BURDA_TWO_LAYERS, TAMING, VLAE_NLL
from models.training.pictures import reconstruction_rows
from models.training.trainer import Optimizers, Settings
from models.vae.zoo import ARCHITECTURES, ESTIMATORS, LIKELIHOODS, VAE, build_model

Batch = tuple


def option(default, help: str, choices=None):
    """A config field: its default, its --help line and its choices, which ``python -m models train`` reads."""
    return field(default=default, metadata={"help": help, "choices": choices})


MEASURED_ON = (
    "the development machine: one thread (OMP_NUM_THREADS=1) of an AMD EPYC core, the machine's other core busy "
    "with other work; torch 2.13.0+cpu; a clone of commit 0a4424a, 2026-12-06"
)
"""Where the numbers of :attr:`Reproduction.reached` were measured."""


@dataclass(frozen=True)
class Reproduction:
    """A model's ``reproduce`` preset: what ``python -m models reproduce NAME`` runs and what it reached.

    - ``steps``: the budget; ``options``: ``train`` options beyond the model's defaults (flags as on the command
      line); then ``evaluate`` on the first ``limit`` test images (the likelihood VAEs' NLL with ``num_samples``
      importance samples);
    - ``metrics``: the numbers it reports, the evaluation's keys and ``train_<statistic>`` (the mean over the last
      50 steps of a training statistic);
    - ``reached``: those numbers from a whole run of the preset on :data:`MEASURED_ON` (None: not yet measured),
      with ``train_cpu_seconds``;
    - ``seed``: metric -> (the lecture notes' number for it, where it is from), where the seeds give one.

    >>> MODELS["iwae-k50"].reproduce.seed["nll"]
    (84.78, 'seed 001, Burda et al. Table 1: IWAE, k = 50')
    """

    steps: int
    metrics: tuple[str, ...]
    options: tuple[str, ...] = ()
    limit: int = 1000
    num_samples: int = 1000
    reached: dict | None = None
    seed: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelEntry:
    """One model.

    - ``config``: the dataclass of its options; ``options`` names the fields that apply to this model (the
      others keep their defaults), ``defaults`` this model's own defaults for them;
    - ``make(config)``: the model; :meth:`build` makes it from ``defaults`` and keyword overrides (``small``:
      overrides that give a small model of the same structure, for tests);
    - ``data(config, settings)``: the run's :class:`models.data.Batches`; ``batch(generator, batch_size=None)``:
      one made-up training batch of the data's shape and range (the benchmarks' and compile tests');
    - ``loss(model, batch)``: the scalar it minimises, or ``train_step(model, optimizers, batch)``, one update
      of each of its players (adversarial models), returning its statistics;
    - ``pictures(model, batches, generator, config)``: PNG name -> (images, columns, image shape);
    - ``evaluate(model, batches, options)``: the test metrics;
    - ``reproduce``: its :class:`Reproduction` preset (:data:`REPRODUCTIONS`).
    """

    name: str
    description: str
    config: type
    make: Callable
    data: Callable
    pictures: Callable
    evaluate: Callable
    loss: Callable[[nn.Module, Batch], torch.Tensor] | None = None
    train_step: Callable[[nn.Module, Optimizers, Batch], dict] | None = None
    options: tuple[str, ...] = ()
    defaults: dict = field(default_factory=dict)
    small: dict = field(default_factory=dict)
    batch: Callable[..., Batch] | None = None
    batch_size: int = 100
    lr: float = 1e-3
    adam_eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)
    budget: dict = field(default_factory=lambda: {"epochs": 10})
    benchmarked: bool = True
    family: str = "vae"
    reproduce: Reproduction | None = None

    def default_config(self):
        return self.config(**self.defaults)

    def build(self, config=None, **overrides) -> nn.Module:
        """The model of ``config`` (default: this model's defaults), with ``overrides`` of its fields."""
        return self.make(replace(config or self.default_config(), **overrides))

    def players(self, model: nn.Module) -> dict:
        return model.players() if self.train_step is not None else {"model": list(model.parameters())}

    def optimizer(self, model: nn.Module, lr: float | None = None) -> Optimizers:
        """Adam for each player (the one player ``"model"`` of a model that minimises one loss)."""
        return Optimizers(self.players(model), lr or self.lr, self.betas, self.adam_eps)

    def update(self, model: nn.Module, optimizers: Optimizers, batch: Batch, loss_fn=None) -> dict:
        """One training step; its statistics (``"loss"`` among them). ``loss_fn`` (default :attr:`loss`) may be
        a compiled version of the loss."""
        if self.train_step is not None:
            return self.train_step(model, optimizers, batch)
        return {"loss": optimizers.step("model", (loss_fn or self.loss)(model, batch))}

    def step(self, model: nn.Module, optimizers: Optimizers, batch: Batch, loss_fn=None) -> torch.Tensor:
        """One training step; its loss."""
        return self.update(model, optimizers, batch, loss_fn)["loss"]


def mean_test_loss(loss, model, batches, limit: int | None) -> tuple[float, int]:
    """The mean of ``loss`` (a model's training loss) over the first ``limit`` test images, in batches of 100;
    and how many images that was."""
    x, y = batches.test(limit)
    device = next(model.parameters()).device
    total = sum(
        loss(model, (xb.to(device), None if y is None else y[i : i + 100].to(device))).item() * len(xb)
        for i, xb in zip(range(0, len(x), 100), x.split(100), strict=True)
    )
    return total / len(x), len(x)


# --- data -----------------------------------------------------------------------------------------------------

MNIST_PIXELS = 28 * 28
# Image shape and number of classes of each dataset the models train on.
DATA = {
    "mnist": ((28, 28), 10),
    "binarized-mnist": ((28, 28), 0),
    "frey": ((28, 20), 0),
    "caltech": ((28, 28), 101),
    "shapes": ((64, 64), 0),
}


def mnist_batches(prepare, labels: bool = False):
    """The data of a model on MNIST: ``prepare(uint8 images [B, 784], generator)`` makes its input."""

    def data(config, settings) -> Batches:
        dataset = load_dataset("mnist", settings.data_dir or default_data_dir(), download=settings.download)
        return Batches(dataset, prepare, settings.batch_size, settings.seed, settings.limit_train, labels)

    return data


def binarized_images(images, generator):
    return dynamic_binarize(images, generator).unflatten(1, (1, 28, 28))


def signed_images(images, generator):
    """256-level images in [-1, 1], [B, 1, 28, 28]."""
    return (images.float() / 127.5 - 1).unflatten(1, (1, 28, 28))


def unit_images(images, generator):
    return images.float() / 255


def binary_digits(default_batch: int, image_shape=(MNIST_PIXELS,), labels: bool = True):
    """Batches of binary images about as dense as binarised MNIST's strokes (13% ones), with labels."""

    def batch(generator: torch.Generator, batch_size: int | None = None) -> Batch:
        n = batch_size or default_batch
        x = torch.bernoulli(torch.full((n, *image_shape), 0.13), generator=generator)
        return x, torch.randint(0, 10, (n,), generator=generator) if labels else None

    return batch


def byte_digits(default_batch: int, scale: str):
    """Batches of 256-level images [B, 1, 28, 28]: in [-1, 1] (``"signed"``) or [0, 1] flattened (``"unit"``)."""

    def batch(generator: torch.Generator, batch_size: int | None = None) -> Batch:
        levels = torch.randint(0, 256, (batch_size or default_batch, 1, 28, 28), generator=generator).float()
        x = levels / 127.5 - 1 if scale == "signed" else (levels / 255).flatten(1)
        return x, None

    return batch


def shapes_batch(default_batch: int):
    shapes = Shapes()

    def batch(generator: torch.Generator, batch_size: int | None = None) -> Batch:
        images, _ = shapes.sample(batch_size or default_batch, generator)
        return images.flatten(1).float(), None

    return batch


# --- the likelihood zoo (models.vae.zoo) ---------------------------------------------------------------------------


@dataclass
class ZooConfig:
    data: str = option("mnist", "dataset (shapes: the procedural 64x64 shapes, with --arch conv64)", tuple(DATA))
    arch: str = option("mlp", "encoder and decoder networks", ARCHITECTURES)
    likelihood: str = option("bernoulli", "p(x|z)", LIKELIHOODS)
    latent_dim: int = option(50, "latent units (z1 of the two-layer models)")
    hidden_dim: int = option(200, "hidden units")
    k: int = option(1, "samples per example (the bound's, or the averaged ELBO's)")
    estimator: str = option("iwae", "IWAE gradient estimator", ESTIMATORS)
    beta: float = option(1.0, "KL weight")
    gamma: float = option(100.0, "weight of |KL - C|")
    capacity_max: float = option(25.0, "C_max in nats")
    capacity_steps: int = option(10000, "steps to reach C_max")
    tolerance: float = option(60.0, "kappa^2, the bound on E[-log p(x|z)] in nats per example")
    alpha: float = option(0.99, "moving-average factor of GECO's constraint")
    rate: float = option(1e-4, "GECO's log lambda step per nat of constraint")
    prior_k: int = option(8, "samples of zeta in the hierarchical prior's bound")


ZOO_COMMON = ("data", "arch", "likelihood", "latent_dim", "hidden_dim", "k", "beta")
GECO = ("tolerance", "alpha", "rate")


def zoo_model(method: str):
    def make(config: ZooConfig) -> VAE:
        image_shape, classes = DATA[config.data]
        if method == "cvae" and not classes:
            raise ValueError(f"models: cvae needs labels; --data {config.data} has none")
        options = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "data"}
        return build_model(method, math.prod(image_shape), image_shape, num_classes=classes, **options)

    return make


def zoo_data(labels: bool):
    def data(config: ZooConfig, settings):
        if config.data == "shapes":
            return ShapesBatches(Shapes(), settings.batch_size, settings.seed)
        dataset = load_dataset(config.data, settings.data_dir or default_data_dir(), download=settings.download)
        return Batches(
            dataset,
            functools.partial(_zoo_input, dataset.binary, config.likelihood),
            settings.batch_size,
            settings.seed,
            settings.limit_train,
            labels,
        )

    return data


def _zoo_input(binary, likelihood, images, generator):
    return to_model_input(images, binary, likelihood, generator)


def zoo_loss(net, batch):
    return net(*batch)[0]


def vae_pictures(model, batches, generator, config) -> dict:
    """reconstructions.png (rows of test images, each followed by its reconstructions), samples.png (a
    conditional model: one row per class) and, on the shapes, traversals.png."""
    columns, shape = 10, batches.image_shape
    x, y = batches.test(5 * columns)
    device = next(model.parameters()).device
    x, y = x.to(device), None if y is None else y.to(device)
    labels = torch.arange(columns * columns, device=device) // columns % max(model.num_classes, 1)
    pictures = {
        "reconstructions.png": (reconstruction_rows(x, model.reconstruct(x, y), columns), columns, shape),
        "samples.png": (
            model.sample(columns * columns, labels if model.num_classes else None, generator),
            columns,
            shape,
        ),
    }
    if isinstance(batches, ShapesBatches):
        traversals = latent_traversals(model, x[0], torch.linspace(-2.5, 2.5, columns), x)
        pictures["traversals.png"] = (traversals, columns, shape)
    return pictures


def zoo_evaluate(model, batches, options) -> dict:
    """Importance-sampled NLL, active units, ELBO surgery and reconstruction (models.metrics.likelihood)."""
    x, y = batches.test(options.get("limit"))
    device = next(model.parameters()).device
    return zoo_metrics.evaluate_model(
        model,
        x.to(device),
        None if y is None else y.to(device),
        num_samples=options["num_samples"],
        surgery_limit=2000,
        generator=torch.Generator(device).manual_seed(options["seed"]),
        progress=options["progress"],
    )


def zoo_entry(name: str, method: str, description: str, options=(), benchmarked: bool = True, **defaults):
    """A likelihood-zoo model, on binarised MNIST by default, batch 100, Adam's eps 1e-4 as in Burda et al."""
    if method == "beta-vae":
        defaults.setdefault("beta", 0.5)
    if method in ("hvae", "hiwae"):  # Burda et al.'s two-layer model: z1 100, z2 50
        defaults.update(latent_dim=100, hidden_dim=100)
    labels = method == "cvae"
    return ModelEntry(
        name,
        description,
        ZooConfig,
        zoo_model(method),
        zoo_data(labels),
        vae_pictures,
        zoo_evaluate,
        loss=zoo_loss,
        options=ZOO_COMMON + tuple(options),
        defaults=defaults,
        small={"latent_dim": 4, "hidden_dim": 16},
        batch=binary_digits(100),
        adam_eps=1e-4,
        benchmarked=benchmarked,
    )


def zoo_entries() -> list[ModelEntry]:
    return [
        zoo_entry("vae", "vae", "VAE (Kingma & Welling): MLP 784-200-200-50, Bernoulli, the k-sample ELBO"),
        zoo_entry("beta-vae", "beta-vae", "beta-VAE (Higgins et al.), beta 0.5 as in the seed table"),
        zoo_entry(
            "capacity-vae",
            "capacity-vae",
            "beta-VAE with controlled capacity (Burgess et al.)",
            ("gamma", "capacity_max", "capacity_steps"),
        ),
        zoo_entry("geco", "geco", "GECO (Rezende & Viola): min KL s.t. reconstruction <= kappa^2", GECO),
        zoo_entry("cvae", "cvae", "conditional VAE (Sohn et al.): one-hot labels into encoder and decoder"),
        zoo_entry("iwae-k5", "iwae", "IWAE (Burda et al.), k = 5", ("estimator",), k=5),
        zoo_entry("iwae-k50", "iwae", "IWAE, k = 50", ("estimator",), k=50),
        zoo_entry(
            "iwae-k50-dreg",
            "iwae",
            "IWAE, k = 50, DReG estimator (Tucker et al.)",
            ("estimator",),
            k=50,
            estimator="dreg",
        ),
        zoo_entry("geco-iwae", "geco-iwae", "GECO + IWAE, k = 5 (the seed's)", ("estimator",) + GECO, k=5),
        zoo_entry("hvae", "hvae", "two stochastic layers (Burda et al.), the k-sample ELBO", benchmarked=False),
        zoo_entry("hiwae-k5", "hiwae", "two stochastic layers, IWAE bound, k = 5", k=5),
        zoo_entry(
            "vhp-vae",
            "vhp-vae",
            "VHP-VAE (Klushyn et al.): learned hierarchical prior, constrained",
            GECO + ("prior_k",),
        ),
    ]


# --- autoregressive models -------------------------------------------------------------------------------------


@dataclass
class GatedPixelCNNConfig:
    channels: int = option(32, "feature channels")
    layers: int = option(6, "gated layers, the first a 7x7 type A")
    levels: int = option(2, "2: binarised pixels (Bernoulli), 256: the bytes (softmax)", (2, 256))


def gated_pixelcnn(config: GatedPixelCNNConfig):
    return vaekernels.nn.GatedPixelCNN(1, config.channels, config.layers, levels=config.levels, num_classes=10)


def gated_pixelcnn_data(config: GatedPixelCNNConfig, settings):
    prepare = binarized_images if config.levels == 2 else _byte_images
    return mnist_batches(prepare, labels=True)(config, settings)


def _byte_images(images, generator):
    return images.float().unflatten(1, (1, 28, 28))


def gated_pixelcnn_loss(net, batch):
    x, y = batch
    return net.nll(x, y.long()).mean()


def gated_pixelcnn_pictures(model, batches, generator, config) -> dict:
    """samples.png: a column per class, drawn with the cached sampler."""
    labels = torch.arange(10).repeat(2)
    samples = model.sample(len(labels), (28, 28), labels, generator=generator)
    return {"samples.png": (samples.flatten(1) / (config.levels - 1), 10, (28, 28))}


@dataclass
class MixtureConfig:
    filters: int = option(32, "feature channels")
    blocks: int = option(3, "gated ResNet blocks per stream (PixelSNAIL: attention blocks)")
    mixtures: int = option(5, "logistic components per pixel")
    resnets: int = option(2, "gated ResNets per attention block")
    key_channels: int = option(16, "channels of the attention's keys")
    heads: int = option(2, "attention heads")
    samples: int = option(16, "images in samples.png (drawn pixel by pixel)")


def pixelcnn_plus_plus(config: MixtureConfig):
    return MixtureModel(PixelCNNPlusPlus(1, config.filters, config.blocks, config.mixtures))


def pixelsnail(config: MixtureConfig):
    return MixtureModel(
        PixelSNAIL(1, config.filters, config.blocks, config.resnets, config.key_channels, config.heads, config.mixtures)
    )


@dataclass
class LatentAutoregressiveConfig:
    latent_dim: int = option(16, "latent units")
    channels: int = option(32, "decoder feature channels")
    samples: int = option(16, "images in samples.png (drawn pixel by pixel)")


def pixelvae(config: LatentAutoregressiveConfig):
    return LatentAutoregressiveModel(GatedDecoder(config.latent_dim, config.channels), config.latent_dim)


def vlae(config: LatentAutoregressiveConfig):
    return LatentAutoregressiveModel(LocalWindowDecoder(config.latent_dim, config.channels), config.latent_dim)


def autoregressive_loss(net, batch):
    return net.loss(batch[0]).mean()


def autoregressive_pictures(model, batches, generator, config) -> dict:
    images = model.sample(config.samples, generator)
    return {"samples.png": (images.flatten(1), math.ceil(math.sqrt(config.samples)), images.shape[-2:])}


def nats_evaluation(loss, bits: bool):
    """The test ``loss`` in nats per image (the NLL, or the negative ELBO, an upper bound on it), and in bits per
    dim where ``bits``."""

    def evaluate(model, batches, options) -> dict:
        nats, count = mean_test_loss(loss, model, batches, options.get("limit"))
        metrics = {"test_nats": nats, "test_images": count}
        if bits:
            metrics["test_bits_per_dim"] = nats / (MNIST_PIXELS * math.log(2))
        return metrics

    return evaluate


SMALL_MIXTURE = {"filters": 8, "blocks": 1, "mixtures": 2}


def autoregressive_entries() -> list[ModelEntry]:
    binary_images = binary_digits(32, (1, 28, 28), labels=False)
    common = {
        "pictures": autoregressive_pictures,
        "loss": autoregressive_loss,
        "batch_size": 32,
        "lr": 2e-3,
        "budget": {"minutes": 2.0},
        "family": "autoregressive",
    }
    return [
        ModelEntry(
            "gated-pixelcnn",
            "Gated PixelCNN (van den Oord et al.): 6 layers of 32 channels, class-conditional, binarised MNIST",
            GatedPixelCNNConfig,
            gated_pixelcnn,
            gated_pixelcnn_data,
            gated_pixelcnn_pictures,
            nats_evaluation(gated_pixelcnn_loss, False),
            loss=gated_pixelcnn_loss,
            options=("channels", "layers", "levels"),
            small={"channels": 8, "layers": 2},
            batch=binary_digits(32, (1, 28, 28)),
            batch_size=32,
            budget={"epochs": 1},
            family="autoregressive",
        ),
        ModelEntry(
            "pixelcnn++",
            "PixelCNN++ (Salimans et al.): 32 filters, 3 blocks, 5 logistics, 256-level MNIST",
            MixtureConfig,
            pixelcnn_plus_plus,
            mnist_batches(signed_images),
            evaluate=nats_evaluation(autoregressive_loss, True),
            options=("filters", "blocks", "mixtures", "samples"),
            small=SMALL_MIXTURE,
            batch=byte_digits(32, "signed"),
            **common,
        ),
        ModelEntry(
            "pixelsnail",
            "PixelSNAIL (Chen et al.): 32 filters, 2 blocks x 2 resnets, causal attention",
            MixtureConfig,
            pixelsnail,
            mnist_batches(signed_images),
            evaluate=nats_evaluation(autoregressive_loss, True),
            defaults={"blocks": 2},
            options=("filters", "blocks", "resnets", "key_channels", "heads", "mixtures", "samples"),
            small={**SMALL_MIXTURE, "resnets": 1, "key_channels": 4, "heads": 1},
            batch=byte_digits(32, "signed"),
            **common,
        ),
        ModelEntry(
            "pixelvae",
            "PixelVAE (Gulrajani et al.): latent 16, 3 gated PixelCNN layers in the decoder",
            LatentAutoregressiveConfig,
            pixelvae,
            mnist_batches(binarized_images),
            evaluate=nats_evaluation(autoregressive_loss, False),
            options=("latent_dim", "channels", "samples"),
            small={"latent_dim": 4, "channels": 8},
            batch=binary_images,
            **common,
        ),
        ModelEntry(
            "vlae",
            "VLAE (Chen et al.): latent 16, a 3x3 type-A window decoder",
            LatentAutoregressiveConfig,
            vlae,
            mnist_batches(binarized_images),
            evaluate=nats_evaluation(autoregressive_loss, False),
            options=("latent_dim", "channels", "samples"),
            small={"latent_dim": 4, "channels": 8},
            batch=binary_images,
            **common,
        ),
    ]


# --- decoder Jacobians: GRAE ------------------------------------------------------------------------------------


@dataclass
class GRAEConfig:
    arch: str = option("mlp", "networks (conv: the decoder's Jacobian on the torch.func.jvp path)", ("mlp", "conv"))
    beta: float = option(0.2, "beta (the paper's MNIST figure: 0.2 to 1)")
    columns: int = option(1, "GRAE*: Jacobian columns sampled per step (0: all of them)")
    latent_dim: int = option(8, "latent units")
    hidden_dim: int = option(256, "hidden units")


def grae(method: str):
    def make(config: GRAEConfig):
        if not 0 <= config.columns <= config.latent_dim:
            raise ValueError(f"models: --columns must be in [0, {config.latent_dim}], got {config.columns}")
        return Autoencoder(
            method, config.arch, config.latent_dim, config.hidden_dim, config.beta, config.columns or None
        )

    return make


def grae_loss(net, batch):
    return net.loss(batch[0])


def grae_pictures(model, batches, generator, config) -> dict:
    x, _ = batches.test(50)
    x = x.to(next(model.parameters()).device)
    reconstruction = model.decoder(model.encode(x)).clamp(0, 1)
    z = torch.randn(100, model.latent, generator=generator).to(x.device)
    return {
        "reconstructions.png": (reconstruction_rows(x, reconstruction), 10, (28, 28)),
        "samples.png": (model.decoder(z).clamp(0, 1), 10, (28, 28)),
    }


def grae_evaluate(model, batches, options) -> dict:
    x, _ = batches.test(options.get("limit"))
    x = x.to(next(model.parameters()).device)
    return {
        "test_half_sq_error": 0.5 * (x - model.decoder(model.encode(x))).square().sum(-1).mean().item(),
        "test_images": len(x),
    }


def grae_entry(name: str, method: str, description: str, options, benchmarked: bool = True) -> ModelEntry:
    return ModelEntry(
        name,
        description,
        GRAEConfig,
        grae(method),
        mnist_batches(unit_images),
        grae_pictures,
        grae_evaluate,
        loss=grae_loss,
        options=options,
        small={"hidden_dim": 16},
        batch=byte_digits(100, "unit"),
        budget={"epochs": 2},
        benchmarked=benchmarked,
        family="jacobian",
    )


def grae_entries() -> list[ModelEntry]:
    common = ("arch", "beta", "latent_dim", "hidden_dim")
    return [
        grae_entry(
            "grae-star",
            "grae-star",
            "GRAE* (Kumar & Poole): MLP 784-256-256-8 softplus, one sampled Jacobian column a step",
            common + ("columns",),
        ),
        grae_entry("grae", "grae", "GRAE: the exact log-determinant regulariser, as grae-star", common),
        grae_entry(
            "grae-beta-vae",
            "beta-vae",
            "the Gaussian beta-VAE that GRAE approximates, as grae-star",
            common,
            benchmarked=False,
        ),
    ]


# --- reversible networks: flows and classifiers ------------------------------------------------------------------


@dataclass
class NICEConfig:
    blocks: int = option(2, "AdditiveCoupling blocks (two NICE layers each)")
    hidden: int = option(500, "hidden units of the coupling MLPs")
    layers: int = option(4, "hidden layers per coupling MLP")


def nice_loss(net, batch):
    return -net.log_prob(batch[0]).mean()


def nice_pictures(model, batches, generator, config) -> dict:
    return {"samples.png": (model.sample(100, generator).clamp(0, 1), 10, (28, 28))}


def nice_evaluate(model, batches, options) -> dict:
    nats, count = mean_test_loss(nice_loss, model, batches, options.get("limit"))
    return {"test_nll_nats": nats, "test_bits_per_dim": bits_per_dim(nats), "test_images": count}


@dataclass
class RevNetConfig:
    mode: str = option("reversible", "reversible backward, the matched ResNet, or it with checkpointing", MODES)
    depth: int = option(8, "coupling blocks in all")
    width: int = option(16, "channels after the stem")
    stages: int = option(2, "stages (each halves the resolution)")
    dropout: float = option(0.0, "dropout in the residual functions")


@dataclass
class IRevNetConfig:
    blocks: int = option(4, "couplings per stage")
    hidden: int = option(32, "bottleneck channels")


def classifier_images(images, generator):
    return (images.float() / 255).unflatten(1, (1, 28, 28))


def classifier_loss(net, batch):
    x, y = batch
    return F.cross_entropy(net(x), y.long())


def classifier_pictures(model, batches, generator, config) -> dict:
    """predictions.png: row k holds test digits the model calls k (blank where fewer than 10);
    i-RevNet also reconstructions.png: test digits, each followed by the one rebuilt from its features."""
    x, _ = batches.test(500)
    x = x.to(next(model.parameters()).device)
    predicted = model(x).argmax(1)
    rows = [x[predicted == k][:10] for k in range(10)]
    rows = [torch.cat([row, row.new_zeros(10 - len(row), *row.shape[1:])]) for row in rows]
    pictures = {"predictions.png": (torch.cat(rows), 10, (28, 28))}
    if isinstance(model, IRevNet):
        pictures["reconstructions.png"] = (
            reconstruction_rows(x[:50], model.inverse(model.features(x[:50])).clamp(0, 1)),
            10,
            (28, 28),
        )
    return pictures


def classifier_evaluate(model, batches, options) -> dict:
    x, y = batches.test(options.get("limit"))
    device = next(model.parameters()).device
    correct = sum(
        (model(xb.to(device)).argmax(1).cpu() == yb.long()).sum().item()
        for xb, yb in zip(x.split(500), y.split(500), strict=True)
    )
    metrics = {"test_accuracy": correct / len(x), "test_images": len(x)}
    if isinstance(model, IRevNet):
        xb = x[:500].to(device)
        rebuilt = model.inverse(model.features(xb))
        metrics["reconstruction_rel_err"] = ((rebuilt - xb).norm() / xb.norm()).item()
    return metrics


def reversible_entries() -> list[ModelEntry]:
    classifier = {
        "loss": classifier_loss,
        "batch_size": 64,
        "budget": {"epochs": 1},
        "benchmarked": False,
        "family": "flows",
    }
    return [
        ModelEntry(
            "nice",
            "NICE (Dinh et al.): additive-coupling flow, exact likelihood of dequantised MNIST",
            NICEConfig,
            lambda config: NICE(config.blocks, config.hidden, config.layers),
            mnist_batches(dequantised),
            nice_pictures,
            nice_evaluate,
            loss=nice_loss,
            options=("blocks", "hidden", "layers"),
            small={"blocks": 1, "hidden": 8, "layers": 1},
            budget={"epochs": 1},
            benchmarked=False,
            family="flows",
        ),
        ModelEntry(
            "revnet",
            "RevNet (Gomez et al.) MNIST classifier; --mode resnet/checkpoint: its matched ResNet",
            RevNetConfig,
            lambda c: RevNet(c.depth, c.width, c.stages, mode=c.mode, dropout=c.dropout),
            mnist_batches(classifier_images, labels=True),
            classifier_pictures,
            classifier_evaluate,
            options=("mode", "depth", "width", "stages", "dropout"),
            small={"depth": 2, "width": 4},
            **classifier,
        ),
        ModelEntry(
            "irevnet",
            "i-RevNet (Jacobsen et al.): a bijective MNIST classifier",
            IRevNetConfig,
            lambda config: IRevNet(config.blocks, config.hidden),
            mnist_batches(classifier_images, labels=True),
            classifier_pictures,
            classifier_evaluate,
            options=("blocks", "hidden"),
            small={"blocks": 1, "hidden": 4},
            **classifier,
        ),
    ]


# --- adversarial models -----------------------------------------------------------------------------------------


@dataclass
class AdversarialConfig:
    latent_dim: int = option(10, "latent units (InfoGAN: incompressible noise)")
    hidden_dim: int = option(512, "hidden units of the MLPs")
    beta: float = option(1.0, "KL weight")
    gamma: float = option(10.0, "weight of the total correlation")
    categories: int = option(10, "values of the categorical code")
    continuous: int = option(2, "continuous codes, uniform on [-1, 1]")
    info_weight: float = option(1.0, "lambda of the information term")
    prior: str = option("gaussian", "the code's prior (mixture, swiss-roll: 2-D)", PRIORS)
    condition: str = option(
        "none", "one-hot label into the discriminator (with the prior's matching part) or decoder", CONDITIONS
    )
    noise_dim: int = option(8, "noise units into the black-box encoder")
    feature_matching: bool = option(False, "improved GAN: the generator matches the discriminator's features")
    historical_averaging: float = option(0.0, "improved GAN: weight of ||theta - mean of past theta||^2")
    label_smoothing: float = option(0.0, "improved GAN: one-sided, the real target 1 - ALPHA")
    virtual_batch_norm: bool = option(False, "improved GAN: the generator normalised against a reference batch")


def adversarial_model(kind):
    def make(c: AdversarialConfig):
        techniques = Techniques(**{name: getattr(c, name) for name in TECHNIQUE_NAMES})
        if kind is FactorVAE:
            return FactorVAE(64 * 64, (64, 64), arch="conv64", latent_dim=c.latent_dim, beta=c.beta, gamma=c.gamma)
        if kind is InfoGAN:
            return InfoGAN(
                MNIST_PIXELS,
                (28, 28),
                noise_dim=c.latent_dim,
                categories=c.categories,
                continuous=c.continuous,
                hidden_dim=c.hidden_dim,
                info_weight=c.info_weight,
                techniques=techniques,
            )
        if kind is AAE:
            if c.prior != "gaussian" and c.latent_dim != 2:
                raise ValueError(f"models: --prior {c.prior} is 2-D: --latent-dim must be 2, got {c.latent_dim}")
            return AAE(
                MNIST_PIXELS,
                (28, 28),
                latent_dim=c.latent_dim,
                hidden_dim=c.hidden_dim,
                prior=c.prior,
                condition=c.condition,
                techniques=techniques,
            )
        if kind is AVB:
            return AVB(MNIST_PIXELS, (28, 28), latent_dim=c.latent_dim, hidden_dim=c.hidden_dim, noise_dim=c.noise_dim)
        return BiGAN(MNIST_PIXELS, (28, 28), latent_dim=c.latent_dim, hidden_dim=c.hidden_dim, techniques=techniques)

    return make


def adversarial_step(model, optimizers, batch) -> dict:
    x, y = batch
    return model.train_step(x, y, None, optimizers)


def adversarial_pictures(model, batches, generator, config) -> dict:
    if isinstance(model, VAE):
        return vae_pictures(model, batches, generator, config)
    x, y = batches.test(50)
    return {name: (images, columns, (28, 28)) for name, (images, columns) in model.pictures(x, y, generator).items()}


def no_test_metric(model, batches, options) -> dict:
    """The adversarial models' test numbers are the studies' (``python -m models study disentanglement``)."""
    return {}


def _mnist_input(likelihood: str):
    """MNIST as the adversarial models see it: binarised for the Bernoulli decoders, intensities for the GANs."""
    return functools.partial(_zoo_input, False, likelihood)


def adversarial_entries() -> list[ModelEntry]:
    def entry(name, kind, description, options, benchmarked=False, **extra):
        likelihood = "bernoulli" if kind in (AAE, AVB) else "gaussian"
        gan = {"lr": 2e-4, "betas": (0.5, 0.999), "data": mnist_batches(_mnist_input(likelihood), labels=True)}
        settings = {
            "batch_size": 64,
            "budget": {"steps": 1000},
            "small": {"latent_dim": 2, "hidden_dim": 16},
            **({} if kind is FactorVAE else gan),
            **extra,
        }
        return ModelEntry(
            name,
            description,
            AdversarialConfig,
            adversarial_model(kind),
            pictures=adversarial_pictures,
            evaluate=no_test_metric,
            train_step=adversarial_step,
            options=options,
            benchmarked=benchmarked,
            family="adversarial",
            **settings,
        )

    improved = tuple(TECHNIQUE_NAMES)
    return [
        entry(
            "factor-vae",
            FactorVAE,
            "FactorVAE (Kim & Mnih) on the 64x64 shapes: conv64, a VAE and a discriminator step",
            ("latent_dim", "beta", "gamma"),
            benchmarked=True,
            loss=zoo_loss,
            data=lambda config, settings: ShapesBatches(Shapes(), settings.batch_size, settings.seed),
            batch=shapes_batch(64),
            small={"latent_dim": 4},
        ),
        entry(
            "infogan",
            InfoGAN,
            "InfoGAN (Chen et al.) on MNIST: a categorical code and continuous ones",
            ("latent_dim", "hidden_dim", "categories", "continuous", "info_weight") + improved,
            defaults={"latent_dim": 62},
        ),
        entry(
            "aae",
            AAE,
            "adversarial autoencoder (Makhzani et al.) on MNIST, 2-D code",
            ("latent_dim", "hidden_dim", "prior", "condition") + AAE.SUPPORTED,
            defaults={"latent_dim": 2},
        ),
        entry(
            "avb",
            AVB,
            "adversarial variational Bayes (Mescheder et al.) on MNIST",
            ("latent_dim", "hidden_dim", "noise_dim"),
            defaults={"latent_dim": 8},
        ),
        entry(
            "bigan",
            BiGAN,
            "BiGAN / ALI (Donahue et al.; Dumoulin et al.) on MNIST",
            ("latent_dim", "hidden_dim") + improved,
            defaults={"latent_dim": 16},
        ),
    ]


# --- reproduce presets -------------------------------------------------------------------------------------------

ZOO_METRICS = ("nll", "active_units", "marginal_kl", "reconstruction")
# The two-layer models: active units of z1 and z2, no marginal KL (z1's prior is p(z1 | z2)).
HIERARCHICAL_METRICS = ("nll", "active_units", "active_units_top", "reconstruction")
BURDA = "seed 001, Burda et al. Table 1"


def _taming(name: str, label: str) -> dict:
    kl, reconstruction = TAMING[name]
    source = f"seed 000, Taming VAEs: {label}"
    return {"marginal_kl": (kl, source), "reconstruction": (reconstruction, source)}


def _burda(k: int, method: int, label: str, layers: int = 1) -> dict:
    """The NLL and active units of Burda et al.'s row k, ``method`` 0 (VAE) or 1 (IWAE)."""
    nll, units = (BURDA_ONE_LAYER if layers == 1 else BURDA_TWO_LAYERS)[k][method]
    source = f"{BURDA}: {label}"
    if layers == 1:
        return {"nll": (nll, source), "active_units": (units, source)}
    return {"nll": (nll, source), "active_units": (units[0], source), "active_units_top": (units[1], source)}


# Two epochs of MNIST at batch 100 (the seed-tables study's default budget) for the likelihood VAEs.
ZOO_STEPS = 1200

REPRODUCTIONS: dict[str, Reproduction] = {
    "vae": Reproduction(ZOO_STEPS, ZOO_METRICS, seed={**_burda(1, 0, "VAE, k = 1"), **_taming("vae", "VAE")}),
    "beta-vae": Reproduction(ZOO_STEPS, ZOO_METRICS, seed=_taming("beta-vae", "beta-VAE, beta = 0.5")),
    "capacity-vae": Reproduction(ZOO_STEPS, ZOO_METRICS),
    # kappa^2 below the VAE's reconstruction loss at this budget, as in the seed-tables study.
    "geco": Reproduction(ZOO_STEPS, ZOO_METRICS, ("--tolerance", "80"), seed=_taming("geco", "GECO")),
    "cvae": Reproduction(ZOO_STEPS, ZOO_METRICS),
    "iwae-k5": Reproduction(ZOO_STEPS, ZOO_METRICS, seed=_burda(5, 1, "IWAE, k = 5")),
    "iwae-k50": Reproduction(ZOO_STEPS, ZOO_METRICS, seed=_burda(50, 1, "IWAE, k = 50")),
    "iwae-k50-dreg": Reproduction(
        ZOO_STEPS, ZOO_METRICS, seed=_burda(50, 1, "IWAE, k = 50, the bound whose gradient DReG estimates")
    ),
    "geco-iwae": Reproduction(
        ZOO_STEPS, ZOO_METRICS, ("--tolerance", "80"), seed=_taming("geco-iwae", "GECO + IWAE, k = 5")
    ),
    "hvae": Reproduction(
        ZOO_STEPS, HIERARCHICAL_METRICS, seed=_burda(1, 0, "two stochastic layers, VAE, k = 1", layers=2)
    ),
    "hiwae-k5": Reproduction(
        ZOO_STEPS, HIERARCHICAL_METRICS, seed=_burda(5, 1, "two stochastic layers, IWAE, k = 5", layers=2)
    ),
    "vhp-vae": Reproduction(ZOO_STEPS, ZOO_METRICS),
    "gated-pixelcnn": Reproduction(200, ("test_nats",)),
    "pixelcnn++": Reproduction(200, ("test_nats", "test_bits_per_dim")),
    "pixelsnail": Reproduction(200, ("test_nats", "test_bits_per_dim")),
    "pixelvae": Reproduction(300, ("test_nats",)),
    "vlae": Reproduction(
        1200,
        ("test_nats",),
        seed={"test_nats": (VLAE_NLL, "seed 001, the VLAE table: test NLL (ours: the negative ELBO, its upper bound)")},
    ),
    "grae-star": Reproduction(1200, ("test_half_sq_error", "train_loss")),
    "grae": Reproduction(1200, ("test_half_sq_error", "train_loss")),
    "grae-beta-vae": Reproduction(1200, ("test_half_sq_error", "train_loss")),
    "nice": Reproduction(1200, ("test_nll_nats", "test_bits_per_dim")),
    "revnet": Reproduction(938, ("test_accuracy",)),
    "irevnet": Reproduction(938, ("test_accuracy", "reconstruction_rel_err")),
    # The adversarial models have no test metric of their own (the disentanglement study measures FactorVAE's).
    "factor-vae": Reproduction(1000, ("train_reconstruction", "train_kl", "train_tc")),
    "infogan": Reproduction(1000, ("train_discriminator", "train_generator", "train_information")),
    "aae": Reproduction(1000, ("train_reconstruction", "train_discriminator", "train_regularisation")),
    "avb": Reproduction(1000, ("train_loss", "train_reconstruction", "train_kl")),
    "bigan": Reproduction(1000, ("train_discriminator", "train_encoder", "train_generator")),
}
"""Each model's ``reproduce`` preset, by name."""

# What ``python -m models reproduce NAME --threads 1`` reached in a whole run of each preset on MEASURED_ON, four
# significant digits (train_cpu_seconds: the training's CPU seconds). A model missing here is not yet measured.
REACHED: dict[str, dict] = {
    "vae": {"nll": 134.2, "active_units": 40, "marginal_kl": 4.813, "reconstruction": 126.6, "train_cpu_seconds": 19},
    "beta-vae": {
        "nll": 131.1,
        "active_units": 49,
        "marginal_kl": 9.568,
        "reconstruction": 118.7,
        "train_cpu_seconds": 19,
    },
    "capacity-vae": {
        "nll": 154.3,
        "active_units": 32,
        "marginal_kl": 0.6041,
        "reconstruction": 167.0,
        "train_cpu_seconds": 19,
    },
    "geco": {"nll": 346.7, "active_units": 50, "marginal_kl": 270.2, "reconstruction": 82.67, "train_cpu_seconds": 20},
    "cvae": {"nll": 125.0, "active_units": 42, "marginal_kl": 4.014, "reconstruction": 118.2, "train_cpu_seconds": 18},
    "iwae-k5": {
        "nll": 130.0,
        "active_units": 49,
        "marginal_kl": 4.356,
        "reconstruction": 128.7,
        "train_cpu_seconds": 43,
    },
    "iwae-k50": {
        "nll": 126.5,
        "active_units": 50,
        "marginal_kl": 2.997,
        "reconstruction": 148.5,
        "train_cpu_seconds": 311,
    },
    "iwae-k50-dreg": {
        "nll": 125.2,
        "active_units": 50,
        "marginal_kl": 3.872,
        "reconstruction": 142.9,
        "train_cpu_seconds": 279,
    },
    "geco-iwae": {
        "nll": 353.8,
        "active_units": 50,
        "marginal_kl": 277.8,
        "reconstruction": 82.2,
        "train_cpu_seconds": 47,
    },
    "hvae": {"nll": 181.4, "active_units": 2, "active_units_top": 0, "reconstruction": 180.0, "train_cpu_seconds": 18},
    "hiwae-k5": {
        "nll": 174.9,
        "active_units": 81,
        "active_units_top": 20,
        "reconstruction": 189.1,
        "train_cpu_seconds": 39,
    },
    "vhp-vae": {
        "nll": 350.2,
        "active_units": 50,
        "marginal_kl": 270.4,
        "reconstruction": 87.47,
        "train_cpu_seconds": 36,
    },
    "gated-pixelcnn": {"test_nats": 101.3, "train_cpu_seconds": 198},
    "pixelcnn++": {"test_nats": 706.1, "test_bits_per_dim": 1.299, "train_cpu_seconds": 238},
    "pixelsnail": {"test_nats": 740.3, "test_bits_per_dim": 1.362, "train_cpu_seconds": 255},
    "pixelvae": {"test_nats": 101.7, "train_cpu_seconds": 136},
    "vlae": {"test_nats": 94.72, "train_cpu_seconds": 108},
    "grae-star": {"test_half_sq_error": 11.98, "train_loss": 14.77, "train_cpu_seconds": 32},
    "grae": {"test_half_sq_error": 11.58, "train_loss": 14.28, "train_cpu_seconds": 58},
    "grae-beta-vae": {"test_half_sq_error": 12.92, "train_loss": 15.41, "train_cpu_seconds": 19},
    "nice": {"test_nll_nats": -3065.0, "test_bits_per_dim": 2.36, "train_cpu_seconds": 175},
    "revnet": {"test_accuracy": 0.974, "train_cpu_seconds": 462},
    "irevnet": {"test_accuracy": 0.948, "reconstruction_rel_err": 6.694e-06, "train_cpu_seconds": 255},
    "factor-vae": {"train_reconstruction": 126.1, "train_kl": 21.76, "train_tc": 0.861, "train_cpu_seconds": 204},
    "infogan": {
        "train_discriminator": 2.193,
        "train_generator": 3.904,
        "train_information": 1.836,
        "train_cpu_seconds": 44,
    },
    "aae": {
        "train_reconstruction": 164.1,
        "train_discriminator": 1.376,
        "train_regularisation": 0.7222,
        "train_cpu_seconds": 47,
    },
    "avb": {"train_loss": 117.8, "train_reconstruction": 114.5, "train_kl": 3.271, "train_cpu_seconds": 54},
    "bigan": {"train_discriminator": 0.2465, "train_encoder": 5.036, "train_generator": 3.583, "train_cpu_seconds": 61},
}

MODELS: dict[str, ModelEntry] = {
    entry.name: replace(entry, reproduce=replace(REPRODUCTIONS[entry.name], reached=REACHED.get(entry.name)))
    for entry in zoo_entries()
    + autoregressive_entries()
    + grae_entries()
    + reversible_entries()
    + adversarial_entries()
}
"""Every model that ``python -m models train`` trains, by name."""

REGISTRY: dict[str, ModelEntry] = {name: entry for name, entry in MODELS.items() if entry.benchmarked}
"""The models whose training step the model-step benchmark and the compile tests take."""


def load_run(run: Path, device="cpu", data_dir: Path | None = None):
    """A trained run: (its entry, its config, its model with the checkpoint's weights in eval mode, its data;
    from ``data_dir`` where given, else the run's own)."""
    checkpoint = torch.load(run / "checkpoint.pt", map_location=device, weights_only=False)
    entry = MODELS[checkpoint["model_name"]]
    config = entry.config(**checkpoint["config"])
    settings = Settings(**checkpoint["settings"])
    if data_dir is not None:
        settings = replace(settings, data_dir=str(data_dir))
    model = entry.build(config).to(device)
    model.load_state_dict(checkpoint["model"])
    return entry, config, model.eval(), entry.data(config, settings)
