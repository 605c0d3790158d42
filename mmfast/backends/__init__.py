"""Backend selection, shared by every mmfast op (the names themselves are mmfast.validation.BACKENDS).

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

import torch

from mmfast._extension import load_extension
from mmfast.kernel_contract import triton_interpreter_enabled
from mmfast.validation import check_backend_name


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


def resolve_backend(backend: object, device: torch.device) -> str:
    """The concrete backend for `backend` on `device`; ValueError names what is wrong."""
    check_backend_name(backend)
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
