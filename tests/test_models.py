"""The reference models and their data loaders: quick CPU checks on data made here, plus the real
MNIST files when the shared copy is at ../shared/data."""

import gzip
import json
import math
import struct
from pathlib import Path

import pytest
import torch

from models import data
from models.iwae import ESTIMATORS, IWAE, burda_learning_rate, evaluate, main, train_epoch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def synthetic_binary(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Noisy copies of four random binary prototypes: structure a few training steps can pick up."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.bernoulli(torch.full((4, dim), 0.5), generator=generator)
    x = prototypes[torch.randint(0, 4, (n,), generator=generator)]
    flips = torch.bernoulli(torch.full_like(x, 0.05), generator=generator)
    return (x + flips) % 2


def write_idx(path: Path, array: torch.Tensor, magic: int) -> None:
    header = struct.pack(">I", magic) + struct.pack(f">{array.dim()}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


def write_fake_mnist(root: Path, train: int, test: int) -> None:
    """MNIST-shaped IDX files of random intensities under root/mnist."""
    (root / "mnist").mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("test", test)):
        image_name, label_name = data.MNIST_FILES[split]
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator)
        write_idx(root / "mnist" / image_name, images, data.IDX_IMAGES_MAGIC)
        write_idx(root / "mnist" / label_name, torch.arange(n, dtype=torch.uint8) % 10, data.IDX_LABELS_MAGIC)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_training_lowers_the_loss_and_the_bound_stays_finite(estimator):
    torch.manual_seed(0)
    model = IWAE(data_dim=16, hidden_dim=32, latent_dim=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = synthetic_binary(128, 16)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(5):
        losses += train_epoch(model, optimizer, x.split(32), k=5, estimator=estimator, generator=generator,
                              progress=False)
    assert all(math.isfinite(loss) for loss in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 2.0, f"{estimator}: loss went from {first:.2f} to {last:.2f}"
    bound = model.bound(x, k=5, estimator=estimator, generator=generator)
    assert bound.shape == (128,) and torch.isfinite(bound).all()


def test_evaluate_reports_nll_bound_and_active_units():
    torch.manual_seed(0)
    model = IWAE(data_dim=16, hidden_dim=8, latent_dim=3)
    metrics = evaluate(model, synthetic_binary(20, 16), k=4, num_samples=50, batch_size=8, progress=False)
    assert math.isfinite(metrics["nll"]) and metrics["nll"] > 0
    assert 0 <= metrics["active_units"] <= 3 and len(metrics["latent_variances"]) == 3
    assert metrics["size"] == 20


def test_burda_schedule_has_eight_stages_over_3280_epochs():
    boundaries = [0, 1, 4, 13, 40, 121, 364, 1093]
    assert [burda_learning_rate(e) for e in boundaries] == pytest.approx([1e-3 * 10 ** (-i / 7) for i in range(8)])
    assert burda_learning_rate(3279) == burda_learning_rate(1093)


def test_read_idx_round_trip(tmp_path):
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    write_idx(tmp_path / "images.gz", images, data.IDX_IMAGES_MAGIC)
    assert torch.equal(data.read_idx(tmp_path / "images.gz", data.IDX_IMAGES_MAGIC), images)


def test_read_idx_rejects_a_labels_file_read_as_images(tmp_path):
    write_idx(tmp_path / "labels.gz", torch.arange(5, dtype=torch.uint8), data.IDX_LABELS_MAGIC)
    with pytest.raises(ValueError, match="magic 0x00000803, got 0x00000801"):
        data.read_idx(tmp_path / "labels.gz", data.IDX_IMAGES_MAGIC)


def test_load_mnist_reads_files_from_the_given_directory(tmp_path):
    write_fake_mnist(tmp_path, train=6, test=4)
    images, labels = data.load_mnist("test", tmp_path)
    assert images.shape == (4, 28, 28) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 1, 2, 3]


def test_missing_files_error_says_what_to_place_where(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        data.load_mnist("test", tmp_path)
    message = str(error.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert str(tmp_path / "mnist") in message and "--download" in message
    with pytest.raises(FileNotFoundError, match="binarized_mnist_valid.mat"):
        data.load_binarized_mnist("valid", tmp_path)


def test_md5_mismatch_is_reported(tmp_path):
    write_fake_mnist(tmp_path, train=2, test=2)
    with pytest.raises(ValueError, match="must have MD5 9fb629c4189551a2d022fa330f9573f3"):
        data.load_mnist("test", tmp_path, verify_md5=True)


def test_data_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VAEKERNELS_DATA", str(tmp_path))
    assert data.default_data_dir() == tmp_path


def test_dynamic_binarize_follows_the_intensities():
    images = torch.tensor([0, 255, 128], dtype=torch.uint8).repeat(20000, 1)
    x = data.dynamic_binarize(images, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and set(x.unique().tolist()) <= {0.0, 1.0}
    assert x[:, 0].sum() == 0 and x[:, 1].all()
    assert x[:, 2].mean().item() == pytest.approx(128 / 255, abs=0.01)


def test_cli_quick_run_writes_results_and_never_overwrites_them(tmp_path):
    write_fake_mnist(tmp_path / "data", train=40, test=12)
    out = tmp_path / "run"
    common = ["--data-dir", str(tmp_path / "data"), "--out", str(out), "--k", "2", "--batch-size", "10",
              "--eval-samples", "6", "--latent-dim", "5", "--hidden-dim", "16", "--no-progress", "--device", "cpu"]
    metrics = main(common + ["--epochs", "1", "--estimator", "dreg"])
    for name in ("checkpoint.pt", "metrics.json", "reconstructions.png", "samples.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["test"]["nll"] == pytest.approx(metrics["test"]["nll"])
    assert math.isfinite(metrics["test"]["nll"]) and metrics["test"]["size"] == 12
    with pytest.raises(SystemExit):
        main(common + ["--epochs", "1"])
    resumed = main(common + ["--epochs", "2", "--resume"])
    assert [entry["epoch"] for entry in resumed["history"]] == [1, 2]


def _shared_mnist(split):
    paths = [SHARED_DATA / "mnist" / name for name in data.MNIST_FILES[split]]
    if not all(path.is_file() for path in paths):
        pytest.skip(f"real MNIST not at {SHARED_DATA / 'mnist'} (only on machines with the shared data copy)")


def test_real_mnist_test_split():
    _shared_mnist("test")
    images, labels = data.load_mnist("test", SHARED_DATA, verify_md5=True)
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert images.double().mean().item() / 255 == pytest.approx(0.13251, abs=5e-6)
    assert torch.bincount(labels.long()).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_binarized_mnist_test_split():
    if not (SHARED_DATA / "binarized_mnist" / "binarized_mnist_test.mat").is_file():
        pytest.skip(f"binarised MNIST not at {SHARED_DATA / 'binarized_mnist'} (only with the shared data copy)")
    pytest.importorskip("scipy", reason="the .mat loader needs scipy (pip install vaekernels[models])")
    x = data.load_binarized_mnist("test", SHARED_DATA)
    assert x.shape == (10000, 784) and x.dtype == torch.uint8 and x.max() == 1
