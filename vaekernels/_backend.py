"""Which implementation runs an op: loading the native extension once, and choosing per call.

Backends:

- ``cpu``: the C++ kernels of ``csrc/cpu``, built once per CPU capability; the build matching
  ``torch.backends.cpu.get_cpu_capability()`` is loaded here, as ATen chooses its own kernels.
- ``cuda``: the CUDA C++ kernels of ``csrc/cuda`` (ops that have one), when built with CUDA.
- ``triton``: the Triton kernels of ``vaekernels/triton``; on CUDA tensors, or on CPU tensors
  through the Triton interpreter when ``TRITON_INTERPRET=1`` was set before triton was imported.
- ``reference``: the pure-PyTorch code of ``vaekernels/reference``, the fallback when nothing
  faster applies (with a one-time warning that says why).

``VAEKERNELS_BACKEND=auto|cuda|triton|cpu|reference`` (read at import) or the
:func:`use_backend` context manager forces one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
_CAPABILITY_ORDER = ("AVX512", "AVX2", "DEFAULT")


def _validated(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"vaekernels: {source} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


_forced = _validated(os.environ.get("VAEKERNELS_BACKEND", "auto") or "auto", "VAEKERNELS_BACKEND")


@functools.cache
def native() -> dict:
    """Loads ``vaekernels._C`` and the CPU-capability build of the kernels, once.

    Returns a dict with ``schemas`` (bool), ``cpu_capability`` (str or None), ``cuda`` (bool),
    ``cuda_ops`` (the ops with a CUDA C++ kernel) and ``error`` (why something could not be
    loaded, or None).
    """
    info = {"schemas": False, "cpu_capability": None, "cuda": False, "cuda_ops": set(), "error": None}
    try:
        schema_module = importlib.import_module("vaekernels._C")
    except ImportError as error:
        info["error"] = f"the C++ extension vaekernels._C is not built ({error})"
        return info
    info["schemas"] = True
    info["cuda"] = bool(schema_module.built_with_cuda())
    # Taken before Python registers the Triton launchers for the ops that lack one.
    info["cuda_ops"] = {
        name.split("::")[1]
        for name in torch._C._dispatch_get_registrations_for_dispatch_key("CUDA")
        if name.startswith("vaekernels::")
    }
    machine = torch.backends.cpu.get_cpu_capability()
    usable = _CAPABILITY_ORDER[_CAPABILITY_ORDER.index(machine) :] if machine in _CAPABILITY_ORDER else ("DEFAULT",)
    for capability in usable:
        try:
            importlib.import_module(f"vaekernels._cpu_{capability.lower()}")
        except ImportError as error:
            info["error"] = f"no CPU kernels built for capability {capability} ({error})"
            continue
        info["cpu_capability"], info["error"] = capability, None
        break
    return info


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available_backends() -> list[str]:
    """The backends that can run on this machine, fastest first (``reference`` always)."""
    found = []
    if native()["cuda"] and torch.cuda.is_available():
        found.append("cuda")
    if triton_available() and (torch.cuda.is_available() or triton_interpreted()):
        found.append("triton")
    if native()["cpu_capability"] is not None:
        found.append("cpu")
    return [*found, "reference"]


@contextlib.contextmanager
def use_backend(name: str):
    """Forces a backend inside a ``with`` block (``"auto"`` restores the per-call choice).

    Example:
        >>> import torch, vaekernels
        >>> with vaekernels.use_backend("reference"):
        ...     vaekernels.log_mean_exp(torch.zeros(2, 3)).tolist()
        [0.0, 0.0]
    """
    global _forced
    previous, _forced = _forced, _validated(name, "use_backend(name)")
    try:
        yield
    finally:
        _forced = previous


_warned: set[str] = set()


def _fallback(op: str, why: str) -> str:
    if why not in _warned:
        _warned.add(why)
        warnings.warn(f"vaekernels.{op}: running the PyTorch reference because {why}", RuntimeWarning, stacklevel=5)
    return "reference"


def choose(op: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend that runs ``op`` on tensors of ``device`` and ``dtype``: cuda, triton, cpu or reference."""
    # torch.compile traces this read of the forced backend and guards on its value, so a graph
    # traced under one use_backend() is not reused under another: the change recompiles.
    return _choose(op, device, dtype, _forced)


# A pure function of its arguments and of the environment (the extension's build, TRITON_INTERPRET),
# so torch.compile can call it once while tracing and keep the answer, instead of tracing the
# extension loading below it.
@torch.compiler.assume_constant_result
def _choose(op: str, device: torch.device, dtype: torch.dtype, forced: str) -> str:
    if forced == "reference":
        return "reference"
    if device.type == "cuda":
        if forced == "cpu":
            return _fallback(op, "VAEKERNELS_BACKEND=cpu was forced and these are CUDA tensors")
        if forced in ("auto", "cuda") and op in native()["cuda_ops"]:
            return "cuda"
        if triton_available():
            return "triton"
        return _fallback(op, "neither the CUDA kernels nor triton are available for CUDA tensors")
    if device.type != "cpu":
        return _fallback(op, f"no kernels exist for {device.type} tensors")
    if forced == "cuda":
        return _fallback(op, "VAEKERNELS_BACKEND=cuda was forced and these are CPU tensors")
    if forced == "triton":
        if triton_available() and triton_interpreted():
            return "triton"
        return _fallback(op, "the triton backend needs TRITON_INTERPRET=1 (and triton) to run on CPU tensors")
    if dtype not in (torch.float32, torch.float64):
        return _fallback(op, f"the CPU kernels take float32 and float64 tensors, not {dtype}")
    if native()["cpu_capability"] is not None:
        return "cpu"
    return _fallback(op, native()["error"] or "the CPU kernels are not available")


def ops(backend: str):
    """The op namespace of a native backend: ``torch.ops.vaekernels`` or ``torch.ops.vaekernels_triton``."""
    return torch.ops.vaekernels_triton if backend == "triton" else torch.ops.vaekernels
