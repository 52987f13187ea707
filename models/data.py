"""Loaders for the standard MNIST files, read from a directory the user gives.

Expected layout (the one of the shared data copy, see its README)::

    <data_dir>/mnist/train-images-idx3-ubyte.gz       <data_dir>/binarized_mnist/binarized_mnist_train.mat
    <data_dir>/mnist/train-labels-idx1-ubyte.gz       <data_dir>/binarized_mnist/binarized_mnist_valid.mat
    <data_dir>/mnist/t10k-images-idx3-ubyte.gz        <data_dir>/binarized_mnist/binarized_mnist_test.mat
    <data_dir>/mnist/t10k-labels-idx1-ubyte.gz

A file lying directly in ``<data_dir>`` is found too. This version never downloads.

Example::

    >>> images, labels = load_mnist("test")                     # doctest: +SKIP
    >>> images.shape, images.dtype  # doctest: +SKIP
    (torch.Size([10000, 28, 28]), torch.uint8)
    >>> x = dynamic_binarize(images, generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
from pathlib import Path

import torch

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# The sums most MNIST loaders check; the shared data README lists the same.
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension

BINARIZED_MNIST_SPLITS = ("train", "valid", "test")


def default_data_dir() -> Path:
    """The directory given by ``VAEKERNELS_DATA``, else ``../shared/data`` next to the repository.

    >>> os.environ["VAEKERNELS_DATA"] = "/data"; default_data_dir()  # doctest: +SKIP
    PosixPath('/data')
    """
    from_env = os.environ.get("VAEKERNELS_DATA")
    if from_env:
        return Path(from_env)
    shared = REPOSITORY_ROOT.parent / "shared" / "data"
    if shared.is_dir():
        return shared
    raise FileNotFoundError(
        "models.data: no data directory: pass one (--data-dir DIR) or set VAEKERNELS_DATA=DIR "
        f"(also looked for {shared}, which does not exist)"
    )


def _locate(data_dir: str | Path | None, subdir: str, names: tuple[str, ...], what: str, source: str) -> list[Path]:
    """Paths of ``names`` in ``data_dir/subdir`` (or ``data_dir``), or one error naming every missing file."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    found, missing = [], []
    for name in names:
        candidates = [root / subdir / name, root / name]
        path = next((p for p in candidates if p.is_file()), None)
        (found if path else missing).append(path or name)
    if missing:
        raise FileNotFoundError(
            f"models.data: {what} file(s) missing: {', '.join(missing)}. Place them in {root / subdir}/ "
            f"(or point --data-dir / VAEKERNELS_DATA at another directory). This version does not download; {source}"
        )
    return found


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_idx(path: str | Path, magic: int) -> torch.Tensor:
    """Read a gzip-compressed IDX file of unsigned bytes into a uint8 tensor.

    ``magic`` is the expected big-endian header word (0x803: 3-d images, 0x801: 1-d labels).

    >>> read_idx("mnist/t10k-labels-idx1-ubyte.gz", IDX_LABELS_MAGIC).shape  # doctest: +SKIP
    torch.Size([10000])
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except gzip.BadGzipFile as error:
        raise ValueError(f"models.data.read_idx: {path} is not gzip-compressed ({error})") from None
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"models.data.read_idx: {path} must start with IDX magic {magic:#010x}, got {found:#010x}")
    ndim = magic & 0xFF
    header_end = 4 + 4 * ndim
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    payload = raw[header_end:]
    if len(payload) != math.prod(shape):
        raise ValueError(
            f"models.data.read_idx: {path} declares shape {shape} ({math.prod(shape)} bytes) "
            f"but holds {len(payload)} bytes of data"
        )
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).reshape(shape)


def load_mnist(split: str = "train", data_dir: str | Path | None = None, *, verify_md5: bool = False):
    """MNIST images [N, 28, 28] and labels [N], both uint8, from the original IDX ``.gz`` files.

    ``split`` is "train" (60000) or "test" (10000). ``verify_md5`` checks the files against the
    canonical sums first.

    >>> images, labels = load_mnist("test", "/data", verify_md5=True)  # doctest: +SKIP
    >>> round(images.float().mean().item() / 255, 5)  # doctest: +SKIP
    0.13251
    """
    if split not in MNIST_FILES:
        raise ValueError(f"models.data.load_mnist: split must be one of {sorted(MNIST_FILES)}, got {split!r}")
    image_path, label_path = _locate(
        data_dir,
        "mnist",
        MNIST_FILES[split],
        "MNIST",
        "get the four canonical gzip-compressed IDX files of http://yann.lecun.com/exdb/mnist/ "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz), unchanged.",
    )
    if verify_md5:
        for path in (image_path, label_path):
            if (digest := _md5(path)) != MNIST_MD5[path.name]:
                raise ValueError(
                    f"models.data.load_mnist: {path} must have MD5 {MNIST_MD5[path.name]}, got {digest}"
                )
    images = read_idx(image_path, IDX_IMAGES_MAGIC)
    labels = read_idx(label_path, IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"models.data.load_mnist: {image_path} holds {images.shape[0]} images but "
            f"{label_path} holds {labels.shape[0]} labels"
        )
    return images, labels


def load_binarized_mnist(split: str = "train", data_dir: str | Path | None = None) -> torch.Tensor:
    """Statically binarised MNIST (Larochelle & Murray's 50k/10k/10k split): uint8 [N, 784] in {0, 1}.

    >>> load_binarized_mnist("valid", "/data").shape  # doctest: +SKIP
    torch.Size([10000, 784])
    """
    if split not in BINARIZED_MNIST_SPLITS:
        raise ValueError(
            f"models.data.load_binarized_mnist: split must be one of {list(BINARIZED_MNIST_SPLITS)}, got {split!r}"
        )
    name = f"binarized_mnist_{split}.mat"
    (path,) = _locate(
        data_dir,
        "binarized_mnist",
        (name,),
        "statically binarised MNIST",
        "the files are binarized_mnist_train.mat, binarized_mnist_valid.mat and binarized_mnist_test.mat, "
        "MATLAB versions of Larochelle & Murray's binarized_mnist_*.amat, each holding one variable X "
        "of shape (N, 784) with values 0/1.",
    )
    import scipy.io  # only this loader needs scipy

    return torch.from_numpy(scipy.io.loadmat(path)["X"].astype("uint8", copy=False)).contiguous()


def dynamic_binarize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Binary float32 sample with pixel ~ Bernoulli(intensity / 255), as in the IWAE paper's protocol.

    Draw a fresh sample every epoch; ``generator`` (on the images' device) makes it reproducible.

    >>> dynamic_binarize(torch.tensor([0, 255], dtype=torch.uint8))
    tensor([0., 1.])
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"models.data.dynamic_binarize: images must be uint8 intensities, got {images.dtype}")
    return torch.bernoulli(images.float().div_(255), generator=generator)
