"""models.gated_pixelcnn (binarised) end to end on fake MNIST files: trains, reports a finite NLL, writes its
PNG grid and checkpoint, refuses to overwrite a run, resumes one."""

import json

import pytest
import torch

from models.gated_pixelcnn import main
from test_models import write_fake_mnist


def test_gated_pixelcnn_trains_from_one_command(tmp_path, levels=2):
    write_fake_mnist(tmp_path / "data", train=24, test=6)
    out = tmp_path / "run"
    args = ["--data-dir", str(tmp_path / "data"), "--out", str(out), "--channels", "4", "--layers", "2",
            "--batch-size", "8", "--levels", str(levels), "--sample-rows", "1", "--no-progress"]
    metrics = main(args)
    nll = metrics["test_nll_nats"]
    # A uniform model costs 784 log(levels) nats; an untrained one is near that, never below 0.
    assert 0 < nll < 3 * 784 * torch.log(torch.tensor(float(levels))).item()
    assert (out / "samples.png").stat().st_size > 0 and (out / "checkpoint.pt").is_file()
    assert json.loads((out / "metrics.json").read_text())["history"][0]["batches"] == 3
    with pytest.raises(SystemExit):
        main(args)  # the run exists: no overwrite without --resume
    resumed = main([*args, "--resume", "--epochs", "2"])
    assert len(resumed["history"]) == 2
