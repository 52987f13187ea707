"""Every Triton kernel through Triton's real compiler for sm_80 and sm_90, without a GPU.

The interpreter that runs the other Triton tests accepts code the compiler refuses and says nothing
of registers. Here the public functions run forward and backward on the Triton backend inside
:func:`vaekernels.triton.dry_run.recorded_launches`, which records each launch's specialisation
(what ``JITFunction.run`` would compile on that GPU) instead of running it. The bench cases, built
by bench/*.py's own input factories at their shapes, run in float32, float64, float16 and
bfloat16; each distinct launch is compiled to a cubin for sm_80 and sm_90 and may not spill. The
other cases (odd shapes, every activation, the models' DReG and total-correlation paths) check
that every code path compiles, in bfloat16 on sm_90 (ODD_SHAPES_DTYPES). Every compile must
succeed and fit the architecture's shared memory. The per-kernel resource table is printed (and
``python tests/test_triton_compile.py`` prints it alone, the table of bench/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

if __name__ == "__main__" and not torch.cuda.is_available():
    # As tests/conftest.py does: the Triton backend runs CPU tensors through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vaekernels
from vaekernels import _backend
from vaekernels.ops import jacobian as jacobian_ops

# One pytest-xdist worker runs this module: its module fixture compiles every launch (minutes).
pytestmark = pytest.mark.xdist_group("triton_compile")

BENCH = Path(__file__).resolve().parent.parent / "bench"
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
KERNEL_MODULES = ("causal_attention", "iwae", "jacobian", "logistic_mixture", "pixelcnn", "reversible")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def _bench(name: str):
    """bench/<name>.py as a module of its own name (tests/ has modules called test_<family> too)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    sys.path.insert(0, str(BENCH))  # for its `from _common import ...`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def _cast(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in tensors]


def _backward(out: torch.Tensor) -> None:
    out.sum().backward()


# ----------------------------------------------------------------------------- cases
# Each case takes (device, dtype) and calls public functions forward and backward.


def _iwae_bench_ops(device, dtype):
    for op, case in _bench("test_iwae").CASES.items():
        _backward(getattr(vaekernels, op)(*_cast(case.make_inputs(device), dtype)))


def _iwae_dreg_and_correlation(batch, samples, pixels, latent, pairs, pair_dim):
    """The README's DReG step (gaussian_log_prob, the bound with q's parameters) and the total
    correlation (the aggregate posterior with its marginal) at the given shapes."""

    def case(device, dtype):
        mean, log_var = (torch.zeros(batch, latent, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        z = mean.unsqueeze(1) + torch.exp(0.5 * log_var).unsqueeze(1) * torch.randn(
            batch, samples, latent, device=device, dtype=dtype
        )
        decoder = nn.Linear(latent, pixels).to(device, dtype)
        x = torch.rand(batch, pixels, device=device, dtype=dtype).bernoulli()
        log_pz = vaekernels.gaussian_log_prob(
            z, torch.zeros(latent, device=device, dtype=dtype), torch.zeros(latent, device=device, dtype=dtype)
        )
        _backward(vaekernels.iwae_bound(decoder(z), x, log_pz, None, estimator="dreg", z=z, q=(mean, log_var)))
        z, mean, log_var = (
            torch.randn(pairs, pair_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
        )
        _backward(vaekernels.total_correlation(z, mean, log_var))

    return case


def _iwae_prior(device, dtype):
    """log p(z) under N(0, I) of the IWAE model's samples, at the bench's B and K (d = 50)."""
    iwae = _bench("test_iwae")
    z = torch.randn(iwae.BATCH, iwae.SAMPLES, 50, device=device, dtype=dtype, requires_grad=True)
    zero = torch.zeros((), device=device, dtype=dtype)
    _backward(vaekernels.gaussian_log_prob(z, zero, zero))


def _iwae_odd(device, dtype):
    for batch, samples, pixels in ((3, 7, 33), (2, 1, 1)):
        logits = torch.randn(batch, samples, pixels, device=device, dtype=dtype, requires_grad=True)
        x = torch.rand(batch, pixels, device=device, dtype=dtype).bernoulli()
        log_pz, log_qz = (torch.randn(batch, samples, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        _backward(vaekernels.iwae_bound(logits, x, log_pz, log_qz))
        _backward(vaekernels.gaussian_kl(logits, logits.detach()))
    for shape in ((5, 1), (2, 3001)):
        _backward(vaekernels.log_mean_exp(torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)))
    z, mean, log_var = (torch.randn(5, 3, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    _backward(vaekernels.aggregate_posterior_log_density(z, mean, log_var))


def _gated_bench(device, dtype):
    pixelcnn = _bench("test_pixelcnn")
    x = torch.randn(
        pixelcnn.BATCH,
        2 * pixelcnn.CHANNELS,
        pixelcnn.SIZE,
        pixelcnn.SIZE,
        device=device,
        dtype=dtype,
        requires_grad=True,
    )
    _backward(vaekernels.gated_activation(x, torch.randn(x.shape[:2], device=device, dtype=dtype, requires_grad=True)))
    _backward(vaekernels.concat_elu(x[:, : pixelcnn.CHANNELS]))
    _backward(vaekernels.concat_elu(x[:, : pixelcnn.CHANNELS], padding=(1, 1, 1, 0)))
    # The layer in float32 and float64 only: its half-precision launches are the gated activation's above.
    if dtype in (torch.float32, torch.float64):
        layer = vaekernels.nn.GatedPixelCNNLayer(
            pixelcnn.CHANNELS,
            pixelcnn.CHANNELS,
            pixelcnn.LAYER_KERNEL,
            "B",
            skip_channels=pixelcnn.CHANNELS,
            cond_features=10,
        ).to(device, dtype)
        v, h, cond = _cast(pixelcnn._layer_inputs(device), dtype)
        _backward(torch.cat([t.flatten() for t in layer(v, h, cond)]))


def _gated_odd(device, dtype):
    x = torch.randn(2, 6, 3, 5, device=device, dtype=dtype, requires_grad=True)
    _backward(vaekernels.gated_activation(x, None, gate="linear"))
    _backward(vaekernels.concat_elu(x[:, :5]))
    _backward(vaekernels.gated_activation(x[:, :, :1, :1], torch.randn(2, 6, device=device, dtype=dtype)))


def _mixture(params_and_x: Callable, mixtures: int):
    def case(device, dtype):
        params, x = _cast(params_and_x(device), dtype)
        _backward(vaekernels.discretized_logistic_mixture_nll(params, x, mixtures, "sum"))

    return case


def _odd_mixture_inputs(device):
    from vaekernels.reference import logistic_mixture

    return (
        torch.randn(2, logistic_mixture.num_params(1, 3), 5, 7, device=device, requires_grad=True),
        torch.rand(2, 1, 5, 7, device=device) * 2 - 1,
    )


def _attention(make_inputs: Callable):
    def case(device, dtype):
        _backward(vaekernels.causal_attention(*_cast(make_inputs(device), dtype)))

    return case


def _odd_attention_inputs(device):
    return tuple(torch.randn(2, 37, d, device=device, requires_grad=True) for d in (5, 5, 3))


def _jacobian(decoder_and_z: Callable, gram: bool):
    def case(device, dtype):
        decoder, z = decoder_and_z(device)
        decoder = decoder.to(dtype)
        z = z.detach().to(dtype).requires_grad_()
        # The metric order (WᵀW), which launches the gram-reduce kernel: the bench's batches take it,
        # but the reduced stand-ins and the odd shapes would form J = T Wᵀ directly instead.
        with mock.patch.object(jacobian_ops, "_direct_is_cheaper", lambda *shape: False):
            _backward(vaekernels.jacobian_column_sq_norms(decoder, z))
            if gram:
                _backward(vaekernels.jacobian_gram(decoder, z))

    return case


def _bench_decoder(shape_name: str, batch: int | None = None, outputs: int | None = None):
    """The bench's decoder and z; ``batch`` and ``outputs`` replace the bench's B and D."""

    def make(device):
        shape = list(_bench("test_jacobian").SHAPES[shape_name])
        shape[0], shape[4] = batch or shape[0], outputs or shape[4]
        return _bench("test_jacobian").decoder_of(tuple(shape), device)

    return make


def _odd_decoder(device):
    """Every activation the tangent step takes, at widths that fill no block."""
    activations = [
        nn.Sigmoid(),
        nn.ReLU(),
        nn.LeakyReLU(0.1),
        nn.Softplus(2.0, 10.0),
        nn.ELU(0.5),
        nn.GELU(),
        nn.Tanh(),
    ]
    layers, width = [], 3
    for activation in activations:
        layers += [nn.Linear(width, 37), activation]
        width = 37
    return nn.Sequential(*layers, nn.Linear(width, 11)).to(device), torch.randn(5, 3, device=device)


def _coupling(shape: tuple, branch_dtype: torch.dtype | None = None):
    def case(device, dtype):
        stream, grad = (torch.randn(shape, device=device, dtype=dtype) for _ in range(2))
        narrow = branch_dtype or dtype
        update, grad_update = (torch.randn(shape, device=device, dtype=narrow) for _ in range(2))
        vaekernels.coupling_backward_step(stream, update, grad, grad_update)

    return case


# The Jacobian kernels see the latent size d, the widths h and the [h, h] metric; the batch B sets
# their grids, and the output size D reaches them only through the metric's values. So B = 2 and
# D = 16 launch what the bench's B and D do (test_reduced_jacobian_shapes_launch_what_the_bench_
# shapes_launch checks it in float32), without the CPU's minute of half-precision matrix products
# at B64 D3072 that the kernels never see.
JACOBIAN_REDUCED = (2, 16)
# The other cases check that every code path compiles (their spills are not checked): in bfloat16,
# 16-bit loads and stores around the float32 compute that float32 and float16 share, on one
# architecture, where Triton's front end that rejects bad code is the same for both. A compile
# takes about half a second of one CI core: these cases in every dtype on both architectures would
# add some 400 compiles to the bench's 230.
ODD_SHAPES_DTYPES = (torch.bfloat16,)
ODD_SHAPES_ARCH = 90

# (name, case, bench): spills fail a bench case; every case must compile within the limits.
CASES = [
    ("iwae bench ops", _iwae_bench_ops, True),
    ("iwae prior log-density B128 K50 d50", _iwae_prior, True),
    # The IWAE model's DReG step and the disentangling models' total correlation, at the bench's sizes.
    (
        "iwae DReG B128 K50 D784 d50, total correlation B256 d10",
        _iwae_dreg_and_correlation(128, 50, 784, 50, 256, 10),
        False,
    ),
    ("iwae odd shapes", _iwae_odd, False),
    ("iwae DReG and total correlation, odd shapes", _iwae_dreg_and_correlation(3, 2, 5, 3, 7, 1), False),
    ("gated activation, concat-ELU and layer, bench", _gated_bench, True),
    ("gated activation and concat-ELU, odd shapes", _gated_odd, False),
    (
        "logistic mixture, bench",
        _mixture(
            lambda device: _bench("test_logistic_mixture").mixture_inputs(device), _bench("test_logistic_mixture").M
        ),
        True,
    ),
    ("logistic mixture, odd shapes", _mixture(_odd_mixture_inputs, 3), False),
    (
        "causal attention, bench",
        _attention(lambda device: _bench("test_logistic_mixture").attention_inputs(device)),
        True,
    ),
    ("causal attention, odd shapes", _attention(_odd_attention_inputs), False),
    *[
        (f"jacobian {name}, bench", _jacobian(_bench_decoder(name, *JACOBIAN_REDUCED), gram=True), True)
        for name in _bench("test_jacobian").SHAPES
    ],
    ("jacobian, every activation, odd shapes", _jacobian(_odd_decoder, gram=True), False),
    ("coupling step, bench", _coupling(_bench("test_reversible").STEP_SHAPE), True),
    ("coupling step, bfloat16 branches", _coupling(_bench("test_reversible").STEP_SHAPE, torch.bfloat16), True),
    ("coupling step, odd shapes", _coupling((3, 1, 7, 5)), False),
]


def record(cases=CASES, dtypes=None) -> tuple[list, set[str]]:
    """(every distinct launch of the cases, the keys of those the bench cases made); the cases run
    in ``dtypes``, by default every dtype for the bench cases and ODD_SHAPES_DTYPES for the others."""
    from vaekernels.triton import dry_run

    launches, bench_keys = [], set()
    device = _device()
    with vaekernels.use_backend("triton"), contextlib.ExitStack() as stack:
        # Inputs are random but kernels run on none of them: the values never matter.
        stack.enter_context(torch.random.fork_rng(devices=[]))
        torch.manual_seed(0)
        for _, case, bench in cases:
            for dtype in dtypes or (DTYPES if bench else ODD_SHAPES_DTYPES):
                with dry_run.recorded_launches() as recorded:
                    case(device, dtype)
                launches += recorded
                if bench:
                    bench_keys |= {launch.key() for launch in recorded}
    return dry_run.unique(launches), bench_keys


def _code(launch) -> str:
    """The specialisation but for the alignment attributes, which change vector widths, not code paths."""
    return repr(
        (
            launch.kernel,
            launch.arch,
            sorted(launch.signature.items()),
            sorted(launch.constexprs.items()),
            launch.options,
        )
    )


def to_compile(launches, bench_keys) -> list:
    """Every bench launch (their spills are checked); of the odd shapes' launches, one per code path
    that no bench launch takes, on ODD_SHAPES_ARCH."""
    bench = [launch for launch in launches if launch.key() in bench_keys]
    seen = {_code(launch) for launch in bench}
    odd = {}
    for launch in launches:
        if launch.arch == ODD_SHAPES_ARCH and _code(launch) not in seen:
            odd.setdefault(_code(launch), launch)
    return bench + list(odd.values())


def _kernels_defined() -> set[str]:
    import triton

    found = set()
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"vaekernels.triton.{name}")
        found |= {
            attr
            for attr, value in vars(module).items()
            if attr.endswith("_kernel") and hasattr(value, "fn") and isinstance(value, triton.runtime.KernelInterface)
        }
    return found


@pytest.fixture(scope="module")
def compiled():
    from vaekernels.triton import dry_run

    launches, bench_keys = record()
    launches = to_compile(launches, bench_keys)
    return launches, bench_keys, dry_run.compile_in_subprocess(launches)


needs_triton = pytest.mark.skipif(
    not _backend.triton_available() or not (torch.cuda.is_available() or _backend.triton_interpreted()),
    reason="needs triton (CI installs it: test_triton_of_the_test_extra_is_importable)",
)


@needs_triton
def test_reduced_jacobian_shapes_launch_what_the_bench_shapes_launch():
    for name in _bench("test_jacobian").SHAPES:
        full, _ = record([("", _jacobian(_bench_decoder(name), gram=True), False)], dtypes=(torch.float32,))
        reduced, _ = record(
            [("", _jacobian(_bench_decoder(name, *JACOBIAN_REDUCED), gram=True), False)], dtypes=(torch.float32,)
        )
        assert sorted(launch.key() for launch in reduced) == sorted(launch.key() for launch in full)


@needs_triton
def test_every_kernel_is_launched_by_some_case(compiled):
    launches, _, _ = compiled
    assert _kernels_defined() - {launch.kernel for launch in launches} == set()


@needs_triton
def test_every_specialisation_compiles_for_sm80_and_sm90(compiled, capsys):
    from vaekernels.triton import dry_run

    launches, _, results = compiled
    with capsys.disabled():
        print(f"\n{len(launches)} specialisations compiled (sm_80 and sm_90)\n" + dry_run.resource_table(results))
    assert {r.arch for r in results} == set(dry_run.ARCHS)
    assert [r.launch + ": " + r.error for r in results if r.error] == []


@needs_triton
def test_shared_memory_fits_every_architecture(compiled):
    _, _, results = compiled
    assert [(r.launch, r.shared) for r in results if r.shared_over_limit] == []


@needs_triton
def test_no_register_spills_at_the_bench_shapes(compiled):
    launches, bench_keys, results = compiled
    spilled = [
        (r.launch, r.registers, r.spill_stores, r.spill_loads)
        for launch, r in zip(launches, results)
        if launch.key() in bench_keys and r.spills
    ]
    assert spilled == []
    assert any(launch.key() in bench_keys for launch in launches)


if __name__ == "__main__":
    from vaekernels.triton import dry_run

    found, bench = record()
    print(dry_run.resource_table(dry_run.compile_in_subprocess(to_compile(found, bench))))
