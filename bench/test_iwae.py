"""Importance-weighted bounds: fused ops against the PyTorch reference and torch.compile of it.

Shapes are those of IWAE on binarised MNIST (Burda et al. 2016): a batch of 128, K = 50
samples, 784 pixels; NLL evaluation with K = 5000 samples, whose peak memory is read for
K = 500 and K = 5000 in a fresh interpreter each, to show it does not grow with K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from _common import (
    CONTENDERS,
    MODES,
    available_bytes,
    contender_fn,
    devices,
    format_bytes,
    interleaved_medians,
    peak_bytes_in_subprocess,
    report_interleaved,
    run_contenders,
    streamed_bytes,
)

import vaekernels
from vaekernels import _backend
from vaekernels.reference import iwae as reference

BATCH, SAMPLES, PIXELS = 128, 50, 784
LME_COLUMNS = 5000
# Bytes of the float32 tensors of the cases.
F32 = 4
LOGITS_BYTES = F32 * BATCH * SAMPLES * PIXELS  # logits [B, K, D]
DATA_BYTES = F32 * BATCH * PIXELS  # x [B, D]
PER_SAMPLE_BYTES = F32 * BATCH * SAMPLES  # [B, K]
PER_EXAMPLE_BYTES = F32 * BATCH  # [B]
LME_BYTES = F32 * BATCH * LME_COLUMNS  # log_mean_exp's x


@dataclass(frozen=True)
class Case:
    shape: str
    kernel: str  # the op in csrc/ whose backend runs the fused function
    make_inputs: Callable[[str], tuple]
    # Per mode, the bytes a fused implementation must move at least (_common.streamed_bytes);
    # None where the op is bound by compute (aggregate posterior: B² pairs) or by latency
    # (gaussian_kl at d = 50: 50 kB).
    bytes_moved: dict[str, int] | None = None


def _leaf(*shape, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).requires_grad_()


def _binary(*shape, device):
    return torch.bernoulli(torch.full(shape, 0.5, device=device))


CASES = {
    "iwae_bound": Case(
        f"B{BATCH} K{SAMPLES} D{PIXELS}",
        "bernoulli_log_prob",
        lambda device: (
            _leaf(BATCH, SAMPLES, PIXELS, device=device),
            _binary(BATCH, PIXELS, device=device),
            _leaf(BATCH, SAMPLES, device=device),
            _leaf(BATCH, SAMPLES, device=device),
        ),
        # logits, x, log p(z), log q(z) in; the bound per example out; gradients of all but x.
        streamed_bytes(
            read=LOGITS_BYTES + DATA_BYTES + 2 * PER_SAMPLE_BYTES,
            written=PER_EXAMPLE_BYTES,
            grads=LOGITS_BYTES + 2 * PER_SAMPLE_BYTES,
        ),
    ),
    "bernoulli_log_prob": Case(
        f"B{BATCH} K{SAMPLES} D{PIXELS}",
        "bernoulli_log_prob",
        lambda device: (_leaf(BATCH, SAMPLES, PIXELS, device=device), _binary(BATCH, PIXELS, device=device)),
        streamed_bytes(read=LOGITS_BYTES + DATA_BYTES, written=PER_SAMPLE_BYTES, grads=LOGITS_BYTES),
    ),
    "log_mean_exp": Case(
        f"{BATCH}x{LME_COLUMNS}",
        "log_mean_exp",
        lambda device: (_leaf(BATCH, LME_COLUMNS, device=device),),
        streamed_bytes(read=LME_BYTES, written=PER_EXAMPLE_BYTES, grads=LME_BYTES),
    ),
    "gaussian_kl": Case(
        f"B{BATCH} d50",
        "gaussian_kl",
        lambda device: (_leaf(BATCH, 50, device=device), _leaf(BATCH, 50, device=device, scale=0.5)),
    ),
    "aggregate_posterior_log_density": Case(
        "B256 d10",
        "aggregate_posterior",
        lambda device: (
            _leaf(256, 10, device=device),
            _leaf(256, 10, device=device),
            _leaf(256, 10, device=device, scale=0.5),
        ),
    ),
}


def _fused_backend(contender: str, kernel: str, device: str) -> dict:
    return {"backend": _backend.choose(kernel, torch.device(device))} if contender == "fused" else {}


# The lowest decorator is the outer loop: each group's contenders run one after another.
@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", list(CASES))
@pytest.mark.parametrize("device", devices())
def test_iwae_op(benchmark, op, mode, contender, device):
    case = CASES[op]
    torch.manual_seed(0)
    fn = contender_fn(contender, getattr(reference, op), getattr(vaekernels, op))
    run_contenders(
        benchmark,
        fn,
        case.make_inputs(device),
        op=op,
        shape=case.shape,
        mode=mode,
        contender=contender,
        bytes_moved=None if case.bytes_moved is None else case.bytes_moved[mode],
        **_fused_backend(contender, case.kernel, device),
    )


# ----------------------------------------------------------------------------- NLL, K = 5000

NLL_BATCH, NLL_LATENT, NLL_HIDDEN, NLL_CHUNK = 100, 50, 200, 500
NLL_SAMPLES = 5000
NLL_MEMORY_SAMPLES = (500, 5000)
NLL_FUNCTIONS = {"reference": reference.importance_sampled_nll, "fused": vaekernels.importance_sampled_nll}


def nll_model(device: str):
    """Binarised data and a small MLP VAE (d = 50, one hidden layer of 200) with fixed weights."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(
        torch.nn.Linear(PIXELS, NLL_HIDDEN), torch.nn.Tanh(), torch.nn.Linear(NLL_HIDDEN, 2 * NLL_LATENT)
    ).to(device)
    decoder = torch.nn.Sequential(
        torch.nn.Linear(NLL_LATENT, NLL_HIDDEN), torch.nn.Tanh(), torch.nn.Linear(NLL_HIDDEN, PIXELS)
    ).to(device)

    def encode(x):
        mean, log_var = encoder(x).chunk(2, dim=-1)
        return mean, log_var

    return _binary(NLL_BATCH, PIXELS, device=device), encode, decoder


# The fused NLL once more with the decoder's output layer fused into the bound: decode stops at the
# last hidden layer and the logits of a chunk are never made whole.
OUTPUT_LAYER = "fused-output-layer"


def _nll_arguments(contender: str, decoder: torch.nn.Sequential):
    """(the function, decode, its extra keywords) of a contender."""
    if contender == OUTPUT_LAYER:
        return vaekernels.importance_sampled_nll, decoder[:-1], {"output_layer": decoder[-1]}
    return NLL_FUNCTIONS[contender], decoder, {}


def nll_call(contender: str, num_samples: int, device: str) -> Callable[[], None]:
    """The NLL estimate with ``num_samples`` samples as a zero-argument call, warmed up on one
    chunk; what ``peak_bytes_in_subprocess`` reads in a fresh interpreter."""
    x, encode, decoder = nll_model(device)
    nll, decode, extra = _nll_arguments(contender, decoder)
    generator = torch.Generator(device).manual_seed(0)

    def run(samples):
        nll(x, encode, decode, num_samples=samples, chunk_size=NLL_CHUNK, generator=generator, **extra)
        if device == "cuda":
            torch.cuda.synchronize()

    run(NLL_CHUNK)
    return lambda: run(num_samples)


def _reference_fits(device: str) -> bool:
    # The reference holds the decoder output and three more [B, K, D] tensors at once.
    needed = 4 * NLL_BATCH * NLL_SAMPLES * PIXELS * 4
    available = available_bytes(device)
    return available is None or available > 1.25 * needed


@pytest.mark.parametrize("contender", ("reference", "fused"))
@pytest.mark.parametrize("device", devices())
def test_importance_sampled_nll(benchmark, contender, device):
    if contender == "reference" and not _reference_fits(device):
        pytest.skip(f"the reference NLL at K={NLL_SAMPLES} needs more {device} memory than is free")
    peaks = {
        k: peak_bytes_in_subprocess("test_iwae", "nll_call", contender, k, device, device=device)
        for k in NLL_MEMORY_SAMPLES
    }
    how = f"in chunks of {NLL_CHUNK}" if contender == "fused" else "all samples at once"
    what = "peak resident memory" if device == "cpu" else "peak allocated memory"
    note = f"importance_sampled_nll {contender} ({device}, {how}), {what} of one call in a fresh process: " + ", ".join(
        f"{format_bytes(peak)} at K={k}" for k, peak in peaks.items()
    )

    x, encode, decode = nll_model(device)
    nll, generator = NLL_FUNCTIONS[contender], torch.Generator(device).manual_seed(0)
    run_contenders(
        benchmark,
        lambda x: nll(x, encode, decode, num_samples=NLL_SAMPLES, chunk_size=NLL_CHUNK, generator=generator),
        (x,),
        op="importance_sampled_nll",
        shape=f"B{NLL_BATCH} D{PIXELS} K{NLL_SAMPLES}",
        mode="forward",
        contender=contender,
        warmup_calls=0,
        min_rounds=1,
        measure_memory=False,
        peak_bytes=peaks[NLL_SAMPLES],
        peak_bytes_by_samples={str(k): p for k, p in peaks.items()},
        note=note,
        **_fused_backend(contender, "bernoulli_log_prob", device),
    )


@pytest.mark.parametrize("device", devices())
def test_importance_sampled_nll_output_layer_interleaved(device):
    """K = 5000 through the fused output layer against the fused NLL of the whole decoder, timed
    round-robin (``-s`` shows the medians); the peak resident memory of each in a fresh process."""
    calls = {contender: nll_call(contender, NLL_SAMPLES, device) for contender in ("fused", OUTPUT_LAYER)}
    medians = interleaved_medians(calls, device, rounds=3, warmup=0)
    peaks = {
        contender: peak_bytes_in_subprocess("test_iwae", "nll_call", contender, NLL_SAMPLES, device, device=device)
        for contender in calls
    }
    print(
        f"\nimportance_sampled_nll B{NLL_BATCH} K{NLL_SAMPLES} peak memory: "
        + ", ".join(f"{contender} {format_bytes(peak)}" for contender, peak in peaks.items())
    )
    # report_interleaved's speed-ups are over its "fused" entry: here the output layer fused in.
    report_interleaved(
        f"importance_sampled_nll B{NLL_BATCH} D{PIXELS} K{NLL_SAMPLES}, fused NLL of the whole "
        "decoder against the output layer fused in",
        "nll",
        device,
        {"whole decoder": medians["fused"], "fused": medians[OUTPUT_LAYER]},
    )
