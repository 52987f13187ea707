"""The contenders of every benchmark group side by side, at the end of ``pytest bench``.

Each benchmark that carries ``extra_info["contender"]`` (see ``_common.run_contenders``) is one
cell of a table: a row per op/shape/mode and device, the median milliseconds of ``reference``,
``compiled`` and ``fused``, the speed-up of fused over the other two, fused's memory over the
reference's, and, for ops bound by memory, the fraction of the machine's bandwidth fused attains.
The table follows pytest-benchmark's own and is written as markdown to
``.benchmarks/last_run.md``.
"""

from __future__ import annotations

import datetime
import os
import platform

import _common
import pytest
import torch
import torch._inductor.config

COLUMNS = (
    "op / shape / mode",
    "device",
    "fused backend",
    "reference ms",
    "compiled ms",
    "fused ms",
    "× reference",
    "× compiled",
    "peak mem fused/ref",
    "saved fused/ref",
    "fused % of bandwidth",
)
LEGEND = (
    "ms: the median of one call; compilation and warm-up are not timed.",
    "× reference, × compiled: the speed-up of fused (their time over fused's).",
    "peak mem: how far allocated memory rose during one call (CUDA: max_memory_allocated;"
    " CPU: the allocator's running total in the profiler's allocation events).",
    "saved: the bytes kept for backward beyond the inputs.",
)


KEEP_FREED = "VAEKERNELS_BENCH_KEEP_FREED"


def pytest_configure(config):
    """Inductor compiles in this process: its pool of compile workers, started by the first
    ``torch.compile`` where there are several cores, spends the next seconds starting up beside
    the first timings (the first model's four contenders all ran 30% slower). The code it
    generates is the same.

    ``VAEKERNELS_BENCH_KEEP_FREED=1``: glibc keeps freed memory (:func:`_common.keep_freed_memory`),
    so page faults, which vary from run to run, stay out of the timings."""
    torch._inductor.config.compile_threads = 1
    if os.environ.get(KEEP_FREED, "0") in ("", "0"):
        return
    try:
        _common.keep_freed_memory()
    except RuntimeError as error:
        raise pytest.UsageError(f"{KEEP_FREED}=1: {error}") from error


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    rows = _collect(config)
    if not rows:
        return
    table = [_row(key, cells) for key, cells in rows.items()]
    notes = list(dict.fromkeys(info["note"] for cells in rows.values() for _, info in cells.values() if "note" in info))
    legend = [*LEGEND, *_bandwidth_legend(rows)]

    terminalreporter.write_sep("=", "vaekernels: fused against the PyTorch reference and torch.compile")
    terminalreporter.write_line(_machine())
    for line in _aligned(table):
        terminalreporter.write_line(line)
    for note in notes:
        terminalreporter.write_line(note)
    for line in legend:
        terminalreporter.write_line(line)

    path = config.rootpath / ".benchmarks" / "last_run.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text(_markdown(table, notes, legend))
    terminalreporter.write_line(f"(the table, as markdown: {path.relative_to(config.rootpath)})")


def _collect(config) -> dict:
    """{(group, device, dtype): {contender: (median seconds, extra_info)}}, in the order run."""
    rows: dict = {}
    benchmark_session = getattr(config, "_benchmarksession", None)
    for bench in getattr(benchmark_session, "benchmarks", []):
        info = bench.extra_info
        # A benchmark without timings (--benchmark-disable, an error) has false stats.
        if not bench or bench.has_error or "contender" not in info:
            continue
        key = (bench.group, info.get("device", "?"), info.get("dtype", "?"))
        rows.setdefault(key, {})[info["contender"]] = (bench.stats.median, info)
    return rows


def _row(key, cells) -> list[str]:
    group, device, dtype = key
    seconds = {name: cells[name][0] for name in _common.CONTENDERS if name in cells}
    fused = cells.get("fused", (None, {}))[1]
    return [
        group if dtype == "float32" else f"{group} {dtype}",
        device,
        fused.get("backend", "—"),
        *(_milliseconds(seconds.get(name)) for name in _common.CONTENDERS),
        _speedup(seconds.get("reference"), seconds.get("fused")),
        _speedup(seconds.get("compiled"), seconds.get("fused")),
        _ratio(cells, "peak_bytes"),
        _ratio(cells, "saved_bytes"),
        "—" if "bandwidth_fraction" not in fused else f"{100 * fused['bandwidth_fraction']:.0f}%",
    ]


def _bandwidth_legend(rows) -> list[str]:
    attainable = {
        info["device"]: info["attainable_GBps"]
        for cells in rows.values()
        for _, info in cells.values()
        if "attainable_GBps" in info
    }
    if not attainable:
        return []
    measured = ", ".join(f"{device} {gbps:.1f} GB/s" for device, gbps in attainable.items())
    return [
        "fused % of bandwidth: the bytes a fused op must move at least (forward: inputs read and outputs written"
        " once; backward: inputs and output gradients read again, input gradients written) over fused's median"
        f" time, against the attainable bandwidth: {measured} ({_common.BANDWIDTH_PROBE}; 1 GB = 10⁹ B)."
        " Working sets that fit in the last-level cache can pass 100%. —: bound by compute or latency.",
    ]


def _milliseconds(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _speedup(other: float | None, fused: float | None) -> str:
    return "—" if other is None or fused is None else f"{other / fused:.2f}×"


def _ratio(cells, field: str) -> str:
    reference = cells.get("reference", (None, {}))[1].get(field)
    fused = cells.get("fused", (None, {}))[1].get(field)
    if not reference or fused is None:
        return "—"
    return f"{fused / reference:.2g}"


def _aligned(table: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(COLUMNS, *table)]

    def line(cells):
        # The first three columns are names, the rest numbers.
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(COLUMNS), line(["-" * w for w in widths]), *(line(row) for row in table)]


def _markdown(table: list[list[str]], notes: list[str], legend: list[str]) -> str:
    lines = [
        "# vaekernels benchmarks",
        "",
        f"{_machine()}, {datetime.date.today().isoformat()}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(":---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|",
        *("| " + " | ".join(row) + " |" for row in table),
        "",
        *(f"- {note}" for note in notes),
        *([""] if notes else []),
        *(f"{line}  " for line in legend),
        "",
    ]
    return "\n".join(lines)


def _machine() -> str:
    import vaekernels

    parts = [f"{_cpu_name()}, {torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    parts += [f"torch {torch.__version__}", f"backends: {', '.join(vaekernels.available_backends())}"]
    for variable in ("VAEKERNELS_BACKEND", KEEP_FREED):
        if os.environ.get(variable):
            parts.append(f"{variable}={os.environ[variable]}")
    return "; ".join(parts)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
