"""Triton's real compiler on the launches our launchers make, without a GPU.

Inside :func:`recorded_launches`, a launch of any Triton kernel (``kernel[grid](...)``) is not
run: its specialisation for each target GPU is worked out by Triton's own binder, exactly as
``JITFunction.run`` would on that GPU (argument types, alignment and divisibility attributes,
constexprs, options such as ``num_warps``), and recorded. The launchers themselves run as usual,
so the record is what they really launch, not a copied signature that can drift. This works with
the Triton interpreter on (``TRITON_INTERPRET=1``, the test suite on CPU) and off.

:func:`compile_launches` then lowers each recorded specialisation with ``triton.compile`` to a
cubin and reads registers, spills and stack from ``ptxas -v`` and shared memory from the
metadata. It needs kernels built by the compiler, not the interpreter, so
:func:`compile_in_subprocess` runs it in a fresh interpreter without ``TRITON_INTERPRET``::

    with recorded_launches() as launches:
        vaekernels.triton.reversible.coupling_backward_step(*[torch.empty(4096) for _ in range(4)])
    print(resource_table(compile_in_subprocess(launches)))

``python -m vaekernels.triton.dry_run LAUNCHES.pkl RESULTS.json`` is that subprocess.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime import jit as _jit

ARCHS = (80, 90)
# Opt-in shared memory per block (CUDA programming guide, compute capabilities 8.0 and 9.0).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel specialisation for one GPU architecture, as ``JITFunction.run`` would compile it."""

    module: str
    kernel: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: object  # the backend's options dataclass (num_warps, num_stages, ...)

    def key(self) -> str:
        """Equal for launches that compile to the same binary."""
        return repr(
            (
                self.module,
                self.kernel,
                self.arch,
                sorted(self.signature.items()),
                sorted(self.constexprs.items()),
                sorted(self.attrs.items()),
                self.options,
            )
        )

    def describe(self) -> str:
        """The specialisation in a line: argument types and constexprs, pointers and ints by type."""
        names = list(self.signature)
        constexprs = {names[path[0]]: value for path, value in self.constexprs.items() if len(path) == 1}
        dtypes = sorted({t for t in self.signature.values() if t.startswith("*")})
        options = f"num_warps={self.options.num_warps}"
        shown = ", ".join(f"{k}={getattr(v, 'name', v)}" for k, v in constexprs.items())
        return f"{self.kernel} sm_{self.arch} [{' '.join(dtypes)}] {shown} {options}"


@dataclasses.dataclass
class Resources:
    """What ``ptxas -v`` and the metadata say of one compiled launch (or why it did not compile)."""

    launch: str  # Launch.describe()
    kernel: str
    arch: int
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    error: str | None = None

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def shared_over_limit(self) -> bool:
        return self.shared > SHARED_LIMIT[self.arch]


def _kernel_function(kernel) -> tuple[str, str, object]:
    """(module, name, a JITFunction) of a launched kernel, interpreted or compiled."""
    fn = kernel.fn
    if isinstance(kernel, _jit.JITFunction):
        return fn.__module__, fn.__name__, kernel
    return fn.__module__, fn.__name__, _binding_function(fn)


@functools.cache
def _binding_function(fn) -> _jit.JITFunction:
    # For an InterpretedFunction: a JITFunction of the same Python function binds arguments the
    # same way (binding reads only the signature; compiling it would need compiled helpers, see
    # the module doc).
    return _jit.JITFunction(fn)


def _specialisations(kernel, args: tuple, kwargs: dict, archs: Sequence[int]) -> list[Launch]:
    module, name, jit_function = _kernel_function(kernel)
    # The options JITFunction.run adds before binding, so that the records match its cache keys.
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", jit_function.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    launches = []
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        binder = _jit.create_function_from_signature(jit_function.signature, jit_function.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = jit_function._pack_args(backend, kwargs, bound, specialization, options)
        launches.append(Launch(module, name, arch, signature, constexprs, attrs, options))
    return launches


@contextlib.contextmanager
def recorded_launches(archs: Sequence[int] = ARCHS) -> Iterator[list[Launch]]:
    """Inside, Triton launches are recorded (one :class:`Launch` per architecture) instead of run.

    Kernels write nothing, so outputs hold whatever their allocation held: shapes, dtypes and
    strides flow on as in a real run, values do not.
    """
    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.extend(_specialisations(self, args, kwargs, archs))

    classes = [_jit.JITFunction]
    with contextlib.suppress(ImportError):
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    saved = [(cls, cls.run) for cls in classes]
    for cls in classes:
        cls.run = record
    try:
        yield launches
    finally:
        for cls, run in saved:
            cls.run = run


def unique(launches: Sequence[Launch]) -> list[Launch]:
    return list({launch.key(): launch for launch in launches}.values())


_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def _ptxas_log(launch: Launch, ptx: str) -> str:
    """ptxas -v of ``ptx``, through the backend's own ptxas call (same binary and flags)."""
    backend = make_backend(GPUTarget("cuda", launch.arch, 32))
    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        backend.make_cubin(ptx, {}, launch.options, launch.arch)
    return log.getvalue()


def _error_chain(error: BaseException) -> str:
    """The error and its causes: a CompilationError names the kernel's line, its cause the helper's."""
    parts = []
    while error is not None and len(parts) < 8:
        parts.append(f"{type(error).__name__}: {str(error)[:1500]}")
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


def compile_launch(launch: Launch) -> Resources:
    """Compiles one launch for its architecture; a compile error is returned, not raised."""
    resources = Resources(launch.describe(), launch.kernel, launch.arch)
    kernel = getattr(importlib.import_module(launch.module), launch.kernel)
    if not isinstance(kernel, _jit.JITFunction):
        raise TypeError(
            f"{launch.module}.{launch.kernel} is not compiled by Triton's compiler here "
            f"(TRITON_INTERPRET=1?): compile in a process without it (compile_in_subprocess)"
        )
    log = io.StringIO()
    try:
        # The compiler prints ptxas's log when it runs ptxas; from its cache it runs none, and
        # ptxas then runs once more on the cached PTX.
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(
                ASTSource(kernel, launch.signature, launch.constexprs, launch.attrs),
                target=GPUTarget("cuda", launch.arch, 32),
                options=launch.options.__dict__,
            )
        log = log.getvalue() if _PTXAS_FRAME.search(log.getvalue()) else _ptxas_log(launch, compiled.asm["ptx"])
    except Exception as error:  # noqa: BLE001 - every compiler failure is a finding to report
        resources.error = _error_chain(error)
        return resources
    frame, registers = _PTXAS_FRAME.search(log), _PTXAS_REGISTERS.search(log)
    if frame is None or registers is None:
        resources.error = f"no resource usage in the ptxas log: {log[-500:]!r}"
        return resources
    resources.stack, resources.spill_stores, resources.spill_loads = map(int, frame.groups())
    resources.registers = int(registers.group(1))
    resources.shared = int(compiled.metadata.shared)
    return resources


def compile_launches(launches: Sequence[Launch]) -> list[Resources]:
    return [compile_launch(launch) for launch in launches]


def compile_in_subprocess(launches: Sequence[Launch], timeout: float | None = None) -> list[Resources]:
    """:func:`compile_launches` in a fresh interpreter without ``TRITON_INTERPRET``, in order."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        launches_path, results_path = os.path.join(tmp, "launches.pkl"), os.path.join(tmp, "results.json")
        with open(launches_path, "wb") as f:
            pickle.dump(list(launches), f)
        subprocess.run(
            [sys.executable, "-m", __name__, launches_path, results_path], env=env, check=True, timeout=timeout
        )
        with open(results_path) as f:
            return [Resources(**r) for r in json.load(f)]


def resource_table(results: Sequence[Resources]) -> str:
    """Markdown: per kernel and architecture, the most registers, spilled bytes, stack and shared
    memory over its specialisations, and how many compiled."""
    rows: dict[tuple[str, int], list[Resources]] = {}
    for r in results:
        rows.setdefault((r.kernel, r.arch), []).append(r)
    header = (
        "| kernel | arch | specialisations | max registers | max spill bytes (st+ld) | max stack | "
        "max shared | errors |"
    )
    lines = [header, "|:---|:---|---:|---:|---:|---:|---:|---:|"]
    for (kernel, arch), rs in sorted(rows.items()):
        ok = [r for r in rs if r.error is None] or [Resources("", kernel, arch)]
        lines.append(
            f"| {kernel} | sm_{arch} | {len(rs)} | {max(r.registers for r in ok)} | "
            f"{max(r.spills for r in ok)} | {max(r.stack for r in ok)} | "
            f"{max(r.shared for r in ok)} | {sum(r.error is not None for r in rs)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        recorded = pickle.load(f)
    with open(sys.argv[2], "w") as f:
        json.dump([dataclasses.asdict(r) for r in compile_launches(recorded)], f)
