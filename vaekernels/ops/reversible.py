"""Reversible networks: a sequence of invertible blocks whose backward rebuilds each block's
input from its output instead of storing it, so the activations kept for backward do not grow
with depth.

The forward runs under ``no_grad`` and keeps only the stack's output. The backward walks the
blocks in reverse. For an additive coupling y1 = x1 + F(x2), y2 = x2 + G(y1) the recomputation
is the reconstruction: G(y1) is recomputed with grad and backpropagated (its gradient to y1 is
added to y1's), then x2 = y2 - G(y1); F(x2) likewise, then x1 = y1 - F(x2). So a block costs
one extra forward of F and G, nothing more, and the rebuild and the gradient sums run in place
in one fused kernel per branch (:func:`coupling_backward_step`: C++ on the CPU, Triton on CUDA),
so the walk allocates no full-size buffer per block.

Dropout and other randomness inside a block see the same random numbers in the recomputation
(the RNG state before each block is kept, as ``torch.utils.checkpoint`` does) and the global
RNG is left where the forward left it; batch-norm running statistics are updated once, in the
forward; the recomputation runs under the forward's autocast state. Each block is an autograd
node whose outputs include its parameter gradients, so ``torch.autograd.grad``, gradient
accumulation and DDP's hooks see them as they would from an ordinary network, block by block as
the walk goes: it holds one block's parameter gradients at a time.

The blocks (``vaekernels.nn.AdditiveCoupling``, ``AffineCoupling``, ``InvertibleDownsample``, or
any module with ``forward`` and ``inverse``) are in :mod:`vaekernels.nn.reversible`; the oracle,
the same blocks run as an ordinary network, is :mod:`vaekernels.reference.reversible`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .. import _backend
from ..reference import reversible as reference
from ._checks import check_float, check_shape, fail
from ._registry import define_triton_op, first_derivatives_only, register

if _backend.triton_available():
    from ..triton import reversible as _triton

    define_triton_op("coupling_backward_step", _triton.coupling_backward_step, mutates_args=("stream", "grad"))


# ----------------------------------------------------------------------------- coupling_backward_step


def _coupling_backward_step_fake(stream, update, grad, grad_update):
    return None


register("coupling_backward_step", _coupling_backward_step_fake)


def coupling_backward_step(
    stream: torch.Tensor, update: torch.Tensor, grad: torch.Tensor, grad_update: torch.Tensor
) -> None:
    """One step of a coupling block's backward walk, in place: ``stream -= update`` and
    ``grad += grad_update`` in one pass.

    All four tensors have one shape; ``stream`` and ``grad`` are overwritten. ``update`` and
    ``grad_update`` may have a narrower dtype (bf16 branches with float32 streams). NaN and ±inf
    follow IEEE arithmetic elementwise (inf - inf is NaN).

    Example:
        >>> import torch, vaekernels
        >>> y2, g1 = torch.tensor([3.0, 5.0]), torch.tensor([1.0, 1.0])
        >>> vaekernels.coupling_backward_step(y2, torch.tensor([1.0, 2.0]), g1, torch.tensor([0.5, 0.5]))
        >>> y2.tolist(), g1.tolist()
        ([2.0, 3.0], [1.5, 1.5])
    """
    fn = "coupling_backward_step"
    check_float(fn, "stream", stream)
    check_float(fn, "grad", grad, stream, "stream")
    for name, t in (("update", update), ("grad_update", grad_update)):
        check_float(fn, name, t)
        if t.device != stream.device:
            fail(fn, f"{name} must be on the device of stream ({stream.device}), got {t.device}")
    for name, t in (("update", update), ("grad", grad), ("grad_update", grad_update)):
        check_shape(fn, name, t, stream.shape, "the shape of stream")
    if not (stream.is_contiguous() and grad.is_contiguous()):
        fail(fn, "stream and grad must be contiguous (they are written in place)")
    backend = _backend.choose(fn, stream.device, stream.dtype)
    # The C++ kernel takes one dtype; a narrower branch output is promoted by PyTorch's in-place ops.
    if backend == "reference" or (backend != "triton" and (update.dtype, grad_update.dtype) != (stream.dtype,) * 2):
        reference.coupling_backward_step(stream, update, grad, grad_update)
        return
    _backend.ops(backend).coupling_backward_step(stream, update.contiguous(), grad, grad_update.contiguous())


# ----------------------------------------------------------------------------- the walk


def _halves(fn: str, x: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x split along dim 1 (the first C // 2 channels, the rest) into two new contiguous tensors
    the walk owns and may overwrite. An odd C is left to the blocks: a space-to-depth block takes
    one, a coupling refuses it."""
    if x.dim() < 2:
        fail(fn, f"{what} must have a channel dim (shape [B, C, ...]), got shape {list(x.shape)}")
    half = x.shape[1] // 2
    return (
        x.narrow(1, 0, half).clone(memory_format=torch.contiguous_format),
        x.narrow(1, half, x.shape[1] - half).clone(memory_format=torch.contiguous_format),
    )


def _frozen_batch_norms(block: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in block.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]


@contextlib.contextmanager
def _running_stats_kept(norms: list[nn.Module]):
    """Restores the batch norms' running statistics after the recomputation, which must use batch
    statistics (training mode) for the right gradients but must not count the batch twice."""
    kept = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in kept:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


class _RngTape:
    """The generator states at the points of one block's forward where a branch begins
    (``mark``), replayed in the recomputation (``replay(k)``), which runs the branches in another
    order (G before F). A CPU state is 5 kB: one that the branch after it left unchanged (no
    dropout, nothing random) is dropped when the next mark or ``close`` sees so, so that a
    network without randomness keeps nothing per block."""

    def __init__(self, enabled: bool, cuda_devices: list[int]):
        self.enabled, self.cuda_devices, self.states = enabled, cuda_devices, []

    def _now(self):
        return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.cuda_devices]

    def _drop_unused(self, now) -> None:
        if self.states and self.states[-1] is not None:
            cpu, cuda = self.states[-1]
            if torch.equal(cpu, now[0]) and all(torch.equal(a, b) for a, b in zip(cuda, now[1])):
                self.states[-1] = None

    def mark(self) -> None:
        if self.enabled:
            now = self._now()
            self._drop_unused(now)
            self.states.append(now)

    def close(self) -> None:
        if self.enabled and self.states:
            self._drop_unused(self._now())

    @contextlib.contextmanager
    def replay(self, k: int):
        if not self.enabled or self.states[k] is None:
            yield
            return
        cpu, cuda = self.states[k]
        # fork_rng puts the global state back afterwards: the stream a normal network leaves.
        with torch.random.fork_rng(devices=self.cuda_devices):
            torch.set_rng_state(cpu)
            for device, state in zip(self.cuda_devices, cuda):
                torch.cuda.set_rng_state(state, device)
            yield


def _autocast_state(device_type: str) -> list[tuple[str, bool, torch.dtype]]:
    types = dict.fromkeys([device_type, "cpu"])
    return [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types]


def _grads(outputs, inputs, grad_outputs):
    """torch.autograd.grad over the outputs that require grad; None for unreached inputs."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad and g is not None]
    if not pairs or not inputs:
        return [None] * len(inputs)
    return list(torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True))


class _Walk:
    """One call's blocks, the parameter tensors each block computed with (where they live in its
    modules), the options, and the two residual streams that the chain of autograd nodes hands
    from block to block: the activations in the forward, the rebuilt inputs and their gradients in
    the backward."""

    def __init__(
        self, fn: str, blocks: Sequence[nn.Module], preserve_rng_state: bool, stream_dtype: torch.dtype | None
    ):
        self.fn = fn
        self.blocks = list(blocks)
        # The tensors in the modules now, not module.parameters() later: under
        # torch.func.functional_call they are swapped in for the call and gone by backward.
        self.slots = [
            [
                (m, name, t)
                for m in block.modules()
                for name, t in m._parameters.items()
                if t is not None and t.requires_grad
            ]
            for block in self.blocks
        ]
        self.block_params = [list(dict.fromkeys(t for _, _, t in slots)) for slots in self.slots]
        self.preserve_rng_state = preserve_rng_state
        self.stream_dtype = stream_dtype
        self.streams = None  # (x1, x2) in the forward; (y1, y2, g1, g2, grad_logdet) in the backward

    @contextlib.contextmanager
    def bound(self, i: int):
        """Block i's modules holding the tensors its forward used, for its recomputation."""
        swapped = []
        for m, name, t in self.slots[i]:
            if m._parameters.get(name) is not t:
                swapped.append((m, name, m._parameters.get(name)))
                m._parameters[name] = t
        try:
            yield
        finally:
            for m, name, t in swapped:
                m._parameters[name] = t


# The walk is a chain of autograd nodes, one per block, linked by empty tensors while the streams
# travel in the _Walk: the engine runs each block's node as soon as the block after it is done and
# accumulates that block's parameter gradients (into .grad, DDP's hooks, or autograd.grad's
# results) before the next one, so the walk holds one block's gradients at a time, not the
# whole network's.


def _first_derivatives_only(gradients, anchors):
    return first_derivatives_only(
        "reversible_sequential",
        gradients,
        anchors,
        "vaekernels.reference.reversible.reversible_sequential (ordinary autograd, which stores the activations) "
        "has higher derivatives.",
    )


class _Enter(torch.autograd.Function):
    """x into the walk's streams."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, walk: _Walk):
        x1, x2 = _halves(walk.fn, x if walk.stream_dtype is None else x.to(walk.stream_dtype), "x")
        walk.streams = (x1, x2, None)
        ctx.walk, ctx.input_dtype = walk, x.dtype
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        _, _, g1, g2, grad_logdet = ctx.walk.streams
        ctx.walk.streams = None
        grad_x = torch.cat([g1, g2], 1).to(ctx.input_dtype) if ctx.needs_input_grad[0] else None
        return _first_derivatives_only(grad_x, (g1, g2, grad_logdet)), None


class _Block(torch.autograd.Function):
    """Block i: its forward on the streams, and in backward its inputs rebuilt and its gradients."""

    @staticmethod
    def forward(ctx, link: torch.Tensor, walk: _Walk, i: int, *params: torch.Tensor):
        x1, x2 = walk.streams[:2]
        cuda_devices = [x1.device.index or 0] if x1.device.type == "cuda" else []
        ctx.tape = _RngTape(walk.preserve_rng_state, cuda_devices)
        block = walk.blocks[i]
        try:
            x1, x2, logdet = _forward_pair(block, x1, x2, ctx.tape, f"{walk.fn}: blocks[{i}]")
        except torch.OutOfMemoryError:
            raise
        except (ValueError, TypeError, RuntimeError) as error:
            # The block's own message (a raw torch error, or one naming the block's class) said
            # which call of the user's went wrong only by its traceback.
            fail(
                walk.fn,
                f"blocks[{i}] ({type(block).__name__}) could not be applied to the halves "
                f"{list(x1.shape)} and {list(x2.shape)} ({x1.dtype}) of its input: {error}",
                type(error) if isinstance(error, (ValueError, TypeError)) else ValueError,
            )
        ctx.tape.close()
        total = walk.streams[2]
        walk.streams = (x1, x2, logdet if total is None else total if logdet is None else total + logdet)
        ctx.walk, ctx.i = walk, i
        ctx.autocast = _autocast_state(x1.device.type)
        return link.new_empty(0)

    @staticmethod
    def backward(ctx, link_grad):
        walk, i = ctx.walk, ctx.i
        y1, y2, g1, g2, grad_logdet = walk.streams
        block, params = walk.blocks[i], walk.block_params[i]
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            for device_type, enabled, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            stack.enter_context(walk.bound(i))
            stack.enter_context(_running_stats_kept(_frozen_batch_norms(block)))
            y1, y2, g1, g2, grads = _reverse_pair(block, y1, y2, g1, g2, grad_logdet, params, ctx.tape)
        walk.streams = (y1, y2, g1, g2, grad_logdet)
        return (link_grad, None, None, *_first_derivatives_only(tuple(grads), (g1, g2, grad_logdet)))


class _Exit(torch.autograd.Function):
    """The streams out as (y, logdet); y is the one activation kept for backward."""

    @staticmethod
    def forward(ctx, link: torch.Tensor, walk: _Walk):
        x1, x2, logdet = walk.streams
        y = torch.cat([x1, x2], 1)
        walk.streams = None
        ctx.walk = walk
        ctx.save_for_backward(y)
        ctx.set_materialize_grads(False)
        return y, (y.new_zeros(y.shape[0]) if logdet is None else logdet)

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        (y,) = ctx.saved_tensors
        fn = ctx.walk.fn
        if grad_y is None:
            grad_y = torch.zeros_like(y)
        # Copies the walk owns and overwrites, so a second backward (retain_graph) starts afresh.
        ctx.walk.streams = (
            *_halves(fn, y, "the output"),
            *_halves(fn, grad_y.to(y.dtype), "the output gradient"),
            grad_logdet,
        )
        return y.new_empty(0), None


def _forward_pair(block: nn.Module, x1: torch.Tensor, x2: torch.Tensor, rng: _RngTape, where: str):
    """The block's forward on the halves, without grad; it may overwrite x1 and x2."""
    with torch.no_grad():
        if hasattr(block, "forward_pair"):
            return block.forward_pair(x1, x2, rng)
        rng.mark()
        out = block(torch.cat([x1, x2], 1))
        out, logdet = out if isinstance(out, tuple) else (out, None)
        y1, y2 = _halves("reversible_sequential", out, f"the output of {where}")
        return y1, y2, logdet


def _reverse_pair(block: nn.Module, y1, y2, g1, g2, grad_logdet, params, rng: _RngTape):
    """The block's input halves rebuilt from its output halves, their gradients, and the
    gradients of ``params``: the block's own ``reverse_pair`` where it has one, else its
    ``inverse`` followed by a recomputation of its forward."""
    if hasattr(block, "reverse_pair"):
        return block.reverse_pair(y1, y2, g1, g2, grad_logdet, params, rng)
    with torch.no_grad():
        x = block.inverse(torch.cat([y1, y2], 1))
    del y1, y2
    leaf = x.detach().requires_grad_()
    with rng.replay(0):
        out = block(leaf)
    out, logdet = out if isinstance(out, tuple) else (out, None)
    grads = _grads([out, logdet], [leaf, *params], [torch.cat([g1, g2], 1), grad_logdet])
    grad_x = grads[0] if grads[0] is not None else torch.zeros_like(x)
    x1, x2 = _halves("reversible_sequential", x, "a rebuilt input")
    gx1, gx2 = _halves("reversible_sequential", grad_x, "a rebuilt gradient")
    return x1, x2, gx1, gx2, grads[1:]


def check_blocks(fn: str, blocks) -> None:
    """Raises a clear error unless ``blocks`` is a non-empty sequence of invertible modules."""
    if len(blocks) == 0:
        fail(fn, "blocks must hold at least one block, got none")
    for i, block in enumerate(blocks):
        if not isinstance(block, nn.Module) or not callable(getattr(block, "inverse", None)):
            fail(
                fn,
                f"blocks[{i}] must be an invertible nn.Module (AdditiveCoupling, AffineCoupling, "
                f"InvertibleDownsample, or a module with forward and inverse), got {type(block).__name__}",
                TypeError,
            )


def reversible_sequential(
    blocks: Sequence[nn.Module],
    x: torch.Tensor,
    *,
    preserve_rng_state: bool = True,
    stream_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Applies invertible ``blocks`` in order, keeping only the output for backward.

    Returns ``(y, logdet)``: the output and the summed log-determinant of the blocks ([B], zeros
    for volume-preserving stacks). ``x`` is [B, C, ...]; the walk splits it into halves along
    dim 1 (a coupling needs C even where it stands). ``preserve_rng_state`` replays each block's random numbers in the
    recomputation (needed with dropout). ``stream_dtype`` keeps the two residual streams in that
    dtype (e.g. float32 while F and G run in bf16 under autocast). NaN and ±inf in x or in a
    block's output propagate as through the blocks themselves; the backward then rebuilds
    non-finite inputs (inf - inf is NaN), so its gradients are NaN where the forward was not finite.

    Example:
        >>> import torch, vaekernels
        >>> from torch import nn
        >>> block = vaekernels.nn.AdditiveCoupling(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> x = torch.randn(3, 4, requires_grad=True)
        >>> y, logdet = vaekernels.reversible_sequential([block, block], x)
        >>> y.sum().backward()
        >>> x.grad.shape, logdet.tolist()
        (torch.Size([3, 4]), [0.0, 0.0, 0.0])
    """
    return _reversible_sequential("reversible_sequential", blocks, x, preserve_rng_state, stream_dtype)


def _reversible_sequential(
    fn: str, blocks, x, preserve_rng_state: bool, stream_dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reversible_sequential`, its errors naming ``fn``, the public caller (the function or a module)."""
    if not isinstance(blocks, Iterable) or isinstance(blocks, str):
        fail(fn, f"blocks must be a sequence of invertible modules, got {type(blocks).__name__}", TypeError)
    blocks = list(blocks)
    check_blocks(fn, blocks)
    check_float(fn, "x", x)
    if x.dim() < 2:
        fail(fn, f"x must have shape [B, C, ...], got {list(x.shape)}")
    walk = _Walk(fn, blocks, preserve_rng_state, stream_dtype)
    link = _Enter.apply(x, walk)
    for i, params in enumerate(walk.block_params):
        link = _Block.apply(link, walk, i, *params)
    return _Exit.apply(link, walk)
