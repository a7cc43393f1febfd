"""Argument checks shared by the public functions and modules of both families.

``bool`` is an ``int`` subclass, but ``True`` as a count, length, scale or probability is
always a mistake: :func:`is_int` and :func:`is_real` reject it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch


def is_int(value) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (int or float), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_int(name: str, value) -> int:
    """``value`` if it is an int >= 1, else ``ValueError`` naming ``name``."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def probability(name: str, value) -> float:
    """``value`` as a float in ``[0, 1)`` (a dropout rate), else ``ValueError``."""
    if not is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


def real(name: str, value: Any, positive: bool = False) -> float:
    """``value`` if a finite real (``> 0`` with ``positive``): ``TypeError`` for a non-number
    (bool included), ``ValueError`` for a bad value, naming ``name``."""
    if not is_real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or (positive and not value > 0):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {value!r}")
    return value


def finite_real(name: str, value) -> float:
    """``value`` as a finite float, else ``TypeError`` naming ``name``."""
    if not is_real(value) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite float, got {value!r}")
    return float(value)


def shape_in(t: torch.Tensor, *shapes) -> bool:
    """Whether ``t``'s shape is one of ``shapes``, compared size by size: under
    ``torch.compile`` with a dynamic size, a tuple's ``in`` compares symbolic sizes by
    identity and refuses a shape that matches."""
    for shape in shapes:
        if t.dim() == len(shape) and all(a == b for a, b in zip(t.shape, shape)):
            return True
    return False


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_tensor(name: str, t, dtypes, ndim=None) -> None:
    """``t`` is a tensor of one of ``dtypes`` (and ``ndim``-D when given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_device(name: str, t: torch.Tensor, like: torch.Tensor, like_name: str = "q") -> None:
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}: "
                         "they must be on one device")


def check_activations(x, d_model: int) -> None:
    """``x`` is a floating ``[B, S, d_model]`` tensor (a layer's input)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"x must be [B, S, d_model={d_model}], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
