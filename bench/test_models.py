"""One training step of every reference model, the way a user meets vaekernels.

For each model of :data:`models.registry.REGISTRY`, at its command line's defaults: one training
step (loss, backward, optimiser) with four contenders, each on its own copy of the same initial
weights and on the same batch:

- ``reference``: the model with every vaekernels op on the PyTorch reference backend;
- ``fused``: the same model on the fused kernels (the default backend);
- ``compiled reference`` / ``compiled fused``: the model's loss under ``torch.compile`` (inductor,
  the default backend), on either backend. The optimiser step runs eagerly in all four.

The contenders are timed round-robin in one process (:func:`_common.interleaved_medians`), so
what comes and goes on the machine falls on all alike. Each row also carries the first step's
loss of every contender (the fused step's is asserted to be the reference's: the same weights, batch
and noise; inductor draws its own random numbers, so the compiled contenders' losses are shown,
not compared: tests/test_model_compile.py compares them with inductor drawing as eager does) and
the peak memory of one step of the reference and of the fused model.

``pytest bench/test_models.py`` prints the table and writes it as markdown to
``.benchmarks/models.md``; ``-k iwae`` picks models. ``VAEKERNELS_BENCH_ROUNDS`` sets the rounds
(at most; default 15, fewer for slow models).
"""

from __future__ import annotations

import copy
import math
import os
import time

import pytest
import torch
from _common import BENCH_DIR, format_bytes, interleaved_medians, peak_bytes

import vaekernels
from models.registry import REGISTRY

CONTENDERS = ("reference", "fused", "compiled reference", "compiled fused")
# Rounds of the four steps: as many as fit in about TIME_BUDGET_S, within [MIN_ROUNDS, ROUNDS].
ROUNDS = int(os.environ.get("VAEKERNELS_BENCH_ROUNDS", "15"))
MIN_ROUNDS, TIME_BUDGET_S = 5, 20.0
# Sampling models draw their noise from the global generator: seeded alike before every step.
SEED = 0
TABLE = BENCH_DIR.parent / ".benchmarks" / "models.md"
_rows: dict[str, dict] = {}


def _contender(entry, initial_state, batch, name: str):
    """A zero-argument training step of contender ``name`` and its first step's loss."""
    model = entry.build()
    model.load_state_dict(initial_state)
    model.train()
    optimizer = entry.optimizer(model)
    backend = "reference" if "reference" in name else "auto"
    loss_fn = torch.compile(entry.loss) if name.startswith("compiled") else None
    if loss_fn is not None and entry.train_step is not None:
        # A model that steps its players itself: its parts are compiled instead of its loss.
        for child_name, child in list(model.named_children()):
            setattr(model, child_name, torch.compile(child))

    def step():
        with vaekernels.use_backend(backend):
            return entry.step(model, optimizer, batch, loss_fn)

    torch.manual_seed(SEED)
    try:
        first_loss = float(step())
    except Exception as error:  # inductor fails on some models (tests/test_model_compile.py lists them)
        if loss_fn is None:
            raise
        return None, f"fails: {type(error).__name__}"
    return step, first_loss


def _seconds(step) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def _peak(step) -> int | None:
    torch.manual_seed(SEED)
    return peak_bytes(step, "cpu")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_training_step(name):
    entry = REGISTRY[name]
    torch.set_num_threads(torch.get_num_threads())
    torch.manual_seed(SEED)
    initial = copy.deepcopy(entry.build().state_dict())
    batch = entry.batch(torch.Generator().manual_seed(SEED))
    steps, first = {}, {}
    for contender in CONTENDERS:
        step, first[contender] = _contender(entry, initial, batch, contender)
        if step is not None:
            steps[contender] = step
    seconds_per_round = sum(_seconds(step) for step in steps.values())
    rounds = min(ROUNDS, max(MIN_ROUNDS, int(TIME_BUDGET_S / seconds_per_round)))
    medians = interleaved_medians(steps, "cpu", rounds)
    peaks = {contender: _peak(steps[contender]) for contender in ("reference", "fused")}
    _rows[name] = {"entry": entry, "medians": medians, "first": first, "peaks": peaks, "rounds": rounds}

    assert all(math.isfinite(loss) for loss in first.values() if not isinstance(loss, str)), first
    # The same weights, batch and noise: the fused step computes the reference's loss.
    assert first["fused"] == pytest.approx(first["reference"], rel=1e-4, abs=1e-4)


def _milliseconds(seconds: float | None) -> str:
    return "—" if seconds is None else f"{1e3 * seconds:.1f}"


def _speedup(slower: float | None, faster: float) -> str:
    return "—" if slower is None else f"{slower / faster:.2f}×"


def _table() -> list[str]:
    header = [
        "model",
        "reference ms",
        "fused ms",
        "compiled reference ms",
        "compiled fused ms",
        "fused × reference",
        "fused × compiled reference",
        "best × compiled reference",
        "peak fused / reference",
        "first-step losses (ref, fused, compiled ref, compiled fused)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in _rows.items():
        m, peaks = row["medians"], row["peaks"]
        best = min(t for t in (m["fused"], m.get("compiled fused")) if t is not None)
        ratio = (
            "—"
            if None in peaks.values() or not peaks["reference"]
            else (
                f"{peaks['fused'] / peaks['reference']:.2f} ({format_bytes(peaks['fused'])} / "
                f"{format_bytes(peaks['reference'])})"
            )
        )
        cells = [
            f"{name}: {row['entry'].description}",
            *(_milliseconds(m.get(c)) for c in CONTENDERS),
            _speedup(m["reference"], m["fused"]),
            _speedup(m.get("compiled reference"), m["fused"]),
            _speedup(m.get("compiled reference"), best),
            ratio,
            ", ".join(f"{loss:.4g}" if not isinstance(loss, str) else loss for loss in row["first"].values()),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


@pytest.fixture(scope="session", autouse=True)
def _report():
    yield
    if not _rows:
        return
    lines = _table()
    legend = (
        f"One training step (loss, backward, optimiser), median of {MIN_ROUNDS} to {ROUNDS} rounds (as many as "
        f"fit in about {TIME_BUDGET_S:.0f} s) timed round-robin, "
        f"{torch.get_num_threads()} threads. best: the faster of fused and compiled fused. Peak: how far "
        "allocated memory rose during one step (CPU: the allocator's running total in the profiler's events)."
    )
    print("\n" + "\n".join([*lines, legend]))
    TABLE.parent.mkdir(exist_ok=True)
    TABLE.write_text("\n".join([*lines, "", legend]) + "\n")
