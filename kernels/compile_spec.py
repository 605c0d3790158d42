"""One launchable variant of a Triton kernel, as kernels/aot.py compiles it.

Each kernel module of kernels/ (installed as mmfast.kernels) imports only triton, torch, its sibling
modules and mmfast.kernel_contract, and lists the variants it can launch (`compile_specs()`, yielding
CompileSpec) for kernels/aot.py.

kernels/ has no __init__.py on purpose: mmfast.kernels is a namespace package. A folder with an
__init__.py at the checkout's root is an importable top-level package named `kernels` whenever the
root is on sys.path (pytest's rootdir, `python -m` or `python -c` run there), and it would shadow the
`kernels` distribution that transformers imports. A folder without one is only a namespace portion,
which Python's import system ranks below any regular package or module found anywhere on sys.path,
so the installed distribution wins whatever the order of the path.
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
