"""Invertible blocks and the reversible stack that backpropagates through them without storing
activations; see :mod:`vaekernels.ops.reversible` for how the backward walk works.

A block used in :class:`ReversibleSequential` has ``forward`` and ``inverse``; the blocks here
also have ``forward_pair(x1, x2, rng)`` (the forward on the two halves of the input, without
grad, in place; ``rng.mark()`` before each branch that may draw random numbers) and
``reverse_pair(y1, y2, g1, g2, grad_logdet, params, rng)`` (one step of the backward walk: the
input halves rebuilt from the output halves and their gradients, in place, and the gradients of
``params``; ``rng.replay(k)`` around the recomputation of the k-th marked branch), so that the
walk costs one extra forward of each branch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import nn

from ..ops._checks import check_float, fail
from ..ops.reversible import _grads, _halves, _reversible_sequential, check_blocks, coupling_backward_step


def _split(cls: str, x: torch.Tensor, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    check_float(f"nn.{cls}", "input", x)
    parameter = next((p for p in block.parameters() if p.is_floating_point()), None)
    # Else the branch's own matmul would say it, naming neither block nor argument (autocast casts for it).
    if parameter is not None and not torch.is_autocast_enabled(x.device.type):
        check_float(f"nn.{cls}", "input", x, parameter, "the block's parameters")
    if x.dim() < 2 or x.shape[1] % 2:
        fail(
            f"nn.{cls}",
            f"input must have shape [B, C, ...] with an even channel count C to split into halves, got {list(x.shape)}",
        )
    return x.chunk(2, 1)


def _check_pair(cls: str, x1: torch.Tensor, x2: torch.Tensor) -> None:
    if x1.shape != x2.shape:
        shape = [x1.shape[0], x1.shape[1] + x2.shape[1], *x1.shape[2:]]
        fail(
            f"nn.{cls}",
            f"input must have shape [B, C, ...] with an even channel count C to split into halves, got {shape}",
        )


def _apply(cls: str, name: str, module: nn.Module, x: torch.Tensor):
    try:
        return module(x)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:  # e.g. a half of another width than the branch takes
        fail(f"nn.{cls}", f"{name} could not be applied to a half of shape {list(x.shape)}: {error}")


def _branch(cls: str, name: str, module: nn.Module, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = _apply(cls, name, module, x)
    if not isinstance(out, torch.Tensor) or out.shape != like.shape:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        fail(
            f"nn.{cls}",
            f"{name} must map a half [B, C/2, ...] to a tensor of the other half's shape {list(like.shape)}, got {got}",
        )
    return out


def _owned(grads: list, *buffers: torch.Tensor) -> list:
    """The gradients, copied where autograd handed back one of the walk's buffers itself (a branch
    like x + w passes its incoming gradient through), since the walk overwrites those."""
    taken = {b.untyped_storage().data_ptr() for b in buffers}
    return [g.clone() if g is not None and g.untyped_storage().data_ptr() in taken else g for g in grads]


def _add(total: list, grads: list) -> list:
    return [b if a is None else a if b is None else a + b for a, b in zip(total, grads)]


class AdditiveCoupling(nn.Module):
    """The additive coupling of RevNet and NICE: y1 = x1 + F(x2), y2 = x2 + G(y1).

    The input is split along dim 1 into halves x1 = x[:, :C/2], x2 = x[:, C/2:]; the output is
    concatenated the same way. ``F`` and ``G`` map a half to a tensor of the same shape and need
    not be invertible; with ``G=None`` the block is the single coupling y1 = x1 + F(x2), y2 = x2.
    The log-determinant is 0.

    Example:
        >>> import torch, vaekernels
        >>> from torch import nn
        >>> block = vaekernels.nn.AdditiveCoupling(nn.Linear(3, 3), nn.Linear(3, 3))
        >>> x = torch.randn(2, 6)
        >>> torch.allclose(block.inverse(block(x)), x, atol=1e-6)
        True
    """

    def __init__(self, F: nn.Module, G: nn.Module | None = None):
        super().__init__()
        for name, module in (("F", F), ("G", G)):
            if module is not None and not callable(module):
                fail(
                    "nn.AdditiveCoupling",
                    f"{name} must be a callable nn.Module, got {type(module).__name__}",
                    TypeError,
                )
        self.F, self.G = F, G

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = _split("AdditiveCoupling", x, self)
        y1 = x1 + _branch("AdditiveCoupling", "F", self.F, x2, x1)
        y2 = x2 if self.G is None else x2 + _branch("AdditiveCoupling", "G", self.G, y1, x2)
        return torch.cat([y1, y2], 1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y1, y2 = _split("AdditiveCoupling", y, self)
        x2 = y2 if self.G is None else y2 - _branch("AdditiveCoupling", "G", self.G, y1, y2)
        x1 = y1 - _branch("AdditiveCoupling", "F", self.F, x2, y1)
        return torch.cat([x1, x2], 1)

    def forward_pair(self, x1: torch.Tensor, x2: torch.Tensor, rng):
        _check_pair("AdditiveCoupling", x1, x2)
        rng.mark()
        x1.add_(_branch("AdditiveCoupling", "F", self.F, x2, x1))
        if self.G is not None:
            rng.mark()
            x2.add_(_branch("AdditiveCoupling", "G", self.G, x1, x2))
        return x1, x2, None

    def reverse_pair(self, y1, y2, g1, g2, grad_logdet, params, rng):
        grads = [None] * len(params)
        if self.G is not None:
            # G(y1) recomputed with grad: its gradient to y1 joins g1 while x2 = y2 - G(y1) is rebuilt.
            leaf = y1.detach().requires_grad_()
            with rng.replay(1):
                update = _branch("AdditiveCoupling", "G", self.G, leaf, y2)
            grad_leaf, *grads = _owned(_grads([update], [leaf, *params], [g2]), g1, g2)
            _step(y2, update.detach(), g1, grad_leaf)
        leaf = y2.detach().requires_grad_()
        with rng.replay(0):
            update = _branch("AdditiveCoupling", "F", self.F, leaf, y1)
        grad_leaf, *branch_grads = _owned(_grads([update], [leaf, *params], [g1]), g1, g2)
        _step(y1, update.detach(), g2, grad_leaf)
        return y1, y2, g1, g2, _add(grads, branch_grads)


def _step(stream, update, grad, grad_update) -> None:
    if grad_update is None:  # the branch does not depend on its input
        stream.sub_(update)
    else:
        coupling_backward_step(stream, update, grad, grad_update)


class AffineCoupling(nn.Module):
    """The affine coupling of Real NVP: y1 = x1, y2 = x2 * exp(s) + t with (s, t) from ``net(x1)``.

    ``net`` maps the first half [B, C/2, ...] to [B, C, ...]: its first C/2 channels, through
    tanh (keeping exp(s) in [1/e, e]), are the log-scale s, the rest the shift t. ``forward``
    returns ``(y, logdet)`` with logdet = sum of s over all but the batch dim, [B].

    Example:
        >>> import torch, vaekernels
        >>> from torch import nn
        >>> block = vaekernels.nn.AffineCoupling(nn.Linear(2, 4))
        >>> x = torch.randn(3, 4)
        >>> y, logdet = block(x)
        >>> torch.allclose(block.inverse(y), x, atol=1e-6), logdet.shape
        (True, torch.Size([3]))
    """

    returns_logdet = True

    def __init__(self, net: nn.Module):
        super().__init__()
        if not callable(net):
            fail("nn.AffineCoupling", f"net must be a callable nn.Module, got {type(net).__name__}", TypeError)
        self.net = net

    def _scale_shift(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = _apply("AffineCoupling", "net", self.net, x1)
        expected = [x1.shape[0], 2 * x1.shape[1], *x1.shape[2:]]
        if not isinstance(out, torch.Tensor) or list(out.shape) != expected:
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            fail("nn.AffineCoupling", f"net must map a half [B, C/2, ...] to [B, C, ...] = {expected}, got {got}")
        s, t = out.chunk(2, 1)
        return torch.tanh(s), t

    @staticmethod
    def _logdet(s: torch.Tensor) -> torch.Tensor:
        return s.flatten(1).sum(1, dtype=torch.promote_types(s.dtype, torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = _split("AffineCoupling", x, self)
        s, t = self._scale_shift(x1)
        return torch.cat([x1, x2 * torch.exp(s) + t], 1), self._logdet(s)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y1, y2 = _split("AffineCoupling", y, self)
        s, t = self._scale_shift(y1)
        return torch.cat([y1, (y2 - t) * torch.exp(-s)], 1)

    def forward_pair(self, x1: torch.Tensor, x2: torch.Tensor, rng):
        _check_pair("AffineCoupling", x1, x2)
        rng.mark()
        s, t = self._scale_shift(x1)
        x2.mul_(torch.exp(s)).add_(t)
        return x1, x2, self._logdet(s)

    def reverse_pair(self, y1, y2, g1, g2, grad_logdet, params, rng):
        leaf1 = y1.detach().requires_grad_()
        with rng.replay(0):
            s, t = self._scale_shift(leaf1)
        with torch.no_grad():
            y2.sub_(t).mul_(torch.exp(-s))
        leaf2 = y2.detach().requires_grad_()
        out = leaf2 * torch.exp(s) + t
        grad1, grad2, *grads = _owned(
            _grads([out, self._logdet(s)], [leaf1, leaf2, *params], [g2, grad_logdet]), g1, g2
        )
        g1.add_(grad1)
        g2.copy_(grad2)
        return y1, y2, g1, g2, grads


class InvertibleDownsample(nn.Module):
    """i-RevNet's space-to-depth: [B, C, H, W] -> [B, C r^2, H/r, W/r] for ``block_size`` r; its
    inverse (depth-to-space) is exact, bit for bit. A permutation: log-determinant 0.

    Example:
        >>> import torch, vaekernels
        >>> down = vaekernels.nn.InvertibleDownsample(2)
        >>> x = torch.randn(1, 3, 4, 6)
        >>> down(x).shape, torch.equal(down.inverse(down(x)), x)
        (torch.Size([1, 12, 2, 3]), True)
    """

    def __init__(self, block_size: int = 2):
        super().__init__()
        if not isinstance(block_size, int) or block_size < 1:
            fail("nn.InvertibleDownsample", f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.block_size
        check_float("nn.InvertibleDownsample", "input", x)
        if x.dim() != 4 or x.shape[2] % r or x.shape[3] % r:
            fail(
                "nn.InvertibleDownsample",
                f"input must have shape [B, C, H, W] with H and W divisible by block_size = {r}, got {list(x.shape)}",
            )
        return nnf.pixel_unshuffle(x, r)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        r = self.block_size
        check_float("nn.InvertibleDownsample", "inverse input", y)
        if y.dim() != 4 or y.shape[1] % (r * r):
            fail(
                "nn.InvertibleDownsample",
                f"inverse input must have shape [B, C, H, W] with C divisible by "
                f"block_size^2 = {r * r}, got {list(y.shape)}",
            )
        return nnf.pixel_shuffle(y, r)

    def forward_pair(self, x1: torch.Tensor, x2: torch.Tensor, rng):
        return (*_halves("nn.InvertibleDownsample", self(torch.cat([x1, x2], 1)), "the output"), None)

    def reverse_pair(self, y1, y2, g1, g2, grad_logdet, params, rng):
        # A permutation: its input and its gradient are the inverse permutation of the output and
        # of the output's gradient, with nothing to recompute.
        x1, x2 = _halves("nn.InvertibleDownsample", self.inverse(torch.cat([y1, y2], 1)), "the input")
        gx1, gx2 = _halves("nn.InvertibleDownsample", self.inverse(torch.cat([g1, g2], 1)), "the input gradient")
        return x1, x2, gx1, gx2, [None] * len(params)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}"


class ReversibleSequential(nn.Module):
    """Invertible blocks applied in order, backpropagated without stored activations: the
    forward keeps only the output; the backward rebuilds each block's input from its output.
    See :func:`vaekernels.reversible_sequential`.

    ``forward`` returns ``y``, or ``(y, logdet)`` when a block has a log-determinant
    (:class:`AffineCoupling`). Blocks must be invertible (have ``inverse``); a coupling needs an
    even channel count where it stands.

    Example:
        >>> import torch, vaekernels
        >>> from torch import nn
        >>> def block():
        ...     return vaekernels.nn.AdditiveCoupling(nn.Linear(4, 4), nn.Linear(4, 4))
        >>> net = vaekernels.nn.ReversibleSequential(*[block() for _ in range(8)])
        >>> x = torch.randn(5, 8, requires_grad=True)
        >>> net(x).square().sum().backward()
        >>> torch.allclose(net.inverse(net(x)), x, atol=1e-5)
        True
    """

    def __init__(self, *blocks: nn.Module, preserve_rng_state: bool = True, stream_dtype: torch.dtype | None = None):
        super().__init__()
        if len(blocks) == 1 and isinstance(blocks[0], (list, tuple, nn.ModuleList)):
            blocks = tuple(blocks[0])
        check_blocks("nn.ReversibleSequential", blocks)
        self.blocks = nn.ModuleList(blocks)
        self.preserve_rng_state, self.stream_dtype = preserve_rng_state, stream_dtype
        self.returns_logdet = any(getattr(b, "returns_logdet", False) for b in blocks)

    def forward(self, x: torch.Tensor):
        y, logdet = _reversible_sequential(
            "nn.ReversibleSequential", self.blocks, x, self.preserve_rng_state, self.stream_dtype
        )
        return (y, logdet) if self.returns_logdet else y

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for block in reversed(self.blocks):
            y = block.inverse(y)
        return y
