"""Argument checks shared by the ops' option dataclasses."""

from __future__ import annotations

import math

REDUCTIONS = ("mean", "sum", "none")


def check_real(name: str, value: object, *, positive: bool = False) -> float:
    """A finite real number (positive if asked); bools and tensors are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be {'a positive' if positive else 'a'} finite number, got {value!r}")
    return float(value)


def check_reduction(reduction: object) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
