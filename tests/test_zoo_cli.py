"""The zoo's command lines on MNIST-shaped files made here: training writes its run and never
overwrites one, --resume equals an uninterrupted run bit for bit, a non-finite loss stops with a
message, bad arguments and missing files say what is wrong, two gloo processes train with DDP,
and evaluate / compare run on the result."""

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

from models import compare, data, evaluate, train, zoo
from test_models import write_fake_mnist

REPOSITORY = Path(__file__).resolve().parents[1]
TINY = ["--latent-dim", "3", "--hidden-dim", "8", "--batch-size", "10", "--limit-train", "30", "--no-progress"]


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_mnist(root, train=40, test=20)
    return root


def test_training_writes_its_run_and_never_overwrites_it(mnist_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--data-dir", str(mnist_dir), "--out", str(out), *TINY]
    summary = train.main(common + ["--model", "cvae", "--steps", "4"])
    for name in ("checkpoint.pt", "history.json", "settings.json", "reconstructions.png", "samples.png"):
        assert (out / name).is_file(), name
    assert summary["step"] == 4 and len(summary["history"]["loss"]) == 4
    with pytest.raises(SystemExit):
        train.main(common + ["--steps", "4"])
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 4


def _state(path):
    checkpoint = torch.load(path, weights_only=False)
    return checkpoint["model"], checkpoint["optimizer"]["state"], checkpoint["step"]


@pytest.mark.parametrize("model", ["geco", "iwae"])
def test_resume_continues_exactly(mnist_dir, tmp_path, model):
    common = ["--data-dir", str(mnist_dir), "--model", model, "--k", "2", "--estimator", "dreg"
              if model == "iwae" else "iwae", *TINY]
    # 3 steps an epoch: the stop after 2 falls mid-epoch and the run goes on into the next one.
    train.main(common + ["--out", str(tmp_path / "whole"), "--steps", "5"])
    train.main(common + ["--out", str(tmp_path / "split"), "--steps", "2"])
    train.main(["--out", str(tmp_path / "split"), "--resume", "--steps", "5", "--no-progress"])
    (whole, whole_optim, whole_step), (split, split_optim, split_step) = (
        _state(tmp_path / name / "checkpoint.pt") for name in ("whole", "split"))
    assert whole_step == split_step == 5
    assert whole.keys() == split.keys()
    for key in whole:
        assert torch.equal(whole[key], split[key]), key
    for index, state in whole_optim.items():
        for key, value in state.items():
            assert torch.equal(value, split_optim[index][key]), (index, key)


def test_a_non_finite_loss_stops_the_run_with_a_message(mnist_dir, tmp_path, monkeypatch):
    def broken(self, x, y=None, generator=None):
        reconstruction = self.decode(torch.zeros(len(x), 1, self.latent_dim), y).sum(-1).mean(1)
        return reconstruction * float("nan"), reconstruction

    monkeypatch.setattr(zoo.VAE, "terms", broken)
    with pytest.raises(SystemExit, match=r"the loss became nan at step 1 .*lower --lr"):
        train.main(["--data-dir", str(mnist_dir), "--out", str(tmp_path / "run"), *TINY])


@pytest.mark.parametrize("argv, message", [
    (["--k", "0"], "--k must be a positive integer, got 0"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--model", "geco-iwae", "--estimator", "dreg"], "geco-iwae takes --estimator iwae or stl"),
    (["--model", "hiwae", "--estimator", "stl"], "hiwae takes only --estimator iwae"),
    (["--model", "cvae", "--data", "binarized-mnist"], "cvae needs labels"),
    (["--resume", "--out", "/nonexistent/run"], "--resume needs --out RUN_DIR holding checkpoint.pt"),
    (["--model", "gan"], "invalid choice: 'gan'"),
])
def test_bad_arguments_say_what_is_wrong(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        train.parse_args(argv)
    assert error.value.code == 2 and message in capsys.readouterr().err


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
    with pytest.raises(FileNotFoundError, match=r"Downloading failed: https://cs.nyu.edu/~roweis/data/frey_rawface.mat"
                                                r" \(<urlopen error no network>\)"):
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
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "models.train", "--data-dir", str(mnist_dir), "--out", str(out),
               "--model", "iwae", "--k", "2", "--steps", "3", "--device", "cpu", *TINY]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY)}
    # A session of its own, so a timeout ends the workers too, not only torchrun.
    process = subprocess.Popen(command, cwd=REPOSITORY, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["world_size"] == 2 and checkpoint["step"] == 3 and len(checkpoint["noise"]) == 2


def test_evaluate_and_compare_run_on_a_trained_model(mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(["--data-dir", str(mnist_dir), "--out", str(out), "--model", "hvae", "--steps", "2", *TINY])
    argv = [str(out / "checkpoint.pt"), "--num-samples", "12", "--chunk-size", "5", "--no-progress",
            "--data-dir", str(mnist_dir)]
    first = evaluate.main(argv)
    evaluate.main(argv)
    assert (out / "evaluation.json").is_file() and (out / "evaluation-1.json").is_file()
    assert json.loads((out / "evaluation.json").read_text())["nll"] == pytest.approx(first["nll"])
    assert first["nll_examples"] == 20 and "active_units_top" in first
    results = compare.main(["--only", "vae", "iwae-k5", "--budget", "1", "--limit-train", "20", "--batch-size", "10",
                            "--num-samples", "10", "--nll-limit", "5", "--surgery-limit", "8", "--no-progress",
                            "--data-dir", str(mnist_dir), "--out", str(tmp_path / "compare")])
    printed = capsys.readouterr().out
    assert "| 5 | - | - | " in printed and "| VAE |" in printed and results["iwae-k5"]["steps"] == 2
    with pytest.raises(SystemExit):
        evaluate.parse_args([str(tmp_path / "missing.pt")])
