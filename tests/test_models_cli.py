"""``python -m models``: every model of the registry trains through ``train`` on small data written here in the
standard file formats, writes a checkpoint and its PNGs, and ``--resume`` continues it exactly; ``list``,
``evaluate``, ``sample`` and every model's ``reproduce`` preset (at one step) on top."""

import json

import pytest
import torch
from fake_data import write_fake_mnist

from models.cli import main
from models.registry import MODELS

# Beyond each model's small options: fewer pixel-by-pixel samples, so that the pictures stay quick.
EXTRA = {
    "pixelcnn++": ["--samples", "1"],
    "pixelsnail": ["--samples", "1"],
    "pixelvae": ["--samples", "1"],
    "vlae": ["--samples", "1"],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_mnist(root, train=6, test=12)  # batches of 4: two steps an epoch, the second of 2 images
    return root


def options(name, data_dir):
    small = [item for key, value in MODELS[name].small.items() for item in ("--" + key.replace("_", "-"), str(value))]
    return ["--data-dir", str(data_dir), "--batch-size", "4", "--no-progress", *small, *EXTRA.get(name, [])]


def test_list_shows_every_model(capsys):
    main(["list"])
    shown = capsys.readouterr().out
    assert all(f"  {name} " in shown for name in MODELS)


@pytest.mark.parametrize("name", list(MODELS))
def test_train_writes_a_run_and_resume_continues_it_exactly(name, data_dir, tmp_path):
    common = options(name, data_dir)
    # The resumed run starts the second epoch: its order and its data's randomness are the uninterrupted run's.
    whole = main(["train", name, "--out", str(tmp_path / "whole"), "--steps", "3", *common])
    main(["train", name, "--out", str(tmp_path / "split"), "--steps", "2", *common])
    split = main(["train", name, "--out", str(tmp_path / "split"), "--resume", "--steps", "3", "--no-progress"])
    assert whole["steps"] == split["steps"] == 3 and whole["pictures"]
    for picture in whole["pictures"]:
        assert (tmp_path / "whole" / picture).stat().st_size > 0
    first, second = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=False) for run in ("whole", "split"))
    assert first["history"] == second["history"]
    for key, value in first["model"].items():
        assert torch.equal(value, second["model"][key]), key
    assert json.loads((tmp_path / "split" / "metrics.json").read_text())["steps"] == 3


def test_a_run_is_never_overwritten(data_dir, tmp_path):
    argv = ["train", "vae", "--out", str(tmp_path), "--steps", "1", *options("vae", data_dir)]
    main(argv)
    with pytest.raises(SystemExit, match="2"):
        main(argv)


@pytest.mark.parametrize("name", ["iwae-k5", "nice", "revnet"])
def test_evaluate_and_sample_a_run(name, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    main(["train", name, "--out", str(run), "--steps", "1", *options(name, data_dir)])
    metrics = main(["evaluate", str(run), "--num-samples", "3", "--no-progress"])
    again = main(["evaluate", str(run), "--num-samples", "3", "--no-progress"])
    assert (run / "evaluation.json").is_file() and (run / "evaluation-1.json").is_file()
    timeless = [{key: value for key, value in m.items() if not key.endswith("seconds")} for m in (metrics, again)]
    assert timeless[0] == timeless[1]  # the same seed gives the same numbers
    written = main(["sample", str(run)])
    assert written and all(path.parent == run / "pictures" and path.is_file() for path in written)


def test_train_help_shows_only_the_models_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "vae", "--help"])
    help_text = capsys.readouterr().out
    assert "--latent-dim" in help_text and "--beta" in help_text and "--tolerance" not in help_text
    with pytest.raises(SystemExit):
        main(["train", "geco", "--help"])
    assert "--tolerance" in capsys.readouterr().out


def test_a_non_finite_loss_stops_the_run(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="not finite"):
        main(["train", "vae", "--out", str(tmp_path), "--steps", "2", "--lr", "1e30", *options("vae", data_dir)])


@pytest.mark.parametrize("name", list(MODELS))
def test_reproduce_runs_the_preset_at_a_tiny_budget(name, data_dir, tmp_path, capsys):
    preset = MODELS[name].reproduce
    result = main(
        ["reproduce", name, "--out", str(tmp_path), "--steps", "1", "--limit", "4", "--num-samples", "2"]
        + options(name, data_dir)
    )
    assert result["steps"] == 1 and (tmp_path / "reproduce.json").is_file()
    assert set(preset.metrics) <= set(result["numbers"])  # every number the preset reports is measured
    assert set(preset.reached or {}) <= {*preset.metrics, "train_cpu_seconds"}
    assert set(preset.seed) <= set(preset.metrics)
    printed = capsys.readouterr().out
    assert all(metric in printed for metric in preset.metrics)
