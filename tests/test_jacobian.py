"""The decoder-Jacobian family against torch.func.jacfwd, exact facts, and its registration."""

import copy

import pytest
import torch
from conftest import assert_triton_schema_is_cpp, device_backends, namespace, needs_cpp, needs_cpp_and_triton, rel_err
from torch import nn

import vaekernels
from vaekernels import _backend
from vaekernels.ops import jacobian as ops_jacobian
from vaekernels.reference import jacobian as ref

ACTIVATIONS = {
    "tanh": nn.Tanh(),
    "sigmoid": nn.Sigmoid(),
    "relu": nn.ReLU(),
    "leaky_relu": nn.LeakyReLU(0.1),
    "softplus": nn.Softplus(beta=1.5, threshold=3.0),
    "elu": nn.ELU(alpha=0.7),
    "gelu": nn.GELU(),
}
PARAMS = {"leaky_relu": (0.1, 0.0), "softplus": (1.5, 3.0), "elu": (0.7, 0.0)}
# ||out - ref|| / ||ref|| bounds against the float64 reference.
RTOL = {torch.float32: 5e-6, torch.float64: 1e-11}
NATIVE = [pytest.param(pair, id=f"{pair[0]}-{pair[1]}") for pair in device_backends() if pair[1] != "reference"]
OP_NAMES = ["jacobian_tangent_step", "jacobian_tangent_step_backward", "jacobian_gram_reduce"]


def assert_rel(out, expected, dtype=torch.float64):
    assert out.shape == expected.shape
    assert rel_err(out, expected) <= RTOL[dtype], rel_err(out, expected)


def mlp(widths, activation, seed=0, dtype=torch.float64, device="cpu"):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation])
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def randn(*shape, device="cpu", dtype=torch.float64, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(
        device=device, dtype=dtype
    )


def param_grads(fn, decoder, z, seed=7):
    """fn's output and the gradients of a random projection of it into z and every parameter."""
    z = z.detach().clone().requires_grad_()
    out = fn(decoder, z)
    cotangent = randn(*out.shape, device=out.device, dtype=out.dtype, seed=seed)
    leaves = [z, *decoder.parameters()]
    # The last layer's bias does not move the Jacobian: its gradient is zero.
    grads = torch.autograd.grad((out * cotangent).sum(), leaves, allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def check_public(fused, oracle, decoder, z, dtype=torch.float64):
    out, grads = param_grads(fused, decoder, z)
    expected, expected_grads = param_grads(oracle, decoder, z)
    assert_rel(out, expected, dtype)
    for got, want in zip(grads, expected_grads):
        assert_rel(got, want, dtype)


# ----------------------------------------------------------------------------- kernel-level ops


def step_inputs(device, dtype, batch=3, k=5, h=37, shared=False, scale=2.0):
    pre = randn(batch, h, device=device, dtype=dtype, seed=1, scale=scale)
    tangent = randn(1 if shared else batch, k, h, device=device, dtype=dtype, seed=2)
    return pre, tangent


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("device_backend", NATIVE)
def test_tangent_step_matches_reference(device_backend, activation, shared, dtype):
    device, backend = device_backend
    step = _backend.ops(backend).jacobian_tangent_step
    p0, p1 = PARAMS.get(activation, (0.0, 0.0))
    pre, tangent = step_inputs(device, dtype, shared=shared)
    leaves = [pre.clone().requires_grad_(), tangent.clone().requires_grad_()]
    out, t_out = step(*leaves, activation, p0, p1)
    g_out, g_t = (
        randn(*out.shape, seed=3, device=device, dtype=dtype),
        randn(*t_out.shape, seed=4, device=device, dtype=dtype),
    )
    grads = torch.autograd.grad((out * g_out).sum() + (t_out * g_t).sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_out, ref_t = ref.jacobian_tangent_step(*ref_leaves, activation, p0, p1)
    ref_grads = torch.autograd.grad((ref_out * g_out.double()).sum() + (ref_t * g_t.double()).sum(), ref_leaves)
    for got, want in [(out, ref_out), (t_out, ref_t), *zip(grads, ref_grads)]:
        assert_rel(got, want, dtype)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("device_backend", NATIVE)
def test_shared_tangent_gets_the_batch_sum(device_backend, threads):
    # Large enough that the CPU kernel's rows are split between threads, each summing its own.
    device, backend = device_backend
    pre, tangent = step_inputs(device, torch.float64, batch=64, k=32, h=64, shared=True)
    grad_tangent = randn(64, 32, 64, device=device, dtype=torch.float64, seed=5)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        grad_pre, grad_shared = _backend.ops(backend).jacobian_tangent_step_backward(
            None, grad_tangent, pre, tangent, "tanh", 0.0, 0.0
        )
    finally:
        torch.set_num_threads(previous)
    expected_pre, expected_each = _backend.ops(backend).jacobian_tangent_step_backward(
        None, grad_tangent, pre, tangent.expand(64, -1, -1), "tanh", 0.0, 0.0
    )
    assert grad_shared.shape == (1, 32, 64)
    torch.testing.assert_close(grad_shared, expected_each.sum(0, keepdim=True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_pre, expected_pre, rtol=0, atol=0)


@pytest.mark.parametrize("block,chunk", [(256, 1024), (5, 4)])
@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 37), (2, 17, 70)])
@pytest.mark.parametrize("device_backend", NATIVE)
def test_gram_reduce_matches_reference(device_backend, shape, diagonal, block, chunk, monkeypatch):
    # Blocks of 5 and chunks of 4 split the metric's gradient into ragged bands and chunks.
    monkeypatch.setattr(ops_jacobian, "SYMMETRIC_BLOCK", block)
    monkeypatch.setattr(ops_jacobian, "SYMMETRIC_CHUNK_ROWS", chunk)
    device, backend = device_backend
    batch, k, h = shape
    for dtype in (torch.float32, torch.float64):
        tangent = randn(batch, k, h, device=device, dtype=dtype, seed=1).requires_grad_()
        factor = randn(h + 3, h, device=device, dtype=dtype, seed=2)
        # The metric itself a leaf: its gradient is compared whole, not only its symmetric part.
        metric = (factor.t() @ factor).requires_grad_()
        out, tm = _backend.ops(backend).jacobian_gram_reduce(tangent, metric, diagonal)
        cotangent = randn(*out.shape, device=device, dtype=dtype, seed=3)
        cotangent_tm = randn(*tm.shape, device=device, dtype=dtype, seed=4)
        grads = torch.autograd.grad((out * cotangent).sum() + (tm * cotangent_tm).sum(), [tangent, metric])
        leaves = [tangent.detach().double().requires_grad_(), metric.detach().double().requires_grad_()]
        expected, expected_tm = ref.jacobian_gram_reduce(*leaves, diagonal)
        expected_grads = torch.autograd.grad(
            (expected * cotangent.double()).sum() + (expected_tm * cotangent_tm.double()).sum(), leaves
        )
        assert_rel(out, expected, dtype)
        assert_rel(tm, expected_tm, dtype)
        for got, want in zip(grads, expected_grads):
            assert_rel(got, want, dtype)


def sample_args(name, device):
    pre, tangent = step_inputs(device, torch.float64, batch=2, k=3, h=5)
    if name == "jacobian_tangent_step":
        return pre.requires_grad_(), tangent.requires_grad_(), "gelu", 0.0, 0.0
    if name == "jacobian_tangent_step_backward":
        return randn(2, 5, device=device, seed=5), randn(2, 3, 5, device=device, seed=6), pre, tangent, "tanh", 0.0, 0.0
    if name == "jacobian_tangent_step_backward shared":
        return None, randn(2, 3, 5, device=device, seed=6), pre, tangent[:1], "tanh", 0.0, 0.0
    factor = randn(6, 5, device=device, seed=7)
    return tangent.requires_grad_(), (factor.t() @ factor).requires_grad_(), True


@pytest.mark.parametrize("device_backend", NATIVE)
@pytest.mark.parametrize("name", [*OP_NAMES, "jacobian_tangent_step_backward shared"])
def test_opcheck(device_backend, name):
    device, backend = device_backend
    op = getattr(namespace(backend), name.split()[0]).default
    torch.library.opcheck(op, sample_args(name, device))


@needs_cpp_and_triton
@pytest.mark.parametrize("name", OP_NAMES)
def test_triton_ops_have_the_cpp_schema(name):
    assert_triton_schema_is_cpp(name)


@pytest.mark.parametrize("device_backend", NATIVE)
def test_gradcheck_float64(device_backend):
    device, backend = device_backend
    ops = _backend.ops(backend)
    pre, tangent = step_inputs(device, torch.float64, batch=2, k=2, h=3)
    for activation in ("softplus", "elu", "gelu"):
        p0, p1 = PARAMS.get(activation, (0.0, 0.0))
        assert torch.autograd.gradcheck(
            lambda p, t, activation=activation, p0=p0, p1=p1: ops.jacobian_tangent_step(p, t, activation, p0, p1),
            (pre.requires_grad_(), tangent.requires_grad_()),
        )
    factor = randn(4, 3, device=device, seed=3).requires_grad_()
    for diagonal in (True, False):
        assert torch.autograd.gradcheck(
            lambda t, f, diagonal=diagonal: ops.jacobian_gram_reduce(t, f.t() @ f, diagonal), (tangent, factor)
        )
        assert torch.autograd.gradcheck(
            lambda t, f, diagonal=diagonal: ops.jacobian_gram_reduce(t, f.t() @ f, diagonal)[0], (tangent, factor)
        )


# ----------------------------------------------------------------------------- public functions


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_column_norms_and_gram_match_jacfwd(device_backend, activation):
    device, _ = device_backend
    decoder = mlp([3, 13, 7, 11], activation, device=device)
    z = randn(5, 3, device=device, seed=1, scale=1.5)
    check_public(vaekernels.jacobian_column_sq_norms, ref.jacobian_column_sq_norms, decoder, z)
    check_public(vaekernels.jacobian_gram, ref.jacobian_gram, decoder, z)
    columns = [2, 0, 2]
    check_public(
        lambda g, v: vaekernels.jacobian_column_sq_norms(g, v, columns),
        lambda g, v: ref.jacobian_column_sq_norms(g, v, columns),
        decoder,
        z,
    )


@pytest.mark.parametrize("widths", [[4, 9], [2, 6, 6, 3], [5, 17, 1]])
def test_unusual_depths_match_jacfwd(device_backend, widths):
    device, _ = device_backend
    decoder = mlp(widths, "tanh", device=device)
    z = randn(3, widths[0], device=device, seed=2)
    check_public(vaekernels.jacobian_gram, ref.jacobian_gram, decoder, z)
    # Two linear layers in a row, and an activation straight on z.
    for decoder in (nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 5)), nn.Sequential(nn.ELU(), nn.Linear(4, 7))):
        decoder = decoder.to(device=device, dtype=torch.float64)
        z = randn(3, 4, device=device, seed=3)
        check_public(vaekernels.jacobian_column_sq_norms, ref.jacobian_column_sq_norms, decoder, z)


@pytest.mark.parametrize("batch,direct", [(2, True), (40, False)])
def test_either_order_of_the_last_product_matches_jacfwd(device_backend, monkeypatch, batch, direct):
    # A small batch of tangents costs less as J = T Wᵀ, a large one as T (WᵀW) Tᵀ: each order must
    # give jacfwd's values and gradients, and the fused backends must take the cheaper one.
    device, backend = device_backend
    decoder = mlp([3, 16, 16, 30], "tanh", device=device)
    z = randn(batch, 3, device=device, seed=6)
    calls = []
    reduce_directly = ops_jacobian._reduce_directly
    monkeypatch.setattr(ops_jacobian, "_reduce_directly", lambda *args: calls.append(1) or reduce_directly(*args))
    check_public(vaekernels.jacobian_column_sq_norms, ref.jacobian_column_sq_norms, decoder, z)
    check_public(vaekernels.jacobian_gram, ref.jacobian_gram, decoder, z)
    assert len(calls) == (2 if direct and backend != "reference" else 0)


@pytest.mark.parametrize("block,chunk", [(5, 4), (256, 1024)])
def test_float32_matches_float64_jacfwd(device_backend, monkeypatch, block, chunk):
    # float32 products take oneDNN's matmul on CPU; blocks of 5 split the metric's symmetric
    # gradient [29, 29] into ragged bands, chunks of 4 its 42 weighted rows into a ragged last
    # chunk; 256 and 1024 leave one band and one chunk.
    monkeypatch.setattr(ops_jacobian, "SYMMETRIC_BLOCK", block)
    monkeypatch.setattr(ops_jacobian, "SYMMETRIC_CHUNK_ROWS", chunk)
    device, _ = device_backend
    decoder = mlp([6, 33, 29, 40], "softplus", dtype=torch.float32, device=device)
    z = randn(7, 6, device=device, dtype=torch.float32, seed=4)
    out, grads = param_grads(vaekernels.jacobian_column_sq_norms, decoder, z)
    assert out.dtype == torch.float32
    expected, expected_grads = param_grads(ref.jacobian_column_sq_norms, copy.deepcopy(decoder).double(), z.double())
    for got, want in zip([out, *grads], [expected, *expected_grads]):
        assert_rel(got, want, torch.float32)


def test_gradcheck_through_the_public_functions(device_backend):
    device, _ = device_backend
    decoder = mlp([2, 4, 3], "tanh", device=device)
    weight = decoder[0].weight.detach().clone().requires_grad_()
    z = randn(2, 2, device=device, seed=5).requires_grad_()

    def with_weight(fn):
        def call(z, w):
            return fn(nn.Sequential(_LinearWith(w, decoder[0].bias), nn.Tanh(), decoder[2]), z)

        return call

    for fn in (
        vaekernels.jacobian_column_sq_norms,
        vaekernels.jacobian_gram,
        lambda g, v: vaekernels.grae_regularizer(g, v, 0.3, exact=True),
    ):
        assert torch.autograd.gradcheck(with_weight(fn), (z, weight))


class _LinearWith(nn.Linear):
    """An nn.Linear whose weight is a given tensor (a gradcheck input), not a parameter."""

    def __init__(self, weight, bias):
        nn.Module.__init__(self)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight, self.bias = weight, bias


def test_exact_regulariser_is_the_logdet_and_below_the_bound(device_backend):
    device, _ = device_backend
    decoder = mlp([4, 10, 12], "gelu", device=device)
    z = randn(6, 4, device=device, seed=6)
    beta = 0.4
    jac = ref.jacobian(decoder, z)
    logdet = torch.logdet(torch.eye(4, dtype=torch.float64, device=device) + jac.transpose(1, 2) @ jac / beta)
    exact = vaekernels.grae_regularizer(decoder, z, beta, exact=True)
    assert_rel(exact, logdet)
    bound = vaekernels.grae_regularizer(decoder, z, beta)
    assert_rel(bound, ref.grae_regularizer(decoder, z, beta))
    # Hadamard's inequality: the determinant of a positive-definite matrix is at most the
    # product of its diagonal.
    assert (exact <= bound + 1e-12).all()


def test_sampled_columns_estimate_is_unbiased():
    decoder = mlp([5, 8, 6], "tanh")
    z = randn(4, 5, seed=7, scale=2.0)
    beta = 0.3
    bound = vaekernels.grae_regularizer(decoder, z, beta)
    # Exactly: averaging over every draw of one column of five is the bound.
    per_column = [
        vaekernels.grae_regularizer(decoder, z, beta, num_columns=1, generator=torch.Generator().manual_seed(s))
        for s in range(40)
    ]
    assert_rel(torch.stack(per_column).unique(dim=0).mean(0), bound)
    # Over many seeds, two columns a draw: the mean within 4 standard errors of the bound.
    draws = torch.stack(
        [
            vaekernels.grae_regularizer(decoder, z, beta, num_columns=2, generator=torch.Generator().manual_seed(s))
            for s in range(1000)
        ]
    )
    standard_error = draws.std(0) / 1000**0.5
    assert ((draws.mean(0) - bound).abs() <= 4 * standard_error).all()
    # And the reference draws the same columns.
    assert_rel(
        draws[3], ref.grae_regularizer(decoder, z, beta, num_columns=2, generator=torch.Generator().manual_seed(3))
    )


class ConvDecoder(nn.Module):
    def __init__(self, d=3):
        super().__init__()
        self.fc = nn.Linear(d, 2 * 4 * 4)
        self.deconv = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1)
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, z):
        x = torch.nn.functional.softplus(self.fc(z)).view(-1, 2, 4, 4)
        return self.conv(torch.tanh(self.deconv(x)))


def test_conv_decoders_take_the_general_path(monkeypatch):
    decoder = ConvDecoder().double()
    z = randn(5, 3, seed=8)
    # Small chunks, so several of them are merged.
    monkeypatch.setattr(ops_jacobian, "GENERAL_CHUNK_ELEMENTS", 5 * 64 * 2)
    check_public(vaekernels.jacobian_column_sq_norms, ref.jacobian_column_sq_norms, decoder, z)
    check_public(vaekernels.jacobian_gram, ref.jacobian_gram, decoder, z)
    assert_rel(vaekernels.jacobian_column_sq_norms(decoder, z, [1]), ref.jacobian_column_sq_norms(decoder, z, [1]))
    # A Sequential with a layer outside the fused set goes the general path too.
    sequential = nn.Sequential(nn.Linear(3, 8), nn.Hardtanh(), nn.Linear(8, 4), nn.Sigmoid()).double()
    check_public(vaekernels.jacobian_gram, ref.jacobian_gram, sequential, z)


def test_mlp_path_never_builds_the_jacobian():
    batch, d, outputs = 4, 3, 257
    decoder = mlp([d, 8, outputs], "tanh")
    z = randn(batch, d, seed=9).requires_grad_()
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        norms = vaekernels.jacobian_column_sq_norms(decoder, z)
    norms.sum().backward()
    assert sizes and max(sizes) < batch * d * outputs


def test_extreme_codes_give_no_nan(device_backend):
    device, _ = device_backend
    for activation in ACTIVATIONS:
        decoder = mlp([2, 6, 3], activation, dtype=torch.float32, device=device)
        z = torch.tensor([[1e4, -1e4], [-3e3, 0.0]], device=device, requires_grad=True)
        reg = vaekernels.grae_regularizer(decoder, z, 0.1, exact=True) + vaekernels.grae_regularizer(decoder, z, 0.1)
        reg.sum().backward()
        # (With relu the reference's tangents do not depend on z at all: no gradient reaches it.)
        assert torch.isfinite(reg).all() and (z.grad is None or torch.isfinite(z.grad).all()), activation


@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_compile_fullgraph(device_backend, compiler):
    device, _ = device_backend
    decoder = mlp([3, 8, 5], "softplus", dtype=torch.float32, device=device)
    z = randn(4, 3, device=device, dtype=torch.float32, seed=10)

    def everything(z):
        return vaekernels.jacobian_column_sq_norms(decoder, z, [0, 2]).sum(-1) + vaekernels.grae_regularizer(
            decoder, z, 0.5, exact=True
        )

    torch._dynamo.reset()
    compiled = torch.compile(everything, fullgraph=True, backend=compiler)
    assert_rel(compiled(z), everything(z), torch.float32)


def test_module_is_the_function():
    decoder = mlp([3, 7, 4], "relu")
    z = randn(5, 3, seed=11)
    module = vaekernels.nn.GRAERegularizer(beta=0.2, num_columns=2)
    assert torch.equal(
        module(decoder, z, generator=torch.Generator().manual_seed(0)),
        vaekernels.grae_regularizer(decoder, z, 0.2, num_columns=2, generator=torch.Generator().manual_seed(0)),
    )


class _RoundThrough(torch.autograd.Function):
    """Rounding with a straight-through backward and no forward-mode formula."""

    @staticmethod
    def forward(ctx, x):
        return x.round()

    @staticmethod
    def backward(ctx, grad):
        return grad


class Rounding(nn.Module):
    def forward(self, x):
        return _RoundThrough.apply(x)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (
            lambda g, z: vaekernels.jacobian_column_sq_norms(
                nn.Sequential(nn.Linear(3, 4), Rounding(), nn.Linear(4, 2)), z
            ),
            ValueError,
            "could not be differentiated in forward mode",
        ),
        (lambda g, z: vaekernels.jacobian_gram(g, z[:, :2]), ValueError, "z must have shape [B, 3]"),
        (lambda g, z: vaekernels.jacobian_column_sq_norms(g, z, [0, 3]), IndexError, "columns must lie in [0, 2]"),
        (lambda g, z: vaekernels.jacobian_column_sq_norms(g, z, [-1]), IndexError, "got -1"),
        (lambda g, z: vaekernels.jacobian_column_sq_norms(g, z, [0.5]), ValueError, "integer column indices"),
        (lambda g, z: vaekernels.jacobian_gram(g, z[0]), ValueError, "z must have shape [B, d]"),
        (lambda g, z: vaekernels.jacobian_gram(g, z.long()), TypeError, "z must be a floating-point tensor"),
        (lambda g, z: vaekernels.jacobian_gram("decoder", z), TypeError, "decoder must be an nn.Module"),
        (lambda g, z: vaekernels.grae_regularizer(g, z, 0.0), ValueError, "beta must be a positive number"),
        (
            lambda g, z: vaekernels.grae_regularizer(g, z, 1.0, num_columns=4),
            ValueError,
            "num_columns must be an integer in [1, 3]",
        ),
        (
            lambda g, z: vaekernels.grae_regularizer(g, z, 1.0, exact=True, num_columns=1),
            ValueError,
            "exact=True takes none",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, message):
    decoder = mlp([3, 4, 2], "tanh", dtype=torch.float32)
    with pytest.raises(error, match="vaekernels.(jacobian|grae)") as raised:
        call(decoder, torch.randn(2, 3))
    assert message in str(raised.value)


@needs_cpp
def test_kernels_reject_bad_shapes():
    with pytest.raises(RuntimeError, match="jacobian_tangent_step: tangent must have shape"):
        torch.ops.vaekernels.jacobian_tangent_step(torch.zeros(2, 3), torch.zeros(3, 1, 3), "tanh", 0.0, 0.0)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        torch.ops.vaekernels.jacobian_tangent_step(torch.zeros(2, 3), torch.zeros(2, 1, 3), "swish", 0.0, 0.0)
    with pytest.raises(RuntimeError, match="jacobian_gram_reduce: metric must have shape"):
        torch.ops.vaekernels.jacobian_gram_reduce(torch.zeros(2, 1, 3), torch.zeros(2, 2), True)
