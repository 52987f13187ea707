"""Argument checks shared by every op family: each error names the public function, the argument,
what was expected and what came."""

from __future__ import annotations

import math
import numbers

import torch


def fail(fn: str, message: str, error: type = ValueError):
    raise error(f"vaekernels.{fn}: {message}")


def check_float(fn: str, arg: str, t, like: torch.Tensor | None = None, like_name: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        fail(fn, f"{arg} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if not t.is_floating_point():
        fail(fn, f"{arg} must be a floating-point tensor, got dtype {t.dtype}", TypeError)
    if like is not None:
        if t.dtype != like.dtype:
            fail(fn, f"{arg} must have the dtype of {like_name} ({like.dtype}), got {t.dtype}", TypeError)
        if t.device != like.device:
            fail(fn, f"{arg} must be on the device of {like_name} ({like.device}), got {t.device}")


def check_shape(fn: str, arg: str, t: torch.Tensor, expected: tuple, description: str) -> None:
    if tuple(t.shape) != tuple(expected):
        fail(fn, f"{arg} must have shape {description} = {list(expected)}, got {list(t.shape)}")


def check_choice(fn: str, arg: str, value, choices: tuple) -> None:
    if value not in choices:
        fail(fn, f"{arg} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_int(fn: str, arg: str, value, minimum: int = 1) -> None:
    """``value`` must be an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(fn, f"{arg} must be an int >= {minimum}, got {type(value).__name__} {value!r}", TypeError)
    if value < minimum:
        fail(fn, f"{arg} must be an int >= {minimum}, got {value}")


def check_real(fn: str, arg: str, value) -> float:
    """``value`` must be a finite real number (not a bool, not a tensor); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(fn, f"{arg} must be a real number, got {type(value).__name__} {value!r}", TypeError)
    if not math.isfinite(value):
        fail(fn, f"{arg} must be finite, got {value}")
    return float(value)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether x [B, C, H, W] is laid out channels last (and not also channels first, as where
    C = 1 or H = W = 1): then each pixel's channels are one contiguous row of x.permute(0, 2, 3, 1)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
