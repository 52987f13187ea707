"""The memory-savings study: peak memory and step time of a training step against depth, for a
RevNet (reversible backward), its matched ResNet (every activation stored) and the ResNet with
per-block ``torch.utils.checkpoint``.

For each depth, each variant is built from the same seed (same F/G blocks, width, stages) and
takes full training steps (forward, cross-entropy, backward, gradients freed before each step)
on a fixed random batch. Readings:

- ``peak``: how far the memory PyTorch's allocator hands out rose above its level before the
  step, at its highest point anywhere in the forward or the backward: CUDA
  ``max_memory_allocated``; CPU, the running total the profiler's allocation events carry (the
  process's tensor memory), taken relative to its value just before the step's first
  allocation, since that running total drifts upwards from one profiled call to the next.
  Parameters exist before the step and do not count; their gradients, made during the step, do.
- ``activations``: ``peak`` less the parameter gradients' bytes: the memory that depends on how
  activations are kept.
- ``saved``: bytes the autograd graph holds for backward after the forward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (parameters and the input excluded).
- ``ms``: the median step time over ``--repeats`` steps, the variants interleaved so that a
  busy machine slows them alike.

Prints a table and writes ``table.md``, ``results.json`` and ``revnet_memory.png`` (memory and
time against depth) to ``--out``::

    python -m models study revnet-memory                      # depths 8 16 32 64
    python -m models study revnet-memory --depths 4 8 12 --out runs/study-small
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as nnf

from models.flows.revnet import MODES, RevNet
from models.training.trainer import holds_run, write_json

LABELS = {"reversible": "RevNet (reversible)", "resnet": "matched ResNet", "checkpoint": "ResNet + checkpoint/block"}


def _walk(events):
    for event in events:
        yield event
        yield from _walk(event.children)


def saved_bytes(forward, keep=()) -> int:
    """Bytes the autograd graph of ``forward()`` holds for backward, beyond the storages of ``keep`` (what the
    caller holds anyway); a storage saved twice counts once."""
    kept = {t.untyped_storage().data_ptr() for t in keep}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in kept:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(saved.values())


def step_peak(step, device: torch.device) -> int | None:
    """How far allocated memory rose above its level before one ``step()``; None where the profiler cannot
    tell (its event tree is private API)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            step()
        events = sorted(
            (
                e
                for e in _walk(profiler.profiler.kineto_results.experimental_event_tree())
                if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"
            ),
            key=lambda e: e.start_time_ns,
        )
    except (ImportError, AttributeError, RuntimeError):
        return None
    if not events:
        return 0
    before = events[0].extra_fields.total_allocated - events[0].extra_fields.alloc_size
    return max(e.extra_fields.total_allocated for e in events) - before


def _step(model, x, y, synchronize):
    def step():
        model.zero_grad(set_to_none=True)
        nnf.cross_entropy(model(x), y).backward()
        synchronize()

    return step


def measure(depths, *, width, stages, batch, size, repeats, device, seed=0, log=print) -> list[dict]:
    """One row per (depth, mode): peak, activations, saved bytes and median step time."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, size, size, generator=generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    rows = []
    for depth in depths:
        models = {}
        for mode in MODES:
            torch.manual_seed(seed)
            models[mode] = RevNet(depth, width, stages, mode=mode).to(device)
        steps = {mode: _step(model, x, y, synchronize) for mode, model in models.items()}
        times = {mode: [] for mode in MODES}
        for mode in MODES:
            steps[mode]()  # warm-up: kernels chosen, workspaces sized
        for _ in range(repeats):
            for mode in MODES:
                started = time.perf_counter()
                steps[mode]()
                times[mode].append(time.perf_counter() - started)
        for mode, model in models.items():
            model.zero_grad(set_to_none=True)
            grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            peak = step_peak(steps[mode], device)
            keep = [x, *model.parameters()]
            saved = saved_bytes(lambda model=model: nnf.cross_entropy(model(x), y), keep=keep)
            row = {
                "depth": depth,
                "mode": mode,
                "peak_bytes": peak,
                "grad_bytes": grad_bytes,
                "activation_bytes": None if peak is None else peak - grad_bytes,
                "saved_bytes": saved,
                "ms": 1e3 * statistics.median(times[mode]) if repeats else None,
                "ms_all": [1e3 * t for t in times[mode]],
            }
            rows.append(row)
            log(f"depth {depth:3d} {mode:10s} peak {_mb(peak)} MB  saved {_mb(saved)} MB  {_ms(row['ms'])} ms")
    return rows


def _mb(n) -> str:
    return "—" if n is None else f"{n / 2**20:.2f}"


def _ms(t) -> str:
    return "—" if t is None else f"{t:.1f}"


def _ratio(a, b) -> str:
    return "—" if a is None or b is None else f"{a / b:.2f}"


def table(rows: list[dict]) -> str:
    """The rows as a markdown table, with the ratios the issue's bars are stated in."""
    by = {(r["depth"], r["mode"]): r for r in rows}
    depths = sorted({r["depth"] for r in rows})
    lines = [
        "| depth | variant | peak MB | activations MB | saved for backward MB | step ms | "
        "peak / RevNet | time / RevNet |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for depth in depths:
        rev = by[(depth, "reversible")]
        for mode in MODES:
            r = by[(depth, mode)]
            lines.append(
                f"| {depth} | {LABELS[mode]} | {_mb(r['peak_bytes'])} | {_mb(r['activation_bytes'])} | "
                f"{_mb(r['saved_bytes'])} | {_ms(r['ms'])} | {_ratio(r['peak_bytes'], rev['peak_bytes'])} | "
                f"{_ratio(r['ms'], rev['ms'])} |"
            )
    revs = [by[(d, "reversible")] for d in depths]
    if revs[0]["peak_bytes"] is not None:
        growth = revs[-1]["peak_bytes"] / revs[0]["peak_bytes"] - 1
        act_growth = revs[-1]["activation_bytes"] / revs[0]["activation_bytes"] - 1
        last = depths[-1]
        lines += [
            "",
            f"RevNet peak from depth {depths[0]} to {last}: {100 * growth:+.1f}% "
            f"(activations {100 * act_growth:+.1f}%); at depth {last} the matched ResNet's peak is "
            f"{by[(last, 'resnet')]['peak_bytes'] / revs[-1]['peak_bytes']:.1f}x the RevNet's "
            f"(activations {by[(last, 'resnet')]['activation_bytes'] / revs[-1]['activation_bytes']:.1f}x).",
        ]
    for depth in depths:
        rev = by[(depth, "reversible")]
        if rev["ms"] is not None:
            lines.append(
                f"depth {depth}: RevNet step time {_ratio(rev['ms'], by[(depth, 'resnet')]['ms'])}x the "
                f"ResNet, {_ratio(rev['ms'], by[(depth, 'checkpoint')]['ms'])}x per-block checkpointing "
                f"(medians)"
            )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, speed) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=90)
    for mode in MODES:
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["depth"])
        depths = [r["depth"] for r in mine]
        if mine[0]["peak_bytes"] is not None:
            memory.plot(depths, [r["peak_bytes"] / 2**20 for r in mine], "o-", label=LABELS[mode])
        if mine[0]["ms"] is not None:
            speed.plot(depths, [r["ms"] for r in mine], "o-", label=LABELS[mode])
    memory.set(xlabel="depth (coupling blocks)", ylabel="peak memory of a step (MB)", title="memory")
    speed.set(xlabel="depth (coupling blocks)", ylabel="step time (ms, median)", title="time")
    for axis in (memory, speed):
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=0)
    memory.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m models study revnet-memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32, 64], help="coupling blocks in all")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=16, help="input images are size x size, one channel")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant and depth (0: memory only)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/revnet_memory"))
    args = parser.parse_args(argv)
    if any(d < args.stages or d % args.stages for d in args.depths):
        parser.error(f"--depths must be positive multiples of --stages = {args.stages}, got {args.depths}")
    if holds_run(args.out):
        parser.error(f"{args.out} already holds a study; choose another --out")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = measure(
        args.depths,
        width=args.width,
        stages=args.stages,
        batch=args.batch,
        size=args.size,
        repeats=args.repeats,
        device=device,
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    setting = (
        f"width {args.width}, {args.stages} stages, batch {args.batch}, {args.size}x{args.size} input, "
        f"float32, {name}, median of {args.repeats}"
    )
    text = f"{setting}\n\n{table(rows)}\n"
    print(text)
    (out / "table.md").write_text(text)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    write_json(out / "results.json", {"settings": settings, "device": name, "rows": rows})
    plot(rows, out / "revnet_memory.png", f"RevNet vs matched ResNet: {setting}")
    return rows
