"""Argument checks shared by the ops' option dataclasses."""

from __future__ import annotations

import math
import numbers
import operator

import torch

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "cpu", "torch", "reference")  # what each is: mmfast/backends/__init__.py
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_real(name: str, value: object, *, positive: bool = False) -> object:
    """A finite real number (positive if asked); bools and tensors are refused, numpy scalars taken.
    A symbolic value (torch.compile(dynamic=True) traces floats as SymFloat) cannot be checked."""
    if isinstance(value, (torch.SymFloat, torch.SymInt)):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    # Comparisons rather than math.isfinite: torch.compile(dynamic=True) traces them on symbolic floats.
    if not (-math.inf < value < math.inf) or (positive and value <= 0):
        raise ValueError(f"{name} must be {'a positive' if positive else 'a'} finite number, got {value!r}")
    return value


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or None, got bool")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}") from None
    if number < 1:
        raise ValueError(f"{name} must be >= 1, got {number}")
    return number


def check_float_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def check_backend_name(backend: object) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")


def check_reduction(reduction: object) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_ids(name: str, ids: object, length: int, what: str, device: torch.device) -> torch.Tensor:
    """A [length] integer tensor on `device` (`what` says what its entries identify)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer ids or None, got {type(ids).__name__}")
    if ids.dtype not in INTEGER_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64, int32, ...), got {ids.dtype}")
    if ids.shape != (length,):
        raise ValueError(f"{name} must have shape [{length}] (one id per {what}), got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but query is on {device}")
    return ids


def check_temperature(name: str, value: object, device: torch.device | None) -> object:
    """A temperature: a positive finite number, or a 0-d floating tensor on `device` (a learnable τ,
    with or without grad; `device` None: not checked yet). A tensor's value is checked only on the
    CPU and outside torch.compile, where reading it costs no device sync (the CPU kernels check it
    under torch.compile); on a GPU a τ <= 0 is the caller's to prevent (clamp it)."""
    if not isinstance(value, torch.Tensor):
        return check_real(name, value, positive=True)
    if value.dim() != 0:
        raise ValueError(f"{name} must be a number or a 0-d tensor, got a tensor of shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but the embeddings are on {device}")
    if value.device.type == "cpu" and not torch.compiler.is_compiling():
        check_temperature_value(name, value)
    return value


def check_temperature_value(name: str, value: torch.Tensor) -> None:
    """A CPU tensor temperature's value (reading it is free there)."""
    number = float(value.detach())
    if not (0 < number < math.inf):
        raise ValueError(f"{name} must be a positive finite number, got tensor({number!r})")
