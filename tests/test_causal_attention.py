"""Strictly causal attention: parity with the reference, exact causality, linear memory,
registration (opcheck, gradcheck, compile), bad inputs."""

import math

import pytest
import torch
from conftest import device_backends, namespace, needs_cpp, rel_err

import vaekernels
from vaekernels import _backend
from vaekernels.reference import causal_attention as ref

RTOL = {torch.float32: 2e-6, torch.float64: 1e-12}
NATIVE = [pair for pair in device_backends() if pair[1] != "reference"]


def qkv(*lead, L, D, Dv=None, dtype=torch.float64, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(*lead, L, D), (*lead, L, D), (*lead, L, Dv or D)]
    return [(torch.randn(s, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype) for s in shapes]


def run(fn, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (out * cotangent.to(out)).sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "lead,L,D,Dv", [((1,), 1, 4, 4), ((2,), 37, 5, 3), ((2, 3), 50, 8, 16), ((1,), 70, 16, 7), ((2,), 90, 20, 24)]
)
def test_matches_reference(device_backend, dtype, lead, L, D, Dv):
    device, _ = device_backend
    inputs = qkv(*lead, L=L, D=D, Dv=Dv, dtype=dtype, device=device)
    out, grads = run(vaekernels.causal_attention, inputs)
    expected, expected_grads = run(ref.causal_attention, [t.double() for t in inputs])
    assert out.dtype == dtype
    assert rel_err(out, expected) <= RTOL[dtype]
    for got, want in zip(grads, expected_grads):
        if want.norm() > 0:
            assert rel_err(got, want) <= RTOL[dtype] * 10
        else:
            assert torch.equal(got, torch.zeros_like(got))


def test_first_position_outputs_exact_zero_and_second_copies_the_first_value(device_backend):
    device, _ = device_backend
    q, k, v = qkv(2, L=6, D=4, device=device)
    out = vaekernels.causal_attention(q, k, v)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    torch.testing.assert_close(out[:, 1], v[:, 0], rtol=1e-14, atol=0)  # one key: weight exactly 1


def test_causality_with_zero_tolerance(device_backend):
    """Changing position t (its query, key and value) leaves every output before and at t bitwise
    unchanged; the input gradient of output i is exactly zero at positions >= i (and on q beyond i)."""
    device, _ = device_backend
    L = 40
    q, k, v = qkv(2, L=L, D=8, Dv=6, device=device, seed=1)
    base = vaekernels.causal_attention(q, k, v)
    for t in (0, 17, L - 1):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, t] += 5.0
        moved = vaekernels.causal_attention(q2, k2, v2)
        assert torch.equal(moved[:, :t], base[:, :t])
        k3, v3 = k.clone(), v.clone()
        k3[:, t] += 5.0
        v3[:, t] += 5.0
        assert torch.equal(vaekernels.causal_attention(q, k3, v3)[:, : t + 1], base[:, : t + 1])
    i = 23
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    vaekernels.causal_attention(*leaves)[:, i].sum().backward()
    gq, gk, gv = (x.grad for x in leaves)
    assert torch.equal(gk[:, i:], torch.zeros_like(gk[:, i:])) and torch.equal(gv[:, i:], torch.zeros_like(gv[:, i:]))
    assert torch.equal(gq[:, torch.arange(L) != i], torch.zeros_like(gq[:, 1:]))
    assert (gv[:, :i].abs().sum(-1) > 0).all()


def test_saves_linear_memory(device_backend):
    """Besides the inputs: the output and an [N, L] log-sum-exp, never an [L, L] matrix."""
    device, _ = device_backend
    q, k, v = (t.requires_grad_() for t in qkv(3, L=64, D=8, device=device, dtype=torch.float32))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        vaekernels.causal_attention(q, k, v)
    if _backend.choose("causal_attention", q.device, q.dtype) != "reference":
        extra = [t for t in saved if t.data_ptr() not in (q.data_ptr(), k.data_ptr(), v.data_ptr())]
        assert sum(t.numel() for t in extra) <= 3 * 64 * 8 + 3 * 64


def test_extreme_scores_give_no_nan(device_backend):
    device, _ = device_backend
    q, k, v = qkv(2, L=33, D=4, device=device, dtype=torch.float32, scale=30.0)
    out, grads = run(vaekernels.causal_attention, (q, k, v))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    expected = ref.causal_attention(q.double(), k.double(), v.double())
    assert rel_err(out, expected) <= 1e-5


def test_module_is_causal_over_raster_order():
    """CausalAttention2d on [B, C, H, W] maps: a pixel's output reads the context only at earlier
    pixels, and the query only at itself."""
    torch.manual_seed(0)
    attend = vaekernels.nn.CausalAttention2d(3, 2, key_channels=4, value_channels=4, heads=2).double()
    query = torch.randn(1, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    context = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    i, j = 2, 3
    attend(query, context)[0, :, i, j].sum().backward()
    position = i * 6 + j
    reach = context.grad.abs().sum(1)[0].flatten()
    assert torch.equal(reach[position:], torch.zeros_like(reach[position:]))
    assert (reach[:position] > 0).all()
    asked = query.grad.abs().sum(1)[0].flatten()
    assert asked[position] > 0 and torch.count_nonzero(asked) == 1


@needs_cpp
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("N,L,scale", [(1, 150, None), (3, 65, -0.7), (4, 64, 2.0)])
def test_cpu_tiles_and_thread_splits_match_reference(threads, N, L, scale):
    """The CPU kernel over several tiles, a partial last one, and both ways of splitting the
    backward: a whole sequence per task (N >= threads) and a key tile per task with a copy of
    d(q) per thread (N < threads)."""
    inputs = qkv(N, L=L, D=16, Dv=32, seed=3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with vaekernels.use_backend("cpu"):
            out, grads = run(lambda q, k, v: vaekernels.causal_attention(q, k, v, scale), inputs)
    finally:
        torch.set_num_threads(before)
    reference_scale = 1 / math.sqrt(16) if scale is None else scale
    expected, expected_grads = run(lambda q, k, v: ref.causal_attention(q, k, v, reference_scale), inputs)
    assert rel_err(out, expected) <= 1e-13
    for got, want in zip(grads, expected_grads):
        assert rel_err(got, want) <= 1e-12


@pytest.mark.parametrize("device_backend", NATIVE, ids=lambda p: f"{p[0]}-{p[1]}")
def test_opcheck(device_backend):
    device, backend = device_backend
    q, k, v = qkv(2, L=19, D=4, Dv=3, device=device)
    ops = namespace(backend)
    scale = 1 / math.sqrt(4)
    torch.library.opcheck(ops.causal_attention.default, (q.requires_grad_(), k.requires_grad_(), v, scale))
    out, lse = ops.causal_attention(q.detach(), k.detach(), v, scale)
    torch.library.opcheck(
        ops.causal_attention_backward.default, (torch.randn_like(out), q.detach(), k.detach(), v, out, lse, scale)
    )


@pytest.mark.parametrize("device_backend", NATIVE, ids=lambda p: f"{p[0]}-{p[1]}")
def test_gradcheck_float64(device_backend):
    device, backend = device_backend
    inputs = [t.requires_grad_() for t in qkv(1, L=6, D=3, Dv=2, device=device, seed=2)]
    with vaekernels.use_backend(backend):
        assert torch.autograd.gradcheck(vaekernels.causal_attention, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device_backend", NATIVE, ids=lambda p: f"{p[0]}-{p[1]}")
def test_compile_fullgraph_matches_eager(device_backend):
    device, backend = device_backend
    inputs = [t.requires_grad_() for t in qkv(2, 2, L=12, D=4, device=device)]
    torch._dynamo.reset()
    with vaekernels.use_backend(backend):
        eager = vaekernels.causal_attention(*inputs)
        eager_grads = torch.autograd.grad(eager.sum(), inputs)
        out = torch.compile(vaekernels.causal_attention, fullgraph=True)(*inputs)
        out_grads = torch.autograd.grad(out.sum(), inputs)
    torch.testing.assert_close(out, eager)
    for got, want in zip(out_grads, eager_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda q, k, v: (q, k[:, :-1], v), ValueError, "k must have q's shape"),
        (lambda q, k, v: (q, k, v[:, :-1]), ValueError, r"v must have shape \[..., L, Dv\]"),
        (lambda q, k, v: (q[0, 0], k[0, 0], v[0, 0]), ValueError, r"q must have shape \[..., L, D\]"),
        (lambda q, k, v: (q.long(), k, v), TypeError, "q must be a floating-point tensor"),
        (lambda q, k, v: (q, k.float(), v), TypeError, "k must have the dtype of q"),
        (lambda q, k, v: (q[..., :0], k[..., :0], v), ValueError, "non-empty last dim"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, match):
    q, k, v = change(*qkv(2, L=5, D=4))
    with pytest.raises(error, match=match):
        vaekernels.causal_attention(q, k, v)
