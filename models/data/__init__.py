"""Loaders for the standard MNIST files, read from a directory the user gives.

Expected layout (the one of the shared data copy, see its README)::

    <data_dir>/mnist/train-images-idx3-ubyte.gz       <data_dir>/binarized_mnist/binarized_mnist_train.mat
    <data_dir>/mnist/train-labels-idx1-ubyte.gz       <data_dir>/binarized_mnist/binarized_mnist_valid.mat
    <data_dir>/mnist/t10k-images-idx3-ubyte.gz        <data_dir>/binarized_mnist/binarized_mnist_test.mat
    <data_dir>/mnist/t10k-labels-idx1-ubyte.gz

    <data_dir>/frey_faces/freyfaces_uint8.npz (or the canonical frey_rawface.mat)
    <data_dir>/caltech101_silhouettes/caltech101_silhouettes_28.mat

A file lying directly in ``<data_dir>`` is found too. With ``download=True`` a missing file is
fetched from its canonical location first; otherwise (or offline) the error names the file and
the directory to place it in.

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
from dataclasses import dataclass
from pathlib import Path

import torch

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]

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


# Where each file is published; ``download=True`` fetches from here.
CANONICAL_URLS = {
    **{name: f"https://ossci-datasets.s3.amazonaws.com/mnist/{name}" for pair in MNIST_FILES.values() for name in pair},
    **{
        f"binarized_mnist_{split}.amat": "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
        f"binarized_mnist_{split}.amat"
        for split in BINARIZED_MNIST_SPLITS
    },
    "frey_rawface.mat": "https://cs.nyu.edu/~roweis/data/frey_rawface.mat",
    "caltech101_silhouettes_28.mat": "https://people.cs.umass.edu/~marlin/data/caltech101_silhouettes_28.mat",
}


def _download(url: str, path: Path) -> None:
    """Fetch ``url`` to ``path`` through a temporary file, so a broken transfer leaves nothing behind."""
    import urllib.request

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(temporary, "wb") as f:
        f.write(response.read())
    os.replace(temporary, path)


def _locate(
    data_dir: str | Path | None,
    subdir: str,
    names: tuple[str, ...],
    what: str,
    source: str,
    download: bool = False,
    alternatives: dict[str, str] | None = None,
) -> list[Path]:
    """Paths of ``names`` in ``data_dir/subdir`` (or ``data_dir``), or one error naming every missing file.

    ``alternatives`` maps a name to the canonical file that can stand in for it (and be downloaded).
    """
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    alternatives = alternatives or {}
    found, missing, failures = [], [], []
    for name in names:
        options = (name, alternatives[name]) if name in alternatives else (name,)
        path = next((p for option in options for p in (root / subdir / option, root / option) if p.is_file()), None)
        if path is None and download:
            remote = next(option for option in options if option in CANONICAL_URLS)
            path = root / subdir / remote
            try:
                _download(CANONICAL_URLS[remote], path)
            except OSError as error:  # urllib's URLError is an OSError: offline, refused, 404
                failures.append(f"{CANONICAL_URLS[remote]} ({error})")
                path = None
        (found if path else missing).append(path or " or ".join(options))
    if missing:
        how = (
            f"Downloading failed: {'; '.join(failures)}."
            if failures
            else "Pass --download (download=True) to fetch them from their canonical locations."
        )
        raise FileNotFoundError(
            f"models.data: {what} file(s) missing: {', '.join(missing)}. Place them in {root / subdir}/ "
            f"(or point --data-dir / VAEKERNELS_DATA at another directory). {how} {source}"
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


def load_mnist(
    split: str = "train", data_dir: str | Path | None = None, *, verify_md5: bool = False, download: bool = False
):
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
        download,
    )
    if verify_md5:
        for path in (image_path, label_path):
            if (digest := _md5(path)) != MNIST_MD5[path.name]:
                raise ValueError(f"models.data.load_mnist: {path} must have MD5 {MNIST_MD5[path.name]}, got {digest}")
    images = read_idx(image_path, IDX_IMAGES_MAGIC)
    labels = read_idx(label_path, IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"models.data.load_mnist: {image_path} holds {images.shape[0]} images but "
            f"{label_path} holds {labels.shape[0]} labels"
        )
    return images, labels


def load_binarized_mnist(
    split: str = "train", data_dir: str | Path | None = None, *, download: bool = False
) -> torch.Tensor:
    """Statically binarised MNIST (Larochelle & Murray's 50k/10k/10k split): uint8 [N, 784] in {0, 1}.

    >>> load_binarized_mnist("valid", "/data").shape  # doctest: +SKIP
    torch.Size([10000, 784])
    """
    if split not in BINARIZED_MNIST_SPLITS:
        raise ValueError(
            f"models.data.load_binarized_mnist: split must be one of {list(BINARIZED_MNIST_SPLITS)}, got {split!r}"
        )
    name = f"binarized_mnist_{split}.mat"
    amat = f"binarized_mnist_{split}.amat"
    (path,) = _locate(
        data_dir,
        "binarized_mnist",
        (name,),
        "statically binarised MNIST",
        "the files are binarized_mnist_train.mat, binarized_mnist_valid.mat and binarized_mnist_test.mat, "
        "MATLAB versions of Larochelle & Murray's binarized_mnist_*.amat, each holding one variable X "
        "of shape (N, 784) with values 0/1 (the original text files binarized_mnist_*.amat work too).",
        download,
        {name: amat},
    )
    if path.suffix == ".amat":
        import numpy

        return torch.from_numpy(numpy.loadtxt(path, dtype="uint8")).contiguous()
    import scipy.io  # only the .mat loaders need scipy

    return torch.from_numpy(scipy.io.loadmat(path)["X"].astype("uint8", copy=False)).contiguous()


FREY_SHAPE = (28, 20)


def load_frey_faces(data_dir: str | Path | None = None, *, download: bool = False) -> torch.Tensor:
    """Frey faces: uint8 [1965, 560], each row one 28x20 face (row-major).

    Reads the shared copy's ``freyfaces_uint8.npz`` (key ``ff``) or Roweis's canonical
    ``frey_rawface.mat`` (``ff`` stored transposed, [560, 1965]).

    >>> load_frey_faces("/data").shape  # doctest: +SKIP
    torch.Size([1965, 560])
    """
    (path,) = _locate(
        data_dir,
        "frey_faces",
        ("freyfaces_uint8.npz",),
        "Frey faces",
        "Either freyfaces_uint8.npz (numpy, key ff, [1965, 560] uint8) or Sam Roweis's frey_rawface.mat.",
        download,
        {"freyfaces_uint8.npz": "frey_rawface.mat"},
    )
    if path.suffix == ".npz":
        import numpy

        faces = numpy.load(path)["ff"]
    else:
        import scipy.io

        faces = scipy.io.loadmat(path)["ff"].T
    return torch.from_numpy(faces.astype("uint8", copy=False)).contiguous()


def load_caltech_silhouettes(data_dir: str | Path | None = None, *, download: bool = False):
    """Caltech-101 silhouettes 28x28: images uint8 [8671, 784] in {0, 1} and classes [8671] in 0..100.

    Marlin's unsplit file; :func:`caltech_split` makes a fixed train/test split of it. Its images
    are stored column-major (MATLAB order) and are transposed here to row-major.

    >>> images, labels = load_caltech_silhouettes("/data")  # doctest: +SKIP
    >>> images.shape  # doctest: +SKIP
    torch.Size([8671, 784])
    """
    (path,) = _locate(
        data_dir,
        "caltech101_silhouettes",
        ("caltech101_silhouettes_28.mat",),
        "Caltech-101 silhouettes",
        "The file is Benjamin Marlin's caltech101_silhouettes_28.mat (variables X [8671, 784] and Y).",
        download,
    )
    import scipy.io

    contents = scipy.io.loadmat(path)
    images = torch.from_numpy(contents["X"].astype("uint8", copy=False))
    images = images.reshape(-1, 28, 28).transpose(1, 2).reshape(-1, 784).contiguous()
    labels = torch.from_numpy(contents["Y"].astype("int64").reshape(-1) - 1)
    return images, labels


def dynamic_binarize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Binary float32 sample with pixel ~ Bernoulli(intensity / 255), as in the IWAE paper's protocol.

    Draw a fresh sample every epoch; ``generator`` (on the images' device) makes it reproducible.

    >>> dynamic_binarize(torch.tensor([0, 255], dtype=torch.uint8))
    tensor([0., 1.])
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"models.data.dynamic_binarize: images must be uint8 intensities, got {images.dtype}")
    return torch.bernoulli(images.float().div_(255), generator=generator)


DATASETS = ("mnist", "binarized-mnist", "frey", "caltech")


@dataclass
class Dataset:
    """A dataset as the training CLI uses it: uint8 images [N, D] (intensities, or 0/1 when
    ``binary``), labels [N] or None, and each image's (height, width)."""

    train: torch.Tensor
    train_labels: torch.Tensor | None
    test: torch.Tensor
    test_labels: torch.Tensor | None
    image_shape: tuple[int, int]
    binary: bool
    num_classes: int = 0


def load_dataset(name: str, data_dir: str | Path | None = None, *, download: bool = False) -> Dataset:
    """One of :data:`DATASETS` with its train/test split.

    ``mnist``: the IDX files (60000/10000, intensities); ``binarized-mnist``: the static
    50000 (train) / 10000 (test) split, no labels; ``frey``: the first 1765 faces / the last 200;
    ``caltech``: a fixed random split (seed 0) of Marlin's file, 6364 / 2307, the sizes of its
    usual train+valid / test split.

    >>> load_dataset("frey").image_shape  # doctest: +SKIP
    (28, 20)
    """
    if name == "mnist":
        train, train_labels = load_mnist("train", data_dir, download=download)
        test, test_labels = load_mnist("test", data_dir, download=download)
        return Dataset(train.flatten(1), train_labels, test.flatten(1), test_labels, (28, 28), False, 10)
    if name == "binarized-mnist":
        return Dataset(
            load_binarized_mnist("train", data_dir, download=download),
            None,
            load_binarized_mnist("test", data_dir, download=download),
            None,
            (28, 28),
            True,
        )
    if name == "frey":
        faces = load_frey_faces(data_dir, download=download)
        return Dataset(faces[:1765], None, faces[1765:], None, FREY_SHAPE, False)
    if name == "caltech":
        images, labels = load_caltech_silhouettes(data_dir, download=download)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        train, test = order[:-2307], order[-2307:]
        return Dataset(images[train], labels[train], images[test], labels[test], (28, 28), True, 101)
    raise ValueError(f"models.data.load_dataset: name must be one of {DATASETS}, got {name!r}")


def to_model_input(images: torch.Tensor, binary: bool, likelihood: str, generator=None) -> torch.Tensor:
    """Float data for a model: 0/1 for the Bernoulli likelihood (intensities binarised dynamically
    with ``generator``), intensities / 255 in [0, 1] otherwise.

    >>> to_model_input(torch.tensor([0, 255], dtype=torch.uint8), False, "gaussian")
    tensor([0., 1.])
    """
    if binary:
        return images.float()
    if likelihood == "bernoulli":
        return dynamic_binarize(images, generator)
    return images.float() / 255


class Batches:
    """The training batches of a run and its test set, as a model takes them.

    Batch t is a function of (seed, t) alone: the epoch's order comes from (seed, epoch), the batch's
    random preparation (dynamic binarisation, dequantisation) from (seed, t); so a resumed run sees the
    batches a run that never stopped would have. ``prepare(images, generator)`` turns uint8 images into
    model input; the test set is prepared once with its own seed. ``labels`` says whether batches carry
    the labels (as ``(x, y)``; else ``(x, None)``).

    >>> data = Dataset(torch.randint(0, 256, (10, 4), dtype=torch.uint8), None,
    ...                torch.zeros(3, 4, dtype=torch.uint8), None, (2, 2), False)
    >>> batches = Batches(data, dynamic_binarize, batch_size=4, seed=0)
    >>> batches.steps_per_epoch, batches.batch(2)[0].shape, torch.equal(batches.batch(1)[0], batches.batch(1)[0])
    (3, torch.Size([2, 4]), True)
    """

    def __init__(
        self, data: Dataset, prepare, batch_size: int, seed: int, limit: int | None = None, labels: bool = False
    ):
        self.data, self.prepare, self.batch_size, self.seed, self.labels = data, prepare, batch_size, seed, labels
        self.train = data.train[:limit]
        self.image_shape = data.image_shape
        self.steps_per_epoch = math.ceil(len(self.train) / batch_size)
        self._epoch, self._order = None, None

    def batch(self, step: int):
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(
                len(self.train), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            )
        indices = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        x = self.prepare(self.train[indices], torch.Generator().manual_seed(self.seed * 1_000_003 + 999_983 + step))
        return x, self.data.train_labels[: len(self.train)][indices] if self.labels else None

    def test(self, count: int | None = None):
        """The first ``count`` test images (all by default), prepared with a fixed seed of their own."""
        x = self.prepare(self.data.test[:count], torch.Generator().manual_seed(self.seed + 1))
        return x, self.data.test_labels[:count] if self.labels else None
