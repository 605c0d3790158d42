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
    # The targets (compute capability × 10) the variant launches on, hence is compiled for.
    archs: tuple[int, ...] = (80, 90)
    # Arguments Triton's JIT would see as multiples of 16 (tt.divisibility): an aligned launch.
    divisible_by_16: tuple[str, ...] = ()
