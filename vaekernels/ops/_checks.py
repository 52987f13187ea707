"""Argument checks shared by every op family: each error names the public function, the argument,
what was expected and what came."""

from __future__ import annotations

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
