"""The likelihood zoo through ``python -m models``: bad options say what is wrong, missing files name the file
and the place, two gloo processes train with DDP, and evaluate and the seed-tables study run on the result.
(Every model's run, resume and pictures: tests/test_models_cli.py.)"""

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from fake_data import write_fake_mnist

from models import data
from models.cli import main
from models.studies import seed_tables as compare

REPOSITORY = Path(__file__).resolve().parents[1]
TINY = ["--latent-dim", "3", "--hidden-dim", "8", "--batch-size", "10", "--limit-train", "30", "--no-progress"]


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_mnist(root, train=40, test=20)
    return root


@pytest.mark.parametrize(
    "argv, message",
    [
        (["geco-iwae", "--estimator", "dreg"], "estimator must be 'iwae' or 'stl', got 'dreg'"),
        (["hiwae-k5", "--estimator", "stl"], "unrecognized arguments: --estimator stl"),
        (["cvae", "--data", "binarized-mnist"], "cvae needs labels"),
        (["vae", "--resume", "--out", "/nonexistent/run"], "--resume needs --out RUN holding checkpoint.pt"),
        (["vae", "--lr", "-1"], "argument --lr: must be positive"),
        (["vae", "--arch", "conv64"], "needs height and width divisible by 16"),
    ],
)
def test_bad_options_say_what_is_wrong(argv, message, mnist_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        main(["train", *argv, "--data-dir", str(mnist_dir), "--out", str(tmp_path / "run"), "--steps", "1"])
    assert message in str(error.value.code) + capsys.readouterr().err


def test_an_unknown_model_lists_the_models(capsys):
    with pytest.raises(SystemExit) as error:
        main(["train", "gan"])
    assert error.value.code == 2 and "iwae-k50-dreg" in capsys.readouterr().out


def test_missing_files_name_the_file_and_the_place(tmp_path, monkeypatch):
    for load, name, place in [
        (lambda: data.load_dataset("mnist", tmp_path), "train-images-idx3-ubyte.gz", "mnist"),
        (lambda: data.load_dataset("binarized-mnist", tmp_path), "binarized_mnist_train.mat", "binarized_mnist"),
        (lambda: data.load_dataset("frey", tmp_path), "freyfaces_uint8.npz or frey_rawface.mat", "frey_faces"),
        (lambda: data.load_dataset("caltech", tmp_path), "caltech101_silhouettes_28.mat", "caltech101_silhouettes"),
    ]:
        with pytest.raises(FileNotFoundError) as error:
            load()
        assert name in str(error.value) and str(tmp_path / place) in str(error.value)
        assert "--download" in str(error.value)

    def offline(url, path):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(
        FileNotFoundError,
        match=r"Downloading failed: https://cs.nyu.edu/~roweis/data/frey_rawface.mat"
        r" \(<urlopen error no network>\)",
    ):
        data.load_frey_faces(tmp_path, download=True)


def test_download_places_the_canonical_file(tmp_path, monkeypatch):
    import numpy
    import scipy.io

    def fake_download(url, path):
        assert url == data.CANONICAL_URLS["frey_rawface.mat"]
        path.parent.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(path, {"ff": numpy.arange(560 * 3, dtype="uint8").reshape(3, 560).T})

    monkeypatch.setattr(data, "_download", fake_download)
    faces = data.load_frey_faces(tmp_path, download=True)
    assert faces.shape == (3, 560) and faces[1, 0] == 560 % 256
    assert (tmp_path / "frey_faces" / "frey_rawface.mat").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_train_with_ddp(mnist_dir, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "models",
        "train",
        "iwae-k5",
        "--data-dir",
        str(mnist_dir),
        "--out",
        str(out),
        "--k",
        "2",
        "--steps",
        "3",
        "--device",
        "cpu",
        *TINY,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY)}
    # A session of its own, so a timeout ends the workers too, not only torchrun.
    process = subprocess.Popen(
        command,
        cwd=REPOSITORY,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["world_size"] == 2 and checkpoint["step"] == 3 and len(checkpoint["rng"]) == 2
    assert not torch.equal(checkpoint["rng"][0]["cpu"], checkpoint["rng"][1]["cpu"])  # each its own noise


def test_evaluate_and_the_seed_tables_run_on_trained_models(mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", "hvae", "--data-dir", str(mnist_dir), "--out", str(out), "--steps", "2", *TINY])
    first = main(["evaluate", str(out), "--num-samples", "12", "--no-progress", "--data-dir", str(mnist_dir)])
    assert json.loads((out / "evaluation.json").read_text())["nll"] == pytest.approx(first["nll"])
    assert first["nll_examples"] == 20 and "active_units_top" in first
    results = main(
        [
            "study",
            "seed-tables",
            "--only",
            "vae",
            "iwae-k5",
            "--budget",
            "1",
            "--limit-train",
            "20",
            "--batch-size",
            "10",
            "--num-samples",
            "10",
            "--nll-limit",
            "5",
            "--surgery-limit",
            "8",
            "--no-progress",
            "--data-dir",
            str(mnist_dir),
            "--out",
            str(tmp_path / "compare"),
        ]
    )
    printed = capsys.readouterr().out
    assert "| 5 | - | - | " in printed and "| VAE |" in printed and results["iwae-k5"]["steps"] == 2
    assert compare.main(["--only", "vae", "--out", str(tmp_path / "compare")])["vae"] == results["vae"]  # read back
    with pytest.raises(SystemExit):
        main(["evaluate", str(tmp_path / "missing")])
