"""What the chunk loops (mmfast/backends) and the Triton kernels (kernels/, mmfast.kernels) agree on:
the small types handed to a kernel set, the outputs it fills, the constants and dtype rules.

This is the ground floor: it imports only torch and the standard library, so both layers can stand
on it without standing on each other (tests/test_layering.py checks that).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype mmfast computes, accumulates and returns losses in for inputs of `dtype`: float64
    stays float64, everything else (float32, bfloat16, float16) is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1 (read by triton when it is imported): @triton.jit runs on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# contrastive_loss


@dataclass(frozen=True)
class DirectionOptions:
    """The per-direction parameters of the contrastive row kernels, built once per call from
    mmfast.ContrastiveLossOptions (see mmfast/backends/contrastive_loss.py)."""

    inv_temperature: float
    hardness: float
    false_negative_margin: float | None
    topk: int | None

    @classmethod
    def of(cls, temperature: float, hardness: float, false_negative_margin: float | None, topk: int | None):
        return cls(1.0 / temperature, hardness, false_negative_margin, topk)


# pooling

POOLING_EPS = 1e-12  # F.normalize's: y = p / max(‖p‖, eps)
POOLING_MODE_CODES = {"last": 0, "mean": 1}  # the `mode` integer of the C++ and Triton kernels


def pooling_forward_outputs(hidden: torch.Tensor, mode: str):
    """The tensors every pooling backend's forward fills (allocated here, so tests can NaN-poison
    them): out [B, D] (input dtype), unit [B, D] (the compute-dtype result: normalised, or the
    pooled vector), norm [B] (‖pooled‖), index [B] int64 (last mode), count [B] (mean mode)."""
    b, _, d = hidden.shape
    acc = compute_dtype(hidden.dtype)
    new = functools.partial(torch.empty, device=hidden.device)
    index = new(b if mode == "last" else 0, dtype=torch.int64)
    count = new(b if mode == "mean" else 0, dtype=acc)
    return new(b, d, dtype=hidden.dtype), new(b, d, dtype=acc), new(b, dtype=acc), index, count
