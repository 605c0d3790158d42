"""Finds the compiled CPU kernels (mmfast._C), building them on first use if need be.

Order: the module built by setup.py; else a JIT build of the same csrc/ sources with
torch.utils.cpp_extension.load (cached under TORCH_EXTENSIONS_DIR, so only the first use pays the
minute or two, and only it warns); else None, and the "cpu" backend reports itself unavailable. Importing
mmfast never fails.
`extension_status()` says which of these happened, and why.

Imported by setup.py as a plain module (torch may be absent at build time): torch is imported only
inside the functions.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

# One list for setup.py and the JIT build, so both compile the kernels alike. -g0 overrides the -g
# that Python's own CFLAGS put first in setup.py builds, and -s strips the rest: without them the
# module is 25 MB, 14.5 MB of it debug information.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-g0"]
LD_FLAGS = ["-fopenmp", "-s"]

_HERE = Path(__file__).resolve().parent
# A wheel ships the sources inside the package (mmfast/csrc/, see pyproject.toml); a source checkout
# or an editable install has them beside it, at the top level.
SOURCE_DIRS = (_HERE / "csrc", _HERE.parent / "csrc")


def source_dir() -> Path:
    for candidate in SOURCE_DIRS:
        if (candidate / "module.cpp").exists():
            return candidate
    raise FileNotFoundError(
        "mmfast: the C++ sources are missing (looked in " + " and ".join(map(str, SOURCE_DIRS)) + "); "
        "every mmfast wheel and checkout has them, so this install is incomplete: reinstall mmfast"
    )


def sources() -> list[str]:
    return sorted(str(p) for p in source_dir().glob("*.cpp"))


_loaded: dict[str, object] = {}


def load_extension() -> ModuleType | None:
    """The CPU kernel module, or None (with one warning) when it can be neither imported nor built."""
    # A plain dict rather than functools.cache: torch.compile traces through this call cleanly.
    if "module" not in _loaded:
        _loaded["module"], _loaded["status"] = _find_or_build()
    return _loaded["module"]


def extension_status() -> str:
    """Where the loaded C++ kernels come from, or why there are none (loads or builds them first)."""
    load_extension()
    return _loaded["status"]


def _find_or_build() -> tuple[ModuleType | None, str]:
    if os.environ.get("MMFAST_DISABLE_CPP") == "1":
        return None, "not loaded: disabled by MMFAST_DISABLE_CPP=1"
    try:
        import mmfast._C as compiled  # built by setup.py; a missing one raises ModuleNotFoundError

        return compiled, f"loaded: mmfast._C, built at install ({compiled.__file__})"
    except ImportError as error:  # not built, or built against another torch (undefined symbols)
        not_built = isinstance(error, ModuleNotFoundError) and error.name == "mmfast._C"
        missing = "is missing (not built at install)" if not_built else f"could not be loaded ({error})"
    try:
        directory, build_directory = source_dir(), _build_directory()
        if _needs_compiling(directory, build_directory):
            warnings.warn(
                f"mmfast: mmfast._C (the compiled CPU kernels) {missing}; building it from csrc/ now "
                f"({directory}; once, a minute or two; cached in {build_directory}).",
                stacklevel=3,
            )
        module = _jit_build(build_directory)
        return module, f"loaded: built on first use from {directory} ({module.__file__})"
    except Exception as error:  # no compiler, no ninja, a failed build: fall back, never fail import
        warnings.warn(
            f"mmfast: could not build the CPU kernels ({type(error).__name__}: {error}); "
            "the pure-PyTorch backend will serve CPU tensors instead.",
            stacklevel=3,
        )
        return None, f"not loaded: mmfast._C {missing}; the first-use build failed ({type(error).__name__}: {error})"


def _build_directory() -> Path:
    """Under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), one per torch and Python
    version, so that a module built against another torch is never loaded."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / f"mmfast_C-torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"


def _needs_compiling(directory: Path, build_directory: Path) -> bool:
    """Whether the first-use build will compile (and so deserves a warning) rather than load its cache."""
    built = build_directory / "mmfast_C.so"
    if not built.exists():
        return True
    return any(p.stat().st_mtime > built.stat().st_mtime for p in directory.iterdir() if p.suffix in (".cpp", ".h"))


def _jit_build(build_directory: Path) -> ModuleType:
    from torch.utils.cpp_extension import load

    _put_ninja_on_path()
    build_directory.mkdir(parents=True, exist_ok=True)
    return load(
        name="mmfast_C",
        sources=sources(),
        extra_cflags=CXX_FLAGS,
        extra_ldflags=LD_FLAGS,
        build_directory=str(build_directory),
        verbose=os.environ.get("MMFAST_VERBOSE_BUILD") == "1",
    )


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the ninja wheel (a dependency) installs it in the environment's
    bin/, which is not on PATH when a venv's python runs without the venv being activated."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return  # torch then says "Ninja is required", which the caller reports
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
