"""What every bench/test_<family>.py shares: the contenders, the timing, the memory readings.

A benchmark group is one op at one shape in one mode; its contenders are ``reference`` (the
readable PyTorch of ``vaekernels.reference``), ``compiled`` (``torch.compile`` of that
reference) and ``fused`` (the public ``vaekernels`` op). pytest-benchmark runs one timing per
test, so each test times one contender with :func:`run_contenders`, and bench/conftest.py puts
the contenders of a group side by side at the end of the session.

Memory readings (in ``benchmark.extra_info``):

- ``peak_bytes``: how far the memory PyTorch's allocator hands out rose above its level before
  one call: ``torch.cuda.max_memory_allocated`` on CUDA, the running total that the profiler's
  allocation events carry on the CPU (tensors of PyTorch, of compiled graphs and of the C++
  kernels alike).
- ``saved_bytes`` (forward+backward): bytes the autograd graph keeps for backward beyond the
  inputs themselves, counted with ``torch.autograd.graph.saved_tensors_hooks``.
- :func:`peak_bytes_in_subprocess`: the resident-memory peak (VmHWM) of one call in a fresh
  interpreter, for whole-pipeline readings such as NLL evaluation against K.

Bandwidth readings (in ``benchmark.extra_info``, for ops bound by memory, when the case passes
``bytes_moved``, e.g. from :func:`streamed_bytes`): ``bytes_moved``, the bytes a fused
implementation must move at least; ``achieved_GBps``, those bytes over the median time;
``attainable_GBps``, what :func:`attainable_bandwidth` measured on the device; and
``bandwidth_fraction``, achieved over attainable.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

CONTENDERS = ("reference", "compiled", "fused")
MODES = ("forward", "forward+backward")

BENCH_DIR = Path(__file__).resolve().parent

# While a resident-memory peak is read, glibc maps every block of 128 KiB or more on its own, so
# a tensor's pages are resident exactly while it lives (its default threshold adapts upwards
# and would keep freed blocks, resident, in its heap).
_READING_MMAP_THRESHOLD = 128 << 10
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1


def devices() -> list[str]:
    """The devices to benchmark on: the CPU, and CUDA when there is one."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``torch.compile`` of ``fn`` with static shapes, one wrapper per function for the session."""
    return torch.compile(fn, dynamic=False)


def contender_fn(contender: str, reference: Callable, fused: Callable) -> Callable:
    """The function that ``contender`` runs."""
    return {"reference": reference, "compiled": compiled(reference), "fused": fused}[contender]


def run_contenders(
    benchmark,
    fn: Callable,
    inputs: Sequence,
    *,
    op: str,
    shape: str,
    mode: str,
    contender: str,
    warmup_calls: int = 3,
    time_budget_s: float = 1.0,
    min_rounds: int = 3,
    max_rounds: int = 200,
    measure_memory: bool = True,
    bytes_moved: int | None = None,
    **extra_info,
) -> None:
    """Times one contender of the group ``"<op> <shape> <mode>"`` and records its memory.

    ``mode="forward"`` times ``fn(*inputs)`` under ``torch.no_grad()``; ``"forward+backward"``
    times the forward and the backward of its sum into every input that requires grad. The
    ``warmup_calls + 1`` calls before (compilation included), the fastest of which sizes the
    rounds to about ``time_budget_s``, stay out of the timing. ``bytes_moved`` (ops bound by
    memory) adds the bandwidth readings of the module docstring. Keyword arguments left over go
    to ``extra_info``.

    Example:
        >>> def test_log_mean_exp(benchmark, contender):
        ...     x = torch.randn(128, 5000, requires_grad=True)
        ...     fn = contender_fn(contender, reference.log_mean_exp, vaekernels.log_mean_exp)
        ...     run_contenders(benchmark, fn, (x,), op="log_mean_exp", shape="128x5000",
        ...                    mode="forward+backward", contender=contender)
    """
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    device = tensors[0].device
    step = _step(fn, inputs, mode, device)
    benchmark.group = f"{op} {shape} {mode}"
    benchmark.extra_info.update(
        op=op,
        shape=shape,
        mode=mode,
        contender=contender,
        dtype=str(tensors[0].dtype).removeprefix("torch."),
        device=device.type,
        **extra_info,
    )

    # The fastest call sizes the rounds: the first ones compile, and a busy machine only slows.
    seconds = min(_timed(step) for _ in range(warmup_calls + 1))
    # Rounds of at least a millisecond, so the timer's resolution and the per-round overhead
    # of pytest-benchmark do not show in microsecond ops.
    iterations = max(1, int(1e-3 / max(seconds, 1e-9)))
    rounds = min(max_rounds, max(min_rounds, int(time_budget_s / (seconds * iterations))))
    benchmark.pedantic(step, rounds=rounds, iterations=iterations, warmup_rounds=1 if seconds < 0.1 else 0)

    # benchmark.stats is None under --benchmark-disable.
    if bytes_moved is not None and benchmark.stats:
        achieved, attainable = bytes_moved / benchmark.stats.stats.median, attainable_bandwidth(device.type)
        benchmark.extra_info.update(
            bytes_moved=bytes_moved,
            achieved_GBps=achieved / 1e9,
            attainable_GBps=attainable / 1e9,
            bandwidth_fraction=achieved / attainable,
        )
    if measure_memory:
        benchmark.extra_info["peak_bytes"] = peak_bytes(step, device)
    if mode == "forward+backward":
        benchmark.extra_info["saved_bytes"] = saved_bytes(lambda: fn(*inputs), keep=tensors)


def _timed(step: Callable[[], None]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def _synchronizer(device: torch.device | str) -> Callable[[], None]:
    # Kernels return before the device finishes; a timed call must include the work.
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def _step(fn: Callable, inputs: Sequence, mode: str, device: torch.device) -> Callable[[], None]:
    if mode not in MODES:
        raise ValueError(f"run_contenders: mode must be one of {', '.join(MODES)}, got {mode!r}")
    synchronize = _synchronizer(device)
    if mode == "forward":

        def forward():
            with torch.no_grad():
                fn(*inputs)
            synchronize()

        return forward

    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves:
        raise ValueError("run_contenders: mode 'forward+backward' needs inputs that require grad, got none")

    def forward_backward():
        torch.autograd.grad(_total(fn(*inputs)), leaves)
        synchronize()

    return forward_backward


def _total(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.sum()
    return sum(t.sum() for t in out)


BANDWIDTH_PROBE = "torch.add(a, 1, out=b) over 256 MB of float32 (a read, b written), median of 5 runs"


@functools.cache
def attainable_bandwidth(device: str) -> float:
    """The memory bandwidth ``device`` attains, in bytes/s, measured once per session: see
    :data:`BANDWIDTH_PROBE`. 256 MB is far beyond any cache; the CPU runs torch's threads."""
    a = torch.ones(256 * 10**6 // 4, device=device)
    b = torch.empty_like(a)
    synchronize = _synchronizer(device)

    def add():
        torch.add(a, 1, out=b)
        synchronize()

    add()  # b's pages are touched, the kernel loaded
    seconds = sorted(_timed(add) for _ in range(5))[2]
    return (a.nbytes + b.nbytes) / seconds


def streamed_bytes(read: int, written: int, grads: int) -> dict[str, int]:
    """Per mode, the bytes an op bound by memory must move at least when fused: the forward reads
    its inputs (``read`` bytes) and writes its outputs (``written``) once; the backward reads the
    inputs again and the outputs' gradients, and writes the inputs' gradients (``grads``)."""
    return {"forward": read + written, "forward+backward": 2 * (read + written) + grads}


def saved_bytes(forward: Callable, keep: Sequence[torch.Tensor] = ()) -> int:
    """Bytes the autograd graph of ``forward()`` holds for backward, beyond the storages of
    ``keep`` (the inputs, which the caller holds anyway); a storage saved twice counts once."""
    kept = {t.untyped_storage().data_ptr() for t in keep}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in kept:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(saved.values())


def peak_bytes(step: Callable[[], None], device: torch.device | str) -> int | None:
    """How far allocated memory rose above its level before one ``step()``; None where the
    profiler cannot tell."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return _peak_cpu_allocated(step)


def _peak_cpu_allocated(step: Callable[[], None]) -> int | None:
    # Each allocation event of a profiling session carries the CPU allocator's running total
    # since the session began. The event tree is private API: without it there is no reading.
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            step()
        events = list(_walk(profiler.profiler.kineto_results.experimental_event_tree()))
        totals = [
            event.extra_fields.total_allocated
            for event in events
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu"
        ]
    except (ImportError, AttributeError, RuntimeError):
        return None
    return max([0, *totals])


def _walk(events):
    for event in events:
        yield event
        yield from _walk(event.children)


def keep_freed_memory() -> None:
    """Makes glibc's malloc keep freed memory in the process, as jemalloc and tcmalloc do.

    By default glibc returns large freed blocks to the system, so every step of a benchmark
    that allocates ~100 MB takes tens of thousands of page faults (each a zeroed 4 KiB page),
    and how many varies from run to run: on 2 cores this alone moves a 150 ms step by up to
    50 ms. With freed memory kept, a timing is the compute alone. Raises off glibc.
    """
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt"):
        raise RuntimeError("keep_freed_memory: needs glibc's mallopt, which this system lacks")
    # Blocks below the mmap threshold come from the heap, not a mapping of their own; free heap
    # memory above the trim threshold would go back to the system.
    if not (libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)):
        raise RuntimeError("keep_freed_memory: glibc's mallopt refused the thresholds")


def interleaved_medians(
    calls: dict[str, Callable[[], None]], device: str, rounds: int, warmup: int = 2
) -> dict[str, float]:
    """Median seconds of each zero-argument call on ``device``, timed round-robin: one call of
    each per round for ``rounds`` rounds after ``warmup`` calls of each. On a machine shared with
    other work, and under an allocator whose state drifts, what comes and goes then falls on
    every contender alike, where pytest-benchmark's groups time one contender after another."""
    synchronize = _synchronizer(device)

    def synchronized(call):
        def run():
            call()
            synchronize()

        return run

    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(_timed(synchronized(call)))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def report_interleaved(title: str, file_stem: str, row_label: str, medians: dict[str, float]) -> None:
    """Prints the medians and fused's speed-ups (visible with ``-s``) and appends them as a
    markdown row to ``.benchmarks/<file_stem>_interleaved.md``."""
    names = list(medians)
    print(
        f"\n{title}, interleaved medians (ms): "
        + ", ".join(f"{n} {1e3 * m:.1f}" for n, m in medians.items())
        + "; fused speed-up: "
        + ", ".join(f"{m / medians['fused']:.2f}× {n}" for n, m in medians.items() if n != "fused")
    )
    line = (
        f"| {row_label} | "
        + " | ".join(f"{1e3 * medians[n]:.1f}" for n in names)
        + " | "
        + " | ".join(f"{medians[n] / medians['fused']:.2f}×" for n in names if n != "fused")
        + " |"
    )
    path = BENCH_DIR.parent / ".benchmarks" / f"{file_stem}_interleaved.md"
    path.parent.mkdir(exist_ok=True)
    with path.open("a") as table:
        table.write(line + "\n")


def peak_rss_growth(step: Callable[[], None]) -> int | None:
    """Peak resident memory during ``step()`` above the resident memory before it, in bytes.

    Changes glibc's mmap threshold for the rest of the process: for a subprocess of its own
    (:func:`peak_bytes_in_subprocess`). None off Linux/glibc.
    """
    libc = ctypes.CDLL(None)
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") and os.path.exists("/proc/self/clear_refs")):
        return None
    libc.mallopt(_M_MMAP_THRESHOLD, _READING_MMAP_THRESHOLD)
    # Free heap pages go back to the system, so reusing them during the step counts again.
    libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current VmRSS
    except OSError:
        return None
    before = _status_bytes("VmRSS")
    step()
    return max(0, _status_bytes("VmHWM") - before)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


_CHILD = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
import _common
run = getattr(importlib.import_module(sys.argv[2]), sys.argv[3])(*json.loads(sys.argv[4]))
reading = _common.peak_bytes(run, "cuda") if sys.argv[5] == "cuda" else _common.peak_rss_growth(run)
print("PEAK_BYTES", json.dumps(reading))
"""


def peak_bytes_in_subprocess(module: str, setup: str, *args, device: str = "cpu", timeout_s: float = 300) -> int | None:
    """The memory peak of one call in a fresh interpreter, so nothing earlier in this session
    (caches, the allocator's history) shows in the reading: :func:`peak_rss_growth` on the
    CPU, :func:`peak_bytes` on CUDA.

    ``module`` is a module in bench/ and ``setup(*args)`` (JSON-serialisable args) one of its
    functions that builds everything, warms it up and returns the zero-argument call to read.
    """
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(BENCH_DIR), module, setup, json.dumps(args), device],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{module}.{setup}{args} failed in a subprocess:\n{result.stderr[-4000:]}")
    reading = [line for line in result.stdout.splitlines() if line.startswith("PEAK_BYTES ")][-1]
    return json.loads(reading.split(" ", 1)[1])


def available_bytes(device: str) -> int | None:
    """Free memory of ``device`` (CPU: MemAvailable), or None where unknown."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def format_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
