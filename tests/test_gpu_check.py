"""``make gpu-check`` (bench/gpu_check.py) on a machine without a GPU: its one line, its dry run,
and its time guard."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine make gpu-check runs the whole check")


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


@no_gpu
def test_make_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_0(tmp_path):
    results = tmp_path / "RESULTS.md"
    done = subprocess.run(
        ["make", "-s", "gpu-check", f"PYTHON={sys.executable}", f"GPU_CHECK_ARGS=--results {results}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        "gpu-check: no CUDA device here (torch.cuda.is_available() is False or torch is missing); nothing to do"
    ]
    assert not results.exists()


@no_gpu
def test_dry_run_goes_through_every_step_and_writes_the_section(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier sections stay\n")
    assert _gpu_check().main(["--dry-run", "--results", str(results), "--logs", str(tmp_path / "logs")]) == 0

    text = results.read_text()
    assert text.startswith("# earlier sections stay\n")
    assert "## GPU check (dry run, no GPU): none" in text
    import triton

    assert f"| none | {torch.__version__} | {torch.version.cuda} | {triton.__version__} |" in text
    rows = {
        line.split(" | ")[0].lstrip("| "): line.split(" | ")[1]
        for line in text.splitlines()
        if line.startswith(("| build", "| GPU"))
    }
    assert rows == {
        "build the extensions (VAEKERNELS_CUDA=1)": "passed",
        "GPU tests: pytest tests -k 'cuda or half_precision'": "passed",
        "GPU bench: pytest bench -k cuda": "nothing selected (no CUDA here)",
    }
    # The half-precision tests are what the test step collects without CUDA.
    assert "tests/test_half_precision.py: " in (tmp_path / "logs" / "gpu_check.log").read_text()


@no_gpu
def test_a_step_past_the_budget_is_stopped_and_the_rest_reported_not_run(tmp_path, monkeypatch):
    gpu_check = _gpu_check()
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    monkeypatch.setattr(
        gpu_check,
        "steps",
        lambda python, dry_run: [
            gpu_check.Step("build", ["true"]),
            gpu_check.Step("slow", sleeper),
            gpu_check.Step("after", ["true"]),
        ],
    )
    results = tmp_path / "RESULTS.md"
    assert gpu_check.main(["--dry-run", "--results", str(results), "--budget", str(gpu_check.RESERVE + 2)]) == 0

    rows = [
        line.split(" | ")[:2]
        for line in results.read_text().splitlines()
        if line.startswith(("| build", "| slow", "| after"))
    ]
    assert [name for name, _ in rows] == ["| build", "| slow", "| after"]
    assert rows[0][1] == "passed"
    assert rows[1][1].startswith("stopped after ") and rows[1][1].endswith(" s (time budget)")
    assert rows[2][1] == "not run (time budget)"
