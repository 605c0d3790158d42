"""Backend selection, shared by every mmfast op.

Backends:
  "triton"    Triton kernels: CUDA tensors, or CPU tensors under the Triton interpreter
              (TRITON_INTERPRET=1 set before triton is imported; used by the tests).
  "cpu"       C++ kernels (csrc/), CPU tensors.
  "torch"     chunked pure-PyTorch code with hand-written backward; any device.
  "reference" the naive version that materialises everything (tests and benchmarks).
  "auto"      triton for CUDA tensors, cpu for CPU tensors, torch otherwise or when the preferred
              backend is unavailable.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

from mmfast._extension import load_extension

BACKENDS = ("auto", "triton", "cpu", "torch", "reference")


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def autocast_disabled(device: torch.device):
    """The kernels choose their own precisions (float32 accumulation): a surrounding autocast must not
    recast the torch ops inside them."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def triton_prefers_cuda(device: torch.device) -> bool:
    """ "auto" sends CUDA tensors to Triton on sm_80+ only: older GPUs lack the bf16 tensor cores the
    kernels are compiled for (they can still ask for backend="triton" with fp32/fp16)."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def triton_unavailable_reason(device: torch.device) -> str | None:
    if not triton_importable():
        return "triton is not installed (pip install triton; Linux only)"
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled()):
        return None
    if device.type == "cpu":
        return "it needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported to run on the CPU"
    return f"it does not run on {device.type} tensors"


def cpu_unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"it needs CPU tensors, got {device.type}"
    if load_extension() is None:
        return "the C++ kernels could not be built or loaded (see the earlier warning)"
    return None


@functools.cache
def kernel_set(backend: str, torch_kernels: type, cpu_kernels: type, triton_kernels: str):
    """An op's kernel object for a resolved backend: `torch_kernels()`, `cpu_kernels(extension)`, or
    the class named by `triton_kernels` ("module.Class", imported only when asked, as it needs triton)."""
    if backend == "cpu":
        return cpu_kernels(load_extension())
    if backend == "triton":
        module, name = triton_kernels.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)()
    return torch_kernels()


def resolve_backend(backend: object, device: torch.device) -> str:
    """The concrete backend for `backend` on `device`; ValueError names what is wrong."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if device.type == "meta" and backend in ("auto", "torch", "reference"):
        raise ValueError(
            "meta tensors hold no data: mmfast ops compute on CPU or CUDA tensors (torch.compile traces them "
            "with fake tensors)"
        )
    if backend == "auto":
        if device.type == "cuda" and triton_unavailable_reason(device) is None and triton_prefers_cuda(device):
            return "triton"
        if device.type == "cpu" and cpu_unavailable_reason(device) is None:
            return "cpu"
        return "torch"
    reason = {"triton": triton_unavailable_reason, "cpu": cpu_unavailable_reason}.get(backend)
    if reason is not None and (why := reason(device)) is not None:
        raise ValueError(f"backend={backend!r} is unavailable: {why}")
    return backend
