"""Finds the compiled CPU kernels (mmfast._C), building them on first use if need be.

Order: the module built by setup.py; else a JIT build of the same csrc/ sources with
torch.utils.cpp_extension.load (cached under TORCH_EXTENSIONS_DIR, so only the first import pays the
~30 s); else None, and the "cpu" backend reports itself unavailable. Importing mmfast never fails.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import ModuleType

# One list for setup.py and the JIT build, so both compile the kernels alike.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]
LD_FLAGS = ["-fopenmp"]


def source_dir() -> Path:
    """csrc/ beside the package (a source checkout) or inside it (a wheel ships it as mmfast/csrc)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "module.cpp").exists():
            return candidate
    raise FileNotFoundError("mmfast: the C++ sources (csrc/) are not where they should be")


def sources() -> list[str]:
    return sorted(str(p) for p in source_dir().glob("*.cpp"))


_loaded: dict[str, ModuleType | None] = {}


def load_extension() -> ModuleType | None:
    """The CPU kernel module, or None (with one warning) when it can be neither imported nor built."""
    # A plain dict rather than functools.cache: torch.compile traces through this call cleanly.
    if "module" not in _loaded:
        _loaded["module"] = _find_or_build()
    return _loaded["module"]


def _find_or_build() -> ModuleType | None:
    if os.environ.get("MMFAST_DISABLE_CPP") == "1":
        return None
    try:
        from mmfast import _C  # built by setup.py

        return _C
    except ImportError:
        pass
    try:
        from torch.utils.cpp_extension import load

        warnings.warn(
            "mmfast: the compiled CPU kernels (mmfast._C) are missing; building them from csrc/ now "
            "(once, ~30 s; cached under TORCH_EXTENSIONS_DIR).",
            stacklevel=3,
        )
        return load(
            name="mmfast_C",
            sources=sources(),
            extra_cflags=CXX_FLAGS,
            extra_ldflags=LD_FLAGS,
            verbose=os.environ.get("MMFAST_VERBOSE_BUILD") == "1",
        )
    except Exception as error:  # no compiler, no ninja, a failed build: fall back, never fail import
        warnings.warn(
            f"mmfast: could not build the CPU kernels ({type(error).__name__}: {error}); "
            "the pure-PyTorch backend will serve CPU tensors instead.",
            stacklevel=3,
        )
        return None
