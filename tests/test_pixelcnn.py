"""PixelCNN ops against their references, exact causality of whole layer stacks, masked weights that
stay zero, cached sampling equal to naive sampling, registration (opcheck, gradcheck, compile) and
bad inputs."""

import math

import pytest
import torch
from conftest import device_backends, rel_err

import vaekernels
from vaekernels import _backend
from vaekernels.ops import pixelcnn as pixelcnn_ops
from vaekernels.ops.pixelcnn import MASK_TYPES, causal_conv2d, gated_conv1x1
from vaekernels.reference import pixelcnn as ref

RTOL = {torch.float32: 2e-6, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float64]
NATIVE = [pytest.param(pair, id=f"{pair[0]}-{pair[1]}") for pair in device_backends() if pair[1] != "reference"]


def randn(*shape, device="cpu", dtype=torch.float64, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(
        device=device, dtype=dtype
    )


def grads(fn, inputs, seed=7):
    """Output and gradients of fn(*inputs) under a fixed random cotangent."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    cotangent = randn(*out.shape, seed=seed).to(device=out.device, dtype=out.dtype)
    (out * cotangent).sum().backward()
    return out.detach(), [t.grad for t in leaves if t is not None]


def check_against_reference(fused, oracle, inputs, dtype, rtol=None):
    rtol = rtol or RTOL[dtype]
    out, fused_grads = grads(fused, inputs)
    expected, oracle_grads = grads(oracle, [t.double() if t is not None else None for t in inputs])
    assert out.dtype == dtype and out.shape == expected.shape
    assert rel_err(out, expected) <= rtol, rel_err(out, expected)
    for got, want in zip(fused_grads, oracle_grads):
        assert got.shape == want.shape
        assert rel_err(got, want) <= rtol, rel_err(got, want)


# ----------------------------------------------------------------------------- masked_conv2d


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kernel,mask_type,groups",
    [
        ((1, 1), "B", 1),
        ((1, 1), "A", 3),
        ((3, 3), "A", 1),
        ((5, 3), "B", 1),
        ((1, 5), "A", 1),
        ((7, 7), "B", 3),
        ((3, 5), "A", 3),
    ],
)
def test_masked_conv2d_matches_dense_conv_times_mask(dtype, kernel, mask_type, groups):
    x, weight, bias = randn(2, 6, 5, 7, dtype=dtype), randn(9, 6, *kernel, dtype=dtype, seed=1), randn(9, seed=2)
    check_against_reference(
        lambda *t: vaekernels.masked_conv2d(*t, mask_type, channel_groups=groups),
        lambda *t: ref.masked_conv2d(*t, mask_type, channel_groups=groups),
        [x, weight, bias.to(dtype)],
        dtype,
        rtol=RTOL[dtype] * 5,
    )


def test_masked_conv2d_without_bias_and_one_by_one_type_a_sees_nothing():
    x, weight = randn(2, 3, 4, 4), randn(5, 3, 1, 1)
    assert torch.equal(vaekernels.masked_conv2d(x, weight, None, "A"), torch.zeros(2, 5, 4, 4, dtype=x.dtype))
    assert torch.allclose(vaekernels.masked_conv2d(x, weight, None, "B"), torch.nn.functional.conv2d(x, weight))


@pytest.mark.parametrize("mask_type,groups", [("A", 1), ("B", 1), ("A", 3), ("B", 3)])
def test_masked_weights_get_exactly_zero_gradient(mask_type, groups):
    weight = randn(6, 3, 5, 5).requires_grad_()
    vaekernels.masked_conv2d(randn(2, 3, 6, 6, seed=1), weight, None, mask_type, channel_groups=groups).sum().backward()
    mask = ref.causal_mask(6, 3, (5, 5), mask_type, groups, dtype=torch.float64)
    assert torch.count_nonzero(weight.grad * (1 - mask)) == 0
    assert torch.count_nonzero(weight.grad * mask) == torch.count_nonzero(mask)  # every causal tap learns


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=1e-2),
    ],
)
def test_masked_weights_stay_zero_through_optimiser_steps(optimizer):
    torch.manual_seed(0)
    conv = vaekernels.nn.MaskedConv2d(3, 6, 5, mask_type="A", channel_groups=3)
    opt = optimizer(conv.parameters())
    start = conv.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        conv(torch.randn(2, 3, 6, 6)).square().mean().backward()
        opt.step()
    mask = ref.causal_mask(6, 3, (5, 5), "A", 3)
    assert torch.count_nonzero(conv.weight.detach() * (1 - mask)) == 0
    assert torch.count_nonzero((conv.weight.detach() - start) * mask) == torch.count_nonzero(mask)


def test_masked_conv_module_is_a_drop_in_conv2d():
    conv = vaekernels.nn.MaskedConv2d(4, 8, (3, 5), mask_type="B", padding=(1, 2))
    assert isinstance(conv, torch.nn.Conv2d)
    plain = torch.nn.Conv2d(4, 8, (3, 5), padding=(1, 2))
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 6, 7)
    assert torch.allclose(conv(x), plain(x), atol=1e-6)  # masked taps start at zero


def future_positions(height, width, channels, groups, i, j, c, mask_type):
    """Boolean [channels, H, W]: the inputs that output (c, i, j) must not see."""
    future = torch.zeros(channels, height, width, dtype=torch.bool)
    future[:, i, j + 1 :] = True
    future[:, i + 1 :] = True
    group = torch.arange(channels) * groups // channels
    out_group = c * groups // channels
    future[:, i, j] = group > out_group if mask_type == "B" else group >= out_group
    return future


def test_masked_conv_stack_is_causal_in_raster_and_channel_order():
    """A type-A conv then two type-B convs with RGB channel groups: the input gradient of every
    output is zero exactly on the future (later pixels, later or same channel groups at the pixel
    itself for type A), and its support is exactly the set the masks reach (the dense reference
    convolutions with the 0/1 masks as weights: plain masked stacks keep PixelCNN's blind spot)."""
    torch.manual_seed(0)
    sizes = [(3, 12, "A"), (12, 12, "B"), (12, 3, "B")]
    convs = [vaekernels.nn.MaskedConv2d(i, o, 5, t, channel_groups=3).double() for i, o, t in sizes]
    masks = [ref.causal_mask(o, i, (5, 5), t, 3, dtype=torch.float64) for i, o, t in sizes]

    def stack(x):
        for index, conv in enumerate(convs):
            x = conv(x) if index == len(convs) - 1 else torch.tanh(conv(x))
        return x

    def reach(x):
        for mask in masks:
            x = torch.nn.functional.conv2d(x, mask, padding=2)
        return x

    x = torch.randn(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    out, reached = stack(x), reach(x)
    for c, i, j in [(0, 0, 0), (2, 0, 0), (1, 2, 3), (0, 4, 4), (2, 4, 1)]:
        (grad,) = torch.autograd.grad(out[0, c, i, j], x, retain_graph=True)
        (support,) = torch.autograd.grad(reached[0, c, i, j], x, retain_graph=True)
        future = future_positions(5, 5, 3, 3, i, j, c, "A")
        assert torch.count_nonzero(grad[0][future]) == 0
        assert torch.equal(grad[0] != 0, support[0] != 0)
        # Perturbing the future never moves the output, bit for bit.
        moved = stack(torch.where(future, x.detach() + 3.0, x.detach()).reshape(1, 3, 5, 5))
        assert moved[0, c, i, j] == out[0, c, i, j]


def test_causal_conv2d_offsets():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    up_left = causal_conv2d(x, [(torch.ones(1, 1, 1, 1), 1, 1)])
    assert torch.equal(up_left[0, 0], torch.tensor([[0.0] * 4, [0.0, 0.0, 1.0, 2.0], [0.0, 4.0, 5.0, 6.0]]))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("pads", [(1, 1, 1, -1), (1, 0, 0, 0), (2, -1, 0, 3), (-1, -1, -1, 1), (0, 0, 0, 0)])
def test_causal_padding_is_f_pad(pads, memory_format):
    # The padded copy is written pixel by pixel and strip by strip into an unwritten tensor, which
    # the NaN-poisoning fixture fills: a pixel or strip left out fails. x's layout is kept.
    x = torch.randn(2, 3, 5, 6).to(memory_format=memory_format)
    padded = pixelcnn_ops._padded(x, pads)
    assert torch.equal(padded, torch.nn.functional.pad(x, pads))
    assert padded.is_contiguous(memory_format=memory_format)


# ----------------------------------------------------------------------------- gated_activation


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate", ["tanh", "linear"])
@pytest.mark.parametrize(
    "shape,with_cond",
    [((1, 2, 1, 1), False), ((2, 6, 5, 7), True), ((3, 10, 33), True), ((2, 4), False), ((1, 2, 3, 1, 5), True)],
)
def test_gated_activation_matches_reference(device_backend, dtype, gate, shape, with_cond):
    device, _ = device_backend
    x = randn(*shape, device=device, dtype=dtype, scale=2)
    cond = randn(*shape[:2], device=device, dtype=dtype, seed=3) if with_cond else None
    check_against_reference(
        lambda *t: vaekernels.gated_activation(*t, gate=gate),
        lambda *t: ref.gated_activation(*t, gate=gate),
        [x, cond],
        dtype,
    )


def test_gated_activation_reads_a_cropped_conv_output_in_place(device_backend):
    device, _ = device_backend
    full = randn(2, 8, 7, 5, device=device, dtype=torch.float32)
    cropped = full[:, :, :6]  # [2, 8, 6, 5]: rows of 30 contiguous pixels, strided channels
    cond = randn(2, 8, device=device, dtype=torch.float32, seed=1)
    assert (
        rel_err(vaekernels.gated_activation(cropped, cond), ref.gated_activation(cropped.double(), cond.double()))
        <= RTOL[torch.float32]
    )


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_gated_activation_backward_reads_an_expanded_gradient(device_backend, reduce):
    """The gradient of a sum or a mean arrives with stride 0 and is read in place."""
    device, _ = device_backend
    x, cond = randn(2, 6, 3, 5, device=device, scale=2), randn(2, 6, device=device, seed=1)
    got = grads(lambda *t: getattr(vaekernels.gated_activation(*t), reduce)().unsqueeze(0), [x, cond])[1]
    want = grads(lambda *t: getattr(ref.gated_activation(*t), reduce)().unsqueeze(0), [x, cond])[1]
    for a, b in zip(got, want):
        assert rel_err(a, b) <= RTOL[torch.float64]


def test_gated_activation_saves_only_its_input():
    x = randn(2, 8, 5, 5, dtype=torch.float32).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        vaekernels.gated_activation(x, gate="tanh")
    assert [t.untyped_storage().data_ptr() for t in saved] == [x.untyped_storage().data_ptr()]


def test_gated_activation_extremes_give_no_nan(device_backend):
    device, _ = device_backend
    x = torch.tensor([[1e4, -1e4, 0.0, 1e4, -1e4, 1e4]], device=device).view(1, 6, 1).requires_grad_()
    out = vaekernels.gated_activation(x)
    out.sum().backward()
    assert torch.equal(out.detach().flatten(), torch.tensor([1.0, 0.0, 0.0], device=device))
    assert not torch.isnan(x.grad).any()


# ----------------------------------------------------------------------------- concat_elu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (2, 3, 5, 7), (3, 4, 33), (1, 2, 3, 1, 5), (2, 1, 0)])
def test_concat_elu_matches_reference(device_backend, dtype, shape):
    device, _ = device_backend
    x = randn(*shape, device=device, dtype=dtype, scale=3)
    # Both signs, zeros and values where expm1 runs near 0 (its series) and far from it.
    x.view(-1)[: min(4, x.numel())] = torch.tensor([0.0, -1e-5, 1e-5, -0.69], dtype=dtype)[: min(4, x.numel())]
    check_against_reference(vaekernels.concat_elu, ref.concat_elu, [x], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", [(1, 1, 1, 0), (1, 0, 1, 0), (0, 0, 0, 0), (2, 3, 0, 4)])
def test_concat_elu_with_padding_is_f_pad_of_it(device_backend, dtype, padding):
    device, _ = device_backend
    x = randn(2, 3, 5, 4, device=device, dtype=dtype, scale=3)
    check_against_reference(
        lambda t: vaekernels.concat_elu(t, padding=padding), lambda t: ref.concat_elu(t, padding), [x], dtype
    )
    # Exactly F.pad of the unpadded op: zeros on the padding, the same numbers inside.
    unpadded = vaekernels.concat_elu(x)
    assert torch.equal(vaekernels.concat_elu(x, padding=padding), torch.nn.functional.pad(unpadded, padding))
    # A non-contiguous input and a gradient of any layout.
    x = randn(2, 6, 5, 4, device=device).to(memory_format=torch.channels_last)[:, 1:4]
    got = grads(lambda t: vaekernels.concat_elu(t, padding=padding).sum().unsqueeze(0), [x])[1][0]
    want = grads(lambda t: ref.concat_elu(t, padding).sum().unsqueeze(0), [x])[1][0]
    assert rel_err(got, want) <= RTOL[torch.float64]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_concat_elu_of_any_layout(device_backend, memory_format):
    device, _ = device_backend
    x = randn(2, 6, 5, 4, device=device).to(memory_format=memory_format)
    check_against_reference(vaekernels.concat_elu, ref.concat_elu, [x[:, 1:4]], torch.float64)
    # The gradient of a sum arrives expanded (stride 0).
    got = grads(lambda t: vaekernels.concat_elu(t).sum().unsqueeze(0), [x])[1][0]
    want = grads(lambda t: ref.concat_elu(t).sum().unsqueeze(0), [x])[1][0]
    assert rel_err(got, want) <= RTOL[torch.float64]


@pytest.mark.parametrize("padding", [None, (1, 1, 1, 0), (1, 0, 1, 0), (0, 2, 0, 3)])
def test_channels_last_stays_channels_last(device_backend, padding):
    """A channels-last input (what a convolution on CPU runs fastest on) gives a channels-last
    output and input gradient, equal to those of the same values laid out channels first:
    concat_elu with and without padding, and the gate a * sigmoid(b)."""
    device, _ = device_backend
    g = torch.Generator().manual_seed(5)
    for op, x in (
        (lambda t: vaekernels.concat_elu(t, padding=padding), randn(2, 5, 4, 3, device=device, scale=3)),
        (vaekernels.gated_activation, randn(2, 6, 4, 3, device=device, scale=3)),
    ):
        first, last = x.clone().requires_grad_(), x.to(memory_format=torch.channels_last).requires_grad_()
        out_first, out_last = op(first), op(last)
        assert out_last.is_contiguous(memory_format=torch.channels_last) and not out_last.is_contiguous()
        grad = torch.randn(out_first.shape, generator=g, dtype=x.dtype).to(device)
        out_first.backward(grad)
        out_last.backward(grad.to(memory_format=torch.channels_last))
        assert rel_err(out_last, out_first) <= RTOL[torch.float64]
        assert rel_err(last.grad, first.grad) <= RTOL[torch.float64]
        assert last.grad.is_contiguous(memory_format=torch.channels_last)


def test_concat_elu_saves_only_its_input():
    x = randn(2, 8, 5, 5, dtype=torch.float32).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        vaekernels.concat_elu(x)
    assert [t.untyped_storage().data_ptr() for t in saved] == [x.untyped_storage().data_ptr()]


def test_concat_elu_extremes(device_backend):
    device, _ = device_backend
    inf, nan = float("inf"), float("nan")
    # A row of 64, so that the reference's F.elu reaches the NaN in its vectorised loop, which
    # gives it the gradient NaN as the kernels do (its scalar tail would give the slope 1).
    values = torch.tensor([nan, inf, -inf, 1e30, -1e30, -200.0], device=device)
    x = torch.cat([values, torch.zeros(58, device=device)]).view(1, 64).requires_grad_()
    out = vaekernels.concat_elu(x)
    expected = ref.concat_elu(x.detach().double()).float()
    assert out[0, 0].isnan() and out[0, 64].isnan()
    assert torch.equal(out.detach()[:, 1:64], expected[:, 1:64]) and torch.equal(out.detach()[:, 65:], expected[:, 65:])
    cotangent = torch.arange(1.0, 129.0, device=device).view(1, 128)
    (out * cotangent).sum().backward()
    # g1 elu'(v) - g2 elu'(-v): NaN at NaN, g1 at +inf and 1e30, -g2 at -inf and -1e30, g1 e^-200 - g2
    # at -200, and g1 - g2 = -64 at 0 (both slopes exp(0) = 1).
    assert x.grad[0, 0].isnan() and x.grad[0, 1:6].tolist() == [2.0, -67.0, 4.0, -69.0, -70.0]
    assert (x.grad[0, 6:] == -64.0).all()


CPP_BACKEND = [backend for backend in vaekernels.available_backends() if backend == "cpu"]


@pytest.mark.parametrize("backend", CPP_BACKEND)
def test_float32_tanh_of_the_cpu_kernel_is_within_a_few_ulp(backend):
    """The C++ kernel's float tanh is a fitted rational function (csrc/cpu/fast_math.h), not
    Sleef's: over a dense grid of every magnitude, from subnormal to saturated, its relative error
    stays below 3e-7 (about 5 ulp), it is exactly +-1 past |a| = 9 and a for tiny a. Its gradient
    1 - tanh^2 = 1 / cosh^2 is within 1e-6 relatively wherever it is a normal float, also where
    1 - t^2 of a float t loses every digit. The second half at 40 makes the sigmoid exactly 1: the gate is the tanh."""
    tiny_to_large = torch.logspace(-44, 4, 40001, dtype=torch.float64)
    a = torch.cat(
        [
            torch.linspace(-10, 10, 400001, dtype=torch.float64),
            tiny_to_large,
            -tiny_to_large,
            torch.tensor([0.0, math.inf, -math.inf], dtype=torch.float64),
        ]
    ).float()
    x = torch.stack([a, torch.full_like(a, 40.0)]).view(1, 2, -1).requires_grad_()
    with vaekernels.use_backend(backend):
        out = vaekernels.gated_activation(x)
        out.sum().backward()
    exact = torch.tanh(a.double())
    got = out.detach().flatten().double()
    assert ((got - exact).abs() <= 3e-7 * exact.abs()).all()
    assert (got[a.abs() >= 9] == a[a.abs() >= 9].sign()).all()
    assert torch.equal(got[a.abs() < 1e-20], a[a.abs() < 1e-20].double())
    slope = 1 / torch.cosh(a.double()) ** 2
    normal = slope >= torch.finfo(torch.float32).tiny  # below it float keeps no relative accuracy
    assert ((x.grad[0, 0].double() - slope).abs() <= 1e-6 * slope)[normal].all()
    assert ((x.grad[0, 0].double() - slope).abs() <= torch.finfo(torch.float32).tiny)[~normal].all()
    assert (x.grad[0, 1] == 0).all()


# ----------------------------------------------------------------------------- gated PixelCNN layer


# (mask type, kernel, condition, gate, height x width): single rows and columns included, where
# the causal pads of the layer's convolutions reach past the whole image (type A crops a column).
@pytest.mark.parametrize(
    "mask_type,kernel,cond,gate,size",
    [
        ("A", 3, True, "tanh", (5, 6)),
        ("B", 5, False, "linear", (5, 6)),
        ("B", 3, True, "tanh", (5, 6)),
        ("A", 7, False, "tanh", (5, 6)),
        ("B", 3, True, "tanh", (1, 4)),
        ("A", 5, True, "linear", (4, 1)),
    ],
)
def test_gated_layer_matches_the_pytorch_generative_layer(device_backend, mask_type, kernel, cond, gate, size):
    device, _ = device_backend
    torch.manual_seed(0)
    channels = 4
    layer = (
        vaekernels.nn.GatedPixelCNNLayer(
            channels, channels, kernel, mask_type, skip_channels=3, cond_features=5 if cond else 0, gate=gate
        )
        .double()
        .to(device)
    )
    v, h = randn(2, channels, *size, device=device), randn(2, channels, *size, device=device, seed=1)
    y = randn(2, 5, device=device, seed=2) if cond else None
    params = list(layer.parameters())

    def flat(outs):
        return torch.cat([o.flatten() for o in outs if o is not None])

    out = flat(layer(v.requires_grad_(), h.requires_grad_(), y))
    expected = flat(ref.gated_pixelcnn_layer(layer, v, h, y))
    assert rel_err(out, expected) <= 1e-12
    cot = randn(*out.shape, device=device, seed=9)
    got = torch.autograd.grad((out * cot).sum(), [v, h, *params])
    want = torch.autograd.grad((expected * cot).sum(), [v, h, *params])
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-12


def test_gated_conv1x1_saves_its_input_not_the_gated_tensor():
    x = randn(2, 8, 4, 4, dtype=torch.float32).requires_grad_()
    weight = randn(6, 4, 1, 1, dtype=torch.float32).requires_grad_()
    saved = set()
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.add(t.untyped_storage().data_ptr()) or t, lambda t: t
    ):
        gated_conv1x1(x, None, weight, None)
    assert saved == {x.untyped_storage().data_ptr(), weight.untyped_storage().data_ptr()}


def _assert_gradients_whichever_way_asked(loss, leaves, expected):
    """``leaves`` are (x, ..., weight, bias); ``expected`` their gradients. Weight gradients are
    skipped when the backward pass does not use them: each way of asking must still get every
    gradient it asks for."""
    x, weight, bias = leaves[0], leaves[-2], leaves[-1]
    for asked in ([x], [weight], [bias, x], leaves):
        got = torch.autograd.grad(loss(), asked)
        for tensor, grad in zip(asked, got):
            assert rel_err(grad, expected[[t is tensor for t in leaves].index(True)]) <= 1e-12
    loss().backward()
    for tensor, grad in zip(leaves, expected):
        assert rel_err(tensor.grad, grad) <= 1e-12


@pytest.mark.parametrize("with_cond", (False, True))
def test_gated_conv1x1_gradients_whichever_way_they_are_asked_for(with_cond):
    x = randn(2, 8, 3, 5, dtype=torch.float64).requires_grad_()
    cond = randn(2, 8, dtype=torch.float64, seed=1).requires_grad_() if with_cond else None
    weight = randn(6, 4, 1, 1, dtype=torch.float64, seed=2).requires_grad_()
    bias = randn(6, dtype=torch.float64, seed=3).requires_grad_()
    cot = randn(2, 6, 3, 5, dtype=torch.float64, seed=4)
    leaves = [t for t in (x, cond, weight, bias) if t is not None]
    unfused = torch.nn.functional.conv2d(ref.gated_activation(x, cond), weight, bias)
    expected = torch.autograd.grad((unfused * cot).sum(), leaves)
    _assert_gradients_whichever_way_asked(lambda: (gated_conv1x1(x, cond, weight, bias) * cot).sum(), leaves, expected)


class _ConvolutionBackwardMasks(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the output mask (input, weight, bias) of every aten.convolution_backward call."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.masks.append(list(args[-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mask_type", MASK_TYPES)
@pytest.mark.parametrize("with_bias", (True, False))
def test_masked_conv2d_gradients_whichever_way_they_are_asked_for(mask_type, with_bias):
    x = randn(2, 3, 5, 4).requires_grad_()
    weight = randn(4, 3, 3, 5, seed=1).requires_grad_()
    bias = randn(4, seed=2).requires_grad_() if with_bias else None
    cot = randn(2, 4, 5, 4, seed=3)
    leaves = [t for t in (x, weight, bias) if t is not None]
    expected = torch.autograd.grad((ref.masked_conv2d(x, weight, bias, mask_type) * cot).sum(), leaves)

    def loss():
        return (vaekernels.masked_conv2d(x, weight, bias, mask_type) * cot).sum()

    if with_bias:
        _assert_gradients_whichever_way_asked(loss, leaves, expected)
    # Asked for x alone, no part computes its weight's gradient (as many multiply-adds as the forward).
    with _ConvolutionBackwardMasks() as recorded:
        (grad_x,) = torch.autograd.grad(loss(), [x])
    assert recorded.masks and all(mask == [True, False, False] for mask in recorded.masks), recorded.masks
    assert rel_err(grad_x, expected[0]) <= 1e-12


def pixelcnn(levels=2, classes=3, layers=4, kernel=3):
    torch.manual_seed(0)
    return vaekernels.nn.GatedPixelCNN(
        1, 6, layers, kernel_size=kernel, first_kernel=kernel, levels=levels, num_classes=classes
    ).double()


def test_gated_pixelcnn_stack_is_exactly_causal_with_no_blind_spot():
    """Each output's input-gradient support is exactly the set of earlier pixels in raster order
    (zero on the pixel itself and everything after it, nonzero everywhere before it: no blind
    spot), and perturbing a future pixel leaves the output bit-identical. Batch element p holds
    the same image and is differentiated at position p, so one backward covers every position."""
    model = pixelcnn(layers=6)
    size = 5
    positions = size * size
    image = torch.rand(1, 1, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = image.expand(positions, 1, size, size).clone().requires_grad_()
    y = torch.arange(positions) % 3
    logits = model(x, y)
    picked = logits.flatten(1)[torch.arange(positions), torch.arange(positions)]
    (grad,) = torch.autograd.grad(picked.sum(), x)
    order = torch.arange(positions).view(size, size)
    for p in range(positions):
        past = order < p
        assert torch.count_nonzero(grad[p, 0][~past]) == 0, p
        assert torch.count_nonzero(grad[p, 0][past]) == past.sum(), p
    future = (order >= 2 * size + 3).to(x.dtype)
    moved = model(x.detach() + 5 * future, y)
    assert torch.equal(moved[..., 2, 3], logits.detach()[..., 2, 3])


@pytest.mark.parametrize("levels", [2, 256])
def test_cached_sampling_equals_naive_sampling(levels):
    model = pixelcnn(levels=levels, layers=3, kernel=5)
    y = torch.tensor([0, 1, 2])
    fast, fast_logits = model.sample(3, (6, 7), y, generator=torch.Generator().manual_seed(5), return_logits=True)
    slow, slow_logits = model.sample(
        3, (6, 7), y, cached=False, generator=torch.Generator().manual_seed(5), return_logits=True
    )
    assert torch.equal(fast, slow)
    assert (fast_logits - slow_logits).abs().max() <= 1e-4
    assert fast.unique().numel() > 1  # not trivially constant


def test_gated_pixelcnn_nll_is_the_likelihood_of_its_logits():
    model = pixelcnn(levels=2)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64).round()
    y = torch.tensor([1, 0])
    p = torch.sigmoid(model(x, y))
    expected = -(x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)
    assert torch.allclose(model.nll(x, y), expected, rtol=1e-10)
    model = pixelcnn(levels=256)
    x = torch.randint(0, 256, (2, 1, 4, 4)).double()
    log_p = torch.log_softmax(model(x, y), dim=2)  # [B, C, 256, H, W]
    expected = -log_p.gather(2, x.long().unsqueeze(2)).flatten(1).sum(1)
    assert torch.allclose(model.nll(x, y), expected, rtol=1e-10)


# ----------------------------------------------------------------------------- registration


def gated_args(name, device, dtype=torch.float64, cond=True):
    x = randn(2, 6, 5, device=device, dtype=dtype).requires_grad_()
    c = randn(2, 6, device=device, dtype=dtype, seed=1).requires_grad_() if cond else None
    if name == "gated_activation":
        return x, c, "tanh"
    return randn(2, 3, 5, device=device, dtype=dtype, seed=2), x.detach(), None if c is None else c.detach(), "linear"


@pytest.mark.parametrize("device_backend", NATIVE)
@pytest.mark.parametrize("name", ["gated_activation", "gated_activation_backward"])
@pytest.mark.parametrize("cond", [True, False])
def test_opcheck(device_backend, name, cond):
    device, backend = device_backend
    op = getattr(_backend.ops(backend), name).default
    torch.library.opcheck(op, gated_args(name, device, cond=cond))


@pytest.mark.parametrize("device_backend", NATIVE)
@pytest.mark.parametrize("name", ["concat_elu", "concat_elu_backward"])
def test_opcheck_concat_elu(device_backend, name):
    device, backend = device_backend
    op = getattr(_backend.ops(backend), name).default
    cases = (((3, 1, 1, 20), [], (3, 2, 1, 20)), ((2, 3, 4, 5), [1, 2, 1, 0], (2, 6, 5, 8)))
    for memory_format in (torch.contiguous_format, torch.channels_last):
        for shape, padding, grad_shape in cases:
            x = randn(*shape, device=device, dtype=torch.float32, scale=2).contiguous(memory_format=memory_format)
            grad = randn(*grad_shape, device=device, dtype=torch.float32, seed=1)
            grad = grad.contiguous(memory_format=memory_format)
            torch.library.opcheck(op, (x, padding) if name == "concat_elu" else (grad, x, padding))


@pytest.mark.parametrize("device_backend", NATIVE)
def test_gradcheck_float64(device_backend):
    device, _ = device_backend
    assert torch.autograd.gradcheck(vaekernels.concat_elu, (randn(2, 3, 4, device=device, seed=8).requires_grad_(),))
    padded = randn(2, 3, 4, 2, device=device, seed=9).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: vaekernels.concat_elu(t, padding=(1, 0, 2, 1)), (padded,))
    last = padded.detach().to(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: vaekernels.concat_elu(t, padding=(1, 0, 2, 1)), (last,))
    x, c, _ = gated_args("gated_activation", device)
    assert torch.autograd.gradcheck(lambda x, c: vaekernels.gated_activation(x, c, "tanh"), (x, c))
    assert torch.autograd.gradcheck(lambda x, c: vaekernels.gated_activation(x, c, "linear"), (x, c))
    w = randn(6, 3, 3, 3, device=device, seed=4).requires_grad_()
    xm = randn(1, 3, 4, 5, device=device, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: vaekernels.masked_conv2d(x, w, None, "A", channel_groups=3), (xm, w))
    wo = randn(5, 3, 1, 1, device=device, seed=6).requires_grad_()
    xg = randn(2, 6, 2, 3, device=device, seed=7).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, c, w: gated_conv1x1(x, c, w, None), (xg, c, wo))


@pytest.mark.parametrize("device_backend", NATIVE)
@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_compile_fullgraph(device_backend, compiler):
    device = torch.device(device_backend[0])
    torch._dynamo.reset()
    layer = vaekernels.nn.GatedPixelCNNLayer(3, 4, 3, "A", skip_channels=2, cond_features=2).to(device)
    conv = vaekernels.nn.MaskedConv2d(4, 4, 3, "B").to(device)

    def fn(x, cond):
        v, h, skip = layer(x, x, cond)
        gated = vaekernels.gated_activation(v, None, "linear")
        return conv(h).sum() + v.sum() + skip.sum() + (vaekernels.concat_elu(gated) * gated.repeat(1, 2, 1, 1)).sum()

    x = torch.randn(2, 3, 5, 4, device=device, requires_grad=True)
    cond = torch.randn(2, 2, device=device)
    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    got = compiled(x, cond)
    (grad,) = torch.autograd.grad(got, x)
    expected = fn(x, cond)
    (grad_expected,) = torch.autograd.grad(expected, x)
    assert torch.allclose(got, expected, rtol=1e-5) and torch.allclose(grad, grad_expected, rtol=1e-5, atol=1e-6)


def test_one_input_channel_compiles_with_inductor(device_backend):
    """A weight slice of a one-channel masked kernel has strides that inductor's layout planning
    once read as channels-last while the CPU convolution did not (a failed stride check); VLAE
    met it on its image."""
    device = torch.device(device_backend[0])
    torch._dynamo.reset()
    conv = vaekernels.nn.MaskedConv2d(1, 8, 3, "A").to(device)
    head = torch.nn.Conv2d(8, 1, 1).to(device)

    def fn(x):
        return head(torch.relu(conv(x))).square().sum()

    x = torch.randn(4, 1, 28, 28, device=device)
    got = torch.compile(fn, fullgraph=True)(x)
    grads = torch.autograd.grad(got, [conv.weight, head.weight])
    expected = fn(x)
    expected_grads = torch.autograd.grad(expected, [conv.weight, head.weight])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda: vaekernels.masked_conv2d(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 2, 3)),
            r"masked_conv2d: weight must have an odd kernel size.*got 2x3",
        ),
        (
            lambda: vaekernels.masked_conv2d(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3)),
            r"masked_conv2d: weight must have in_channels = x.shape\[1\] = 2",
        ),
        (
            lambda: vaekernels.masked_conv2d(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), mask_type="C"),
            r"masked_conv2d: mask_type must be one of 'A', 'B', got 'C'",
        ),
        (
            lambda: vaekernels.masked_conv2d(torch.zeros(2, 3, 3), torch.zeros(1, 2, 3, 3)),
            r"masked_conv2d: x must have shape \[B, C, H, W\], got \[2, 3, 3\]",
        ),
        (
            lambda: vaekernels.masked_conv2d(torch.zeros(1, 2, 3, 3), torch.zeros(4, 2, 3, 3), channel_groups=3),
            r"masked_conv2d: channel_groups must divide",
        ),
        (
            lambda: vaekernels.masked_conv2d(torch.zeros(1, 2, 3, 3), torch.zeros(4, 2, 3, 3, dtype=torch.float64)),
            r"masked_conv2d: weight must have the dtype of x",
        ),
        (
            lambda: vaekernels.gated_activation(torch.zeros(2, 3, 4)),
            r"gated_activation: x must have shape \[B, 2C, \*spatial\] with an even channel count, got \[2, 3, 4\]",
        ),
        (
            lambda: vaekernels.gated_activation(torch.zeros(2, 4, 4), torch.zeros(2, 2)),
            r"gated_activation: cond must have shape \[B, 2C\] = \[2, 4\], got \[2, 2\]",
        ),
        (
            lambda: vaekernels.gated_activation(torch.zeros(2, 4, 4), gate="relu"),
            r"gated_activation: gate must be one of 'tanh', 'linear', got 'relu'",
        ),
        (
            lambda: vaekernels.gated_activation(torch.zeros(2, 4, 4, dtype=torch.long)),
            r"gated_activation: x must be a floating-point tensor",
        ),
        (
            lambda: vaekernels.concat_elu(torch.zeros(3)),
            r"concat_elu: x must have shape \[B, C, \*spatial\], got \[3\]",
        ),
        (
            lambda: vaekernels.concat_elu(torch.zeros(2, 0, 3)),
            r"concat_elu: x must have B >= 1 examples and C >= 1 channels, got shape \[2, 0, 3\]",
        ),
        (lambda: vaekernels.concat_elu(torch.zeros(2, 3, dtype=torch.long)), r"concat_elu: x must be a floating-point"),
        (
            lambda: vaekernels.concat_elu(torch.zeros(2, 3, 4, 4), padding=(1, 0, -1, 0)),
            r"concat_elu: padding must be None or \(left, right, top, bottom\), ints >= 0, got \(1, 0, -1, 0\)",
        ),
        (
            lambda: vaekernels.concat_elu(torch.zeros(2, 3, 4, 4), padding=(1, 0)),
            r"concat_elu: padding must be None or \(left, right, top, bottom\)",
        ),
        (
            lambda: vaekernels.concat_elu(torch.zeros(2, 3, 4), padding=(1, 0, 0, 0)),
            r"concat_elu: x must have shape \[B, C, H, W\] with padding, got \[2, 3, 4\]",
        ),
        (lambda: vaekernels.nn.MaskedConv2d(2, 2, 3, stride=2), r"MaskedConv2d: only stride=1"),
        (lambda: vaekernels.nn.MaskedConv2d(2, 2, 4), r"MaskedConv2d: kernel_size must be odd"),
        (lambda: vaekernels.nn.GatedPixelCNNLayer(2, 2, 4), r"GatedPixelCNNLayer: kernel_size must be an odd int >= 3"),
        (
            lambda: vaekernels.nn.GatedPixelCNNLayer(2, 2, 3, cond_features=3)(
                torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)
            ),
            r"GatedPixelCNNLayer: cond must be given exactly when",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_cpu_kernels_reject_bad_input_with_the_op_name():
    op = torch.ops.vaekernels.gated_activation
    with pytest.raises(RuntimeError, match="gated_activation: gate must be 'tanh' or 'linear', got 'relu'"):
        op(torch.zeros(1, 2, 3), None, "relu")
    with pytest.raises(RuntimeError, match="gated_activation: x must have an even number of channels"):
        op(torch.zeros(1, 3, 3), None, "tanh")
    with pytest.raises(RuntimeError, match=r"gated_activation_backward: grad must have shape \[1, 1, 3\]"):
        torch.ops.vaekernels.gated_activation_backward(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), None, "tanh")
    with pytest.raises(RuntimeError, match="concat_elu: x must be a rank-4"):
        torch.ops.vaekernels.concat_elu(torch.zeros(1, 2, 3), [])
    with pytest.raises(RuntimeError, match="concat_elu: padding must be >= 0"):
        torch.ops.vaekernels.concat_elu(torch.zeros(1, 2, 3, 3), [0, -1, 0, 0])
    with pytest.raises(RuntimeError, match=r"concat_elu: padding must be \[\] or \[left, right, top, bottom\]"):
        torch.ops.vaekernels.concat_elu(torch.zeros(1, 2, 3, 3), [1])
    with pytest.raises(RuntimeError, match=r"concat_elu_backward: grad must have shape \[1, 4, 3, 5\]"):
        torch.ops.vaekernels.concat_elu_backward(torch.zeros(1, 4, 3, 3), torch.zeros(1, 2, 3, 3), [1, 1, 0, 0])
