"""The models' data loaders, on files written here and on the real MNIST files when the shared copy is at
../shared/data; and the IWAE's gradient estimators learning."""

import math
from pathlib import Path

import pytest
import torch
from fake_data import synthetic_binary, write_fake_mnist, write_idx

from models import data
from models.vae.zoo import ESTIMATORS, build_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_iwae_training_lowers_the_loss_and_the_bound_stays_finite(estimator):
    torch.manual_seed(0)
    model = build_model("iwae", 16, (4, 4), hidden_dim=32, latent_dim=4, k=5, estimator=estimator)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = synthetic_binary(128, 16)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(5):
        for batch in x.split(32):
            loss, _ = model(batch, None, generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 2.0, f"{estimator}: loss went from {first:.2f} to {last:.2f}"
    bound = model.bound(x, None, 5, estimator, generator)
    assert bound.shape == (128,) and torch.isfinite(bound).all()


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
