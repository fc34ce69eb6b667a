"""Validation of the inputs of :mod:`lmms_lostattn.statistics.metrics`: each bad value raises ``ValueError`` naming
the argument, the value and what is accepted."""

from __future__ import annotations

import math
import numbers
import operator

import torch

AGGS = ("last", "mean")


class NonFiniteError(ValueError):
    """An input holds NaN or inf: the statistics are undefined, and no number is returned."""


def prepare(name: str, x: torch.Tensor) -> torch.Tensor:
    """Validate one (S, H) input and return it detached, in float32 or float64."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (S, H); got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (S tokens, H hidden units); got shape {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column; got shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be a real floating or integer tensor; got dtype {x.dtype}")
    x = x.detach()
    if x.dtype != torch.float64:
        x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(f"{name} must contain only finite values; got {bad} NaN/inf entries")
    return x


def prepare_pair(x: torch.Tensor, x_new: torch.Tensor, new_name: str = "x_new") -> tuple[torch.Tensor, torch.Tensor]:
    """Validate X and X' (or X and dX) together: same shape, common dtype (float64 if either is)."""
    x = prepare("x", x)
    x_new = prepare(new_name, x_new)
    if x.shape != x_new.shape:
        raise ValueError(f"{new_name} must have the same shape as x {tuple(x.shape)}; got {tuple(x_new.shape)}")
    dtype = torch.promote_types(x.dtype, x_new.dtype)
    return x.to(dtype), x_new.to(device=x.device, dtype=dtype)


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0; got {alpha!r}")
    return float(alpha)


def check_agg(agg: str) -> str:
    if agg not in AGGS:
        raise ValueError(f"agg must be one of {AGGS}; got {agg!r}")
    return agg


def check_rtol(rtol: float | None) -> float | None:
    if rtol is None:
        return None
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not math.isfinite(rtol) or rtol < 0:
        raise ValueError(f"rtol must be None (default max(S, H) * eps_float32) or a finite number >= 0; got {rtol!r}")
    return float(rtol)


def check_int(name: str, value: int, minimum: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}") from None
    if out < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return out
