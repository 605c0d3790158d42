"""mmfast.show_config(): what this install runs, for a user's first check and for bug reports.

python -m mmfast          # the same report
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

import torch

from mmfast._extension import extension_status
from mmfast.backends import resolve_backend, triton_unavailable_reason

# Environment variables that change what mmfast runs; the report lists the ones that are set.
ENVIRONMENT = ("MMFAST_DISABLE_CPP", "MMFAST_SCORE_CHUNK_BYTES", "TRITON_INTERPRET", "TORCH_EXTENSIONS_DIR")


def show_config(file=None) -> None:
    """Prints the mmfast, torch and triton versions, whether the C++ kernels are loaded (and why
    not), and the backend that backend="auto" picks on each device. May build the C++ kernels first
    (once, a minute or two) when the install has no compiled module."""
    rows = _report()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}", file=file)


def _report() -> list[tuple[str, str]]:
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    rows = [
        ("mmfast", f"{_version('mmfast') or 'not installed'} ({os.path.dirname(os.path.abspath(__file__))})"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", f"{torch.__version__} ({cuda}; {gpus} GPU(s) visible; {torch.get_num_threads()} CPU threads)"),
        ("triton", _version("triton") or 'not installed (the triton backend needs it: pip install "mmfast[triton]")'),
        ("C++ kernels", extension_status()),
    ]
    devices = [torch.device("cpu")] + [torch.device("cuda", i) for i in range(gpus)]
    rows += [(f'"auto" on {device}', _auto_choice(device)) for device in devices]
    rows += [(name, os.environ[name]) for name in ENVIRONMENT if name in os.environ]
    return rows


def _version(distribution: str) -> str | None:
    """The installed distribution's version, read from its metadata (importing triton is slow, and
    mmfast/__init__.py imports this module)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _auto_choice(device: torch.device) -> str:
    chosen = resolve_backend("auto", device)
    if device.type == "cpu":
        why = "the C++ kernels" if chosen == "cpu" else "chunked PyTorch: the C++ kernels are not loaded"
        return f"{chosen} ({why})"
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    if chosen == "triton":
        return f"triton ({name}, sm_{major}{minor})"
    why = triton_unavailable_reason(device) or f"sm_{major}{minor} is older than sm_80 (backend='triton' still runs)"
    return f"{chosen} ({name}: {why})"
