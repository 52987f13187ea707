"""``make gpu-check``: what a first lent GPU should run, in one command and one time budget.

1. Builds the C++/CUDA extensions in place against this machine's torch (``VAEKERNELS_CUDA=1``:
   a missing toolkit fails the build instead of leaving the CUDA kernels out).
2. Runs the tests that take CUDA tensors (``pytest tests -k cuda``) and the half-precision tests.
3. Runs ``pytest bench -k cuda`` (ops and models, on CUDA only).
4. Appends a section to bench/RESULTS.md: device, driver, CUDA, torch and triton versions, each
   step's outcome and time, and the bench's table (.benchmarks/last_run.md).

Every step runs in its own process group under what is left of ``--budget`` (default 540 s,
inside the 10 minutes a device call allows); a step that would overrun is stopped, and the steps
after it are reported as not run, so the section is written either way. Without a CUDA device it
prints one line and exits 0. ``--dry-run`` goes through the steps without a GPU: no build,
``pytest --collect-only`` for the test steps, the section written to ``--results``. Where the
machine works on a copy of the tree, ``--results`` and ``--logs`` point at what comes back.

Usage: python bench/gpu_check.py [--budget S] [--results PATH] [--logs DIR] [--dry-run]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Seconds kept back from the budget for the last step's teardown and the report.
RESERVE = 20
NO_TESTS_COLLECTED = 5  # pytest's exit code


@dataclasses.dataclass
class Step:
    name: str
    command: list[str]
    status: str = "not run (time budget)"
    seconds: float = 0.0
    tail: str = ""


def cuda_device() -> str | None:
    """The CUDA device's name, or None (no torch, no CUDA build, no device)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def versions(device: str) -> dict[str, str]:
    import torch

    found = {"device": device, "torch": torch.__version__, "CUDA (torch)": str(torch.version.cuda)}
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        found["triton"] = "not installed"
    driver = "unknown"
    if shutil.which("nvidia-smi"):
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        driver = query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout.strip() else driver
    found["driver"] = driver
    found["python"] = sys.version.split()[0]
    return found


def steps(python: str, dry_run: bool) -> list[Step]:
    collect = ["--collect-only", "-q"] if dry_run else []
    pytest = [python, "-m", "pytest", "-p", "no:cacheprovider"]
    build = [python, "setup.py", "build_ext", "--inplace"]
    return [
        Step("build the extensions (VAEKERNELS_CUDA=1)", ["echo", "dry run:", *build] if dry_run else build),
        Step(
            "GPU tests: pytest tests -k 'cuda or half_precision'",
            [*pytest, "tests", "-q", "-k", "cuda or half_precision", *collect],
        ),
        Step("GPU bench: pytest bench -k cuda", [*pytest, "bench", "-k", "cuda", *collect]),
    ]


def run_step(step: Step, deadline: float, env: dict[str, str], log: Path | None, dry_run: bool) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        return
    start = time.monotonic()
    # A process group of its own: a stopped pytest takes its compile workers and children with it.
    process = subprocess.Popen(
        step.command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=left)
        if process.returncode == 0:
            step.status = "passed"
        elif process.returncode == NO_TESTS_COLLECTED and dry_run:
            step.status = "nothing selected (no CUDA here)"
        else:
            step.status = f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        step.status = f"stopped after {left:.0f} s (time budget)"
    step.seconds = time.monotonic() - start
    lines = [line for line in output.splitlines() if line.strip()]
    step.tail = lines[-1] if lines else ""
    if log is not None:
        log.mkdir(parents=True, exist_ok=True)
        with open(log / "gpu_check.log", "a") as f:
            f.write(f"$ {' '.join(step.command)}\n{output}\n")
    print(f"gpu-check: {step.name}: {step.status} in {step.seconds:.0f} s ({step.tail})", flush=True)


def section(found: dict[str, str], done: list[Step], bench_table: str | None, dry_run: bool) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## GPU check{' (dry run, no GPU)' if dry_run else ''}: {found['device']}, {when}",
        "",
        "`make gpu-check` (bench/gpu_check.py).",
        "",
        "| " + " | ".join(found) + " |",
        "|" + "---|" * len(found),
        "| " + " | ".join(found.values()) + " |",
        "",
        "| step | outcome | seconds | last line |",
        "|:---|:---|---:|:---|",
    ]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.tail.replace('|', '/')} |" for s in done]
    if bench_table:
        lines += ["", bench_table.strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for everything (default 540)")
    parser.add_argument(
        "--results",
        type=Path,
        default=ROOT / "bench" / "RESULTS.md",
        help="the markdown file the section is appended to",
    )
    parser.add_argument("--logs", type=Path, default=None, help="a folder for each step's whole output")
    parser.add_argument("--dry-run", action="store_true", help="no GPU needed: no build, tests collected only")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget - RESERVE

    device = cuda_device()
    if device is None and not args.dry_run:
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False or torch is missing); nothing to do")
        return 0
    env = dict(
        os.environ,
        VAEKERNELS_CUDA="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    done = steps(sys.executable, args.dry_run)
    started = time.time()
    for step in done:
        run_step(step, deadline, env, args.logs, args.dry_run)
        if step is done[0] and step.status != "passed":
            break  # nothing to test without the extensions
    # The bench writes its table here (bench/conftest.py); an older file is another run's.
    last_run = ROOT / ".benchmarks" / "last_run.md"
    fresh = last_run.exists() and last_run.stat().st_mtime >= started
    table = last_run.read_text() if fresh and not args.dry_run else None
    report = section(versions(device or "none"), done, table, args.dry_run)
    with open(args.results, "a") as f:
        f.write("\n" + report)
    print(f"gpu-check: wrote the section to {args.results}")
    failed = [s for s in done if s.status.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
