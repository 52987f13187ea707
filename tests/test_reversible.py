"""The reversible family: the fused walk step against its reference, and ReversibleSequential's
gradients, reconstruction, randomness, batch norm, mixed precision, DDP and bad inputs against
the same blocks run as an ordinary network."""

import copy
import os
import re
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from conftest import device_backends, needs_cpp_and_triton, rel_err
from torch import nn

import vaekernels
from vaekernels.nn import AdditiveCoupling, AffineCoupling, InvertibleDownsample, ReversibleSequential
from vaekernels.reference import reversible as ref

NATIVE = [pytest.param(pair, id=f"{pair[0]}-{pair[1]}") for pair in device_backends() if pair[1] != "reference"]


def mlp(width, dropout=0.0, norm=False):
    layers = [nn.Linear(width, width)]
    if norm:
        layers.append(nn.BatchNorm1d(width))
    layers += (
        [nn.Tanh(), nn.Dropout(dropout), nn.Linear(width, width)] if dropout else [nn.Tanh(), nn.Linear(width, width)]
    )
    return nn.Sequential(*layers)


def stack(depth, width, seed=0, dtype=torch.float32, **kwargs):
    torch.manual_seed(seed)
    return ReversibleSequential(
        *[AdditiveCoupling(mlp(width, **kwargs), mlp(width, **kwargs)) for _ in range(depth)]
    ).to(dtype)


def gradients(net, x, ordinary, seed=5):
    """Output, input gradient and parameter gradients of <net(x), w> under a fixed RNG seed,
    run reversibly or (ordinary=True) as the same blocks with stored activations."""
    x = x.detach().clone().requires_grad_()
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = ref.reversible_sequential(net.blocks, x)[0] if ordinary else net(x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(y.dtype)
    (y * w).sum().backward()
    return [y.detach(), x.grad, *[p.grad for p in net.parameters()]]


# ----------------------------------------------------------------------------- the fused step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (3, 17), (2, 5, 7, 3), (1037,)])
def test_coupling_backward_step_matches_reference(device_backend, dtype, shape):
    device, _ = device_backend
    g = torch.Generator().manual_seed(0)
    stream, update, grad, grad_update = (torch.randn(shape, generator=g, dtype=dtype).to(device) for _ in range(4))
    want_stream, want_grad = stream - update, grad + grad_update
    stream_ptr = stream.data_ptr()
    vaekernels.coupling_backward_step(stream, update, grad, grad_update)
    assert stream.data_ptr() == stream_ptr  # in place
    assert torch.equal(stream, want_stream) and torch.equal(grad, want_grad)


@pytest.mark.parametrize("device_backend", NATIVE)
def test_coupling_backward_step_with_bf16_branches(device_backend):
    device, _ = device_backend
    g = torch.Generator().manual_seed(1)
    stream, grad = torch.randn(4, 33, generator=g).to(device), torch.randn(4, 33, generator=g).to(device)
    update, grad_update = torch.randn(4, 33, generator=g).bfloat16().to(device), torch.randn(4, 33).bfloat16()
    want_stream, want_grad = stream - update.float(), grad + grad_update.float()
    vaekernels.coupling_backward_step(stream, update, grad, grad_update.to(device))
    assert stream.dtype == torch.float32
    assert torch.equal(stream, want_stream) and torch.equal(grad, want_grad)


@pytest.mark.parametrize("device_backend", NATIVE)
def test_coupling_backward_step_opcheck(device_backend):
    device, backend = device_backend
    op = (torch.ops.vaekernels_triton if backend == "triton" else torch.ops.vaekernels).coupling_backward_step.default
    g = torch.Generator().manual_seed(2)
    torch.library.opcheck(op, tuple(torch.randn(3, 11, generator=g, dtype=torch.float64).to(device) for _ in range(4)))


@pytest.mark.parametrize("device_backend", NATIVE)
@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_coupling_backward_step_compiles_fullgraph(device_backend, compiler):
    device, backend = device_backend

    def walk_step(stream, update, grad, grad_update):
        vaekernels.coupling_backward_step(stream, update, grad, grad_update)
        return stream * 2, grad

    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(5, 9, generator=g).to(device) for _ in range(4)]
    copies = [t.clone() for t in inputs]
    torch._dynamo.reset()
    with vaekernels.use_backend(backend):
        eager = walk_step(*inputs)
        compiled = torch.compile(walk_step, fullgraph=True, backend=compiler)(*copies)
    for got, want in zip([*compiled, *copies], [*eager, *inputs]):
        assert torch.equal(got, want)


@needs_cpp_and_triton
def test_triton_op_has_the_cpp_schema():
    cpp = str(torch.ops.vaekernels.coupling_backward_step.default._schema)
    triton = str(torch.ops.vaekernels_triton.coupling_backward_step.default._schema)

    # custom_op names its alias sets a0, a2, ...; the C++ schema a, b: the same mutations.
    def canonical(schema):
        return re.sub(r"\(a\d*!\)|\(b!\)", "(!)", schema.replace("vaekernels_triton::", "vaekernels::"))

    assert canonical(triton) == canonical(cpp)


def test_coupling_backward_step_bad_inputs():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"coupling_backward_step: update must have shape .*\[2, 3\], got \[3, 2\]"):
        vaekernels.coupling_backward_step(a, torch.zeros(3, 2), a.clone(), a.clone())
    with pytest.raises(TypeError, match="grad must have the dtype of stream"):
        vaekernels.coupling_backward_step(a, a.clone(), a.double(), a.clone())
    with pytest.raises(ValueError, match="stream and grad must be contiguous"):
        vaekernels.coupling_backward_step(a.t(), a.t(), a.t(), a.t())


# ----------------------------------------------------------------------------- ReversibleSequential


def test_gradcheck_float64_inputs_and_parameters():
    net = stack(3, 2, dtype=torch.float64)
    names, params = zip(*net.named_parameters())

    def fn(x, *ps):
        return torch.func.functional_call(net, dict(zip(names, ps)), (x,))

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, *[p.detach().clone().requires_grad_() for p in params]))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_float32_gradients_equal_the_ordinary_network_at_depth_64(dropout):
    net = stack(64, 8, dropout=dropout)
    x = torch.randn(16, 16)
    rev, ordinary = gradients(net, x, ordinary=False), gradients(net, x, ordinary=True)
    assert torch.equal(rev[0], ordinary[0])  # same forward, dropout masks included
    worst = max(rel_err(a, b) for a, b in zip(rev[1:], ordinary[1:]))
    assert worst <= 1e-5, worst


def test_reconstruction_after_64_float32_blocks():
    net = stack(64, 8)
    x = torch.randn(16, 16)
    with torch.no_grad():
        y = net(x)
        assert rel_err(net.inverse(y), x) <= 1e-5
    # Block by block too (the walk's own rebuild, in place, is checked through the gradients above).
    h = x
    for block in net.blocks:
        h2 = block(h)
        assert rel_err(block.inverse(h2), h) <= 1e-6
        h = h2


def test_bf16_gradient_error_at_most_1_5x_ordinary_bf16_backprop():
    net = stack(64, 8)
    x = torch.randn(16, 16)
    truth = gradients(copy.deepcopy(net).double(), x.double(), ordinary=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ordinary = gradients(net, x, ordinary=True)
    rev_net = ReversibleSequential(*net.blocks, stream_dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rev_net(x)
    assert y.dtype == torch.float32  # residual streams kept in float32
    # The backward runs outside autocast; the recomputation must use the forward's bf16 state.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rev = gradients(rev_net, x, ordinary=False)
    rev_err = max(rel_err(a, b) for a, b in zip(rev[1:], truth[1:]))
    ordinary_err = max(rel_err(a, b) for a, b in zip(ordinary[1:], truth[1:]))
    assert ordinary_err > 1e-4  # bf16 is really in use
    assert rev_err <= 1.5 * ordinary_err, (rev_err, ordinary_err)


def test_recomputation_runs_under_the_forwards_autocast_state():
    net = stack(8, 8)
    x = torch.randn(8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    y.sum().backward()  # outside autocast: a float32 recomputation would not rebuild the input
    reference_grad = torch.autograd.grad(_autocast_ordinary(net, x).sum(), x)[0]
    assert rel_err(x.grad, reference_grad) <= 1e-2


def _autocast_ordinary(net, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return ref.reversible_sequential(net.blocks, x)[0]


def test_batch_norm_running_stats_equal_the_ordinary_network_after_steps():
    rev = stack(6, 8, norm=True)
    ordinary = copy.deepcopy(rev)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (rev, ordinary)]
    for step in range(3):
        x = torch.randn(16, 16, generator=torch.Generator().manual_seed(step))
        for model, optimizer, run in ((rev, optimizers[0], rev), (ordinary, optimizers[1], None)):
            optimizer.zero_grad()
            y = model(x) if run is not None else ref.reversible_sequential(model.blocks, x)[0]
            y.square().mean().backward()
            optimizer.step()
    for (name, a), b in zip(rev.named_buffers(), ordinary.buffers()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    assert all(m.num_batches_tracked.item() == 3 for m in rev.modules() if isinstance(m, nn.BatchNorm1d))


def test_global_rng_after_backward_is_the_ordinary_networks():
    net = stack(4, 8, dropout=0.5)
    x = torch.randn(4, 16, requires_grad=True)
    states = []
    for ordinary in (False, True):
        torch.manual_seed(11)
        y = ref.reversible_sequential(net.blocks, x)[0] if ordinary else net(x)
        y.sum().backward()
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])


def test_autograd_grad_accumulation_and_retain_graph():
    net = stack(5, 4)
    x1, x2 = torch.randn(6, 8), torch.randn(6, 8)
    params = list(net.parameters())
    g1 = torch.autograd.grad(net(x1).square().sum(), params)
    g2 = torch.autograd.grad(net(x2).square().sum(), params)
    assert all(p.grad is None for p in params)  # autograd.grad leaves .grad alone
    net(x1).square().sum().backward()
    loss = net(x2).square().sum()
    loss.backward(retain_graph=True)
    for p, a, b in zip(params, g1, g2):
        assert torch.allclose(p.grad, a + b, rtol=1e-5, atol=1e-6)
    loss.backward()  # the walk works on a copy of the output, so a second backward sees the same
    for p, a, b in zip(params, g1, g2):
        assert torch.allclose(p.grad, a + 2 * b, rtol=1e-5, atol=1e-6)


def test_each_blocks_parameter_gradients_are_accumulated_before_the_walk_goes_on():
    """The walk hands each block's parameter gradients to autograd (.grad, DDP's hooks) as soon as
    the block is reversed, so it never holds the gradients of more than one block."""
    blocks = [AdditiveCoupling(mlp(4), mlp(4)) for _ in range(4)]
    events = []
    for i, block in enumerate(blocks):
        block.F.register_forward_pre_hook(lambda module, args, i=i: events.append(("recompute", i)))
        for p in block.parameters():
            p.register_post_accumulate_grad_hook(lambda p, i=i: events.append(("accumulated", i)))
    y = ReversibleSequential(*blocks)(torch.randn(5, 8))
    events.clear()  # the forward's calls of F
    y.square().sum().backward()
    for i in range(1, len(blocks)):
        before = events[: events.index(("recompute", i - 1))]
        assert before.count(("accumulated", i)) == len(list(blocks[i].parameters()))
    assert events.count(("accumulated", 0)) == len(list(blocks[0].parameters()))


@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_compiled_branches_give_the_eager_gradients(compiler):
    torch.manual_seed(0)
    blocks = [AdditiveCoupling(mlp(4), mlp(4)) for _ in range(3)]
    eager = ReversibleSequential(*blocks)
    compiled = ReversibleSequential(
        *[AdditiveCoupling(torch.compile(b.F, backend=compiler), torch.compile(b.G, backend=compiler)) for b in blocks]
    )
    torch._dynamo.reset()
    x = torch.randn(5, 8)
    want, got = gradients(eager, x, ordinary=False), gradients(compiled, x, ordinary=False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_branch_whose_gradient_passes_through_keeps_its_parameter_gradient():
    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 2))

        def forward(self, x):
            return x + self.w  # autograd hands the incoming gradient itself to w

    torch.manual_seed(0)
    net = ReversibleSequential(*[AdditiveCoupling(Shift(), Shift()) for _ in range(3)])
    x = torch.randn(3, 4)
    for a, b in zip(gradients(net, x, ordinary=False), gradients(net, x, ordinary=True)):
        torch.testing.assert_close(a, b)


def test_affine_coupling_logdet_and_gradients():
    torch.manual_seed(0)
    blocks = [AffineCoupling(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 6))) for _ in range(4)]
    net = ReversibleSequential(*blocks)
    x = torch.randn(1, 6, dtype=torch.float64)
    net = net.double()
    y, logdet = net(x)
    jacobian = torch.autograd.functional.jacobian(lambda t: ref.reversible_sequential(net.blocks, t)[0], x)
    assert torch.allclose(logdet, torch.logdet(jacobian.reshape(6, 6)).reshape(1), atol=1e-10)
    assert rel_err(net.inverse(y), x) <= 1e-12
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    names, params = zip(*net.named_parameters())

    def fn(x, *ps):
        y, logdet = torch.func.functional_call(net, dict(zip(names, ps)), (x,))
        return y, logdet

    assert torch.autograd.gradcheck(fn, (x, *[p.detach().clone().requires_grad_() for p in params]))


def test_invertible_downsample_is_bit_exact_and_walks():
    down = InvertibleDownsample(2)
    x = torch.randn(2, 3, 6, 4)
    assert torch.equal(down.inverse(down(x)), x)
    torch.manual_seed(0)

    def conv(c):
        return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.Tanh())

    net = ReversibleSequential(
        InvertibleDownsample(2),
        AdditiveCoupling(conv(2), conv(2)),
        InvertibleDownsample(2),
        AdditiveCoupling(conv(8), conv(8)),
    )
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert rel_err(net.inverse(net(x)), x) <= 1e-6
    for a, b in zip(gradients(net, x, ordinary=False), gradients(net, x, ordinary=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_generic_invertible_module_is_walked_through_its_inverse():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.log_scale = nn.Parameter(torch.tensor(0.3))

        def forward(self, x):
            return x * self.log_scale.exp()

        def inverse(self, y):
            return y / self.log_scale.exp()

    torch.manual_seed(0)
    net = ReversibleSequential(AdditiveCoupling(mlp(3), mlp(3)), Scale(), AdditiveCoupling(mlp(3), mlp(3)))
    x = torch.randn(4, 6)
    for a, b in zip(gradients(net, x, ordinary=False), gradients(net, x, ordinary=True)):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- DDP


def _ddp_worker(rank, world, path, state, x, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    net = stack(4, 4)
    net.load_state_dict(state)
    model = nn.parallel.DistributedDataParallel(net)
    shard = x.chunk(world)[rank]
    model(shard).square().sum().div(len(shard)).backward()  # DDP averages over ranks
    if rank == 0:
        torch.save([p.grad for p in net.parameters()], out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # Tearing down the DDP model can deadlock in torch 2.13 with gloo: the Reducer's destructor
    # joins a gloo work thread (holding the GIL) while that thread frees a finished allreduce
    # whose captured thread-local state needs the GIL. The result is saved; skip the teardown.
    os._exit(0)


def test_ddp_two_gloo_processes_match_single_process():
    net = stack(4, 4)
    x = torch.randn(8, 8)
    net(x).square().sum().div(len(x)).backward()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "grads.pt")
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "rendezvous"), net.state_dict(), x, out), nprocs=2)
        ddp_grads = torch.load(out)
    for p, g in zip(net.parameters(), ddp_grads):
        assert (p.grad - g).abs().max().item() <= 1e-6


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors():
    net = stack(2, 2)
    with pytest.raises(
        ValueError,
        match=r"AdditiveCoupling: input must have shape \[B, C, \.\.\.\] with an even "
        r"channel count C to split into halves, got \[3, 5\]",
    ):
        net(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"nn.ReversibleSequential: x must have shape \[B, C, \.\.\.\], got \[4\]"):
        net(torch.randn(4))
    with pytest.raises(TypeError, match=r"blocks\[1\] must be an invertible nn.Module .* got Linear"):
        ReversibleSequential(AdditiveCoupling(nn.Linear(2, 2)), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="ReversibleSequential: blocks must hold at least one block, got none"):
        ReversibleSequential()
    with pytest.raises(ValueError, match=r"F must map a half .* shape \[3, 2\], got \[3, 3\]"):
        ReversibleSequential(AdditiveCoupling(nn.Linear(2, 3)))(torch.randn(3, 4))
    with pytest.raises(ValueError, match="AdditiveCoupling: input must have shape .* even channel count"):
        AdditiveCoupling(nn.Linear(2, 2))(torch.randn(3, 3))
    with pytest.raises(
        ValueError,
        match=r"InvertibleDownsample: input must have shape \[B, C, H, W\] with H and W "
        r"divisible by block_size = 2, got \[1, 1, 3, 4\]",
    ):
        InvertibleDownsample(2)(torch.randn(1, 1, 3, 4))
    with pytest.raises(ValueError, match=r"net must map a half .* to \[B, C, \.\.\.\] = \[2, 4\], got \[2, 3\]"):
        AffineCoupling(nn.Linear(2, 3))(torch.randn(2, 4))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        net(torch.ones(2, 4, dtype=torch.long))
