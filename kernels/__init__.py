"""Triton kernels of mmfast (installed as mmfast.kernels). Importing this package needs triton.

Each kernel module imports only triton, torch, its sibling modules and mmfast.kernel_contract, and
lists the variants it can launch (`compile_specs()`, yielding CompileSpec) for kernels/aot.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CompileSpec:
    """One launchable variant of a @triton.jit kernel, as kernels/aot.py compiles it."""

    name: str
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    # Arguments the launches pass as multiples of 16 (pointers: 16-byte aligned), which Triton
    # specialises on (wider vector loads): compiled with that divisibility, as they launch.
    divisible_by_16: tuple[str, ...] = ()
