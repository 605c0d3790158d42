"""Pooling kernels per backend: torch ops here, C++ in csrc/pooling.cpp, Triton in kernels/pooling.py.

Every backend fills the same outputs, allocated by mmfast.kernel_contract.pooling_forward_outputs
(so tests can NaN-poison them):
  forward:  out [B, D] (input dtype), unit [B, D] (the float32 result: normalised, or the pooled
            vector), norm [B] (‖pooled‖), index [B] int64 (last mode), count [B] (mean mode)
  backward: the dense gradient [B, T, D], written in one pass (zeros included).
"""

from __future__ import annotations

import functools

import torch

from mmfast._extension import load_extension
from mmfast.kernel_contract import POOLING_EPS, POOLING_MODE_CODES, pooling_forward_outputs


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """[B] position of each row's last nonzero mask entry: the first nonzero one of the row read
    backwards (argmax returns the first maximum). Written apart from the reference's formula
    (mmfast/reference/pooling.py), so a fault in either shows in the tests."""
    tokens = mask.shape[1]
    return (tokens - 1) - (mask.flip(1) != 0).to(torch.int32).argmax(dim=1)


def normalize_backward(grad: torch.Tensor, unit: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """d/dp of p / max(‖p‖, eps): (dy - y·(y·dy)) / ‖p‖, or dy / eps where the norm is clamped."""
    projected = grad - unit * (unit * grad).sum(dim=1, keepdim=True)
    clamped = norm <= POOLING_EPS
    return torch.where(clamped[:, None], grad / POOLING_EPS, projected / norm.clamp_min(POOLING_EPS)[:, None])


class TorchPoolingKernels:
    # Bounds the float32 copy of hidden_states that a mean over bf16/fp16 input needs.
    mean_chunk_elements = 1 << 24

    def forward(self, hidden, mask, mode, normalize):
        out, unit, norm, index, count = pooling_forward_outputs(hidden, mode)
        acc = unit.dtype
        if mode == "last":
            index.copy_(last_token_index(mask))
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index].to(acc)
        else:
            weights = mask.to(acc)
            count.copy_(weights.sum(dim=1))
            pooled = torch.zeros(hidden.shape[0], hidden.shape[2], dtype=acc, device=hidden.device)
            step = max(1, self.mean_chunk_elements // max(1, hidden.shape[0] * hidden.shape[2]))
            for t in range(0, hidden.shape[1], step):
                chunk = hidden[:, t : t + step].to(acc)
                pooled += torch.bmm(weights[:, None, t : t + step], chunk)[:, 0]
            pooled /= count[:, None]
        torch.linalg.vector_norm(pooled, dim=1, out=norm)
        unit.copy_(pooled / norm.clamp_min(POOLING_EPS)[:, None] if normalize else pooled)
        out.copy_(unit)
        return out, unit, norm, index, count

    def backward(self, grad_out, unit, norm, index, count, mask, mode, normalize, shape, dtype):
        grad = grad_out.to(unit.dtype)
        grad_pooled = normalize_backward(grad, unit, norm) if normalize else grad
        grad_hidden = torch.empty(shape, dtype=dtype, device=grad_out.device)
        if mode == "last":
            grad_hidden.zero_()
            grad_hidden[torch.arange(shape[0], device=grad_out.device), index] = grad_pooled.to(dtype)
        else:
            torch.mul((mask.to(unit.dtype) / count[:, None])[:, :, None], grad_pooled[:, None, :], out=grad_hidden)
        return grad_hidden


class CpuPoolingKernels:
    """csrc/pooling.cpp: one parallel pass over the needed rows, forward and backward."""

    def __init__(self, extension):
        self.ext = extension

    def forward(self, hidden, mask, mode, normalize):
        outputs = pooling_forward_outputs(hidden, mode)
        self.ext.pooling_forward(hidden, mask, POOLING_MODE_CODES[mode], normalize, *outputs)
        return outputs

    def backward(self, grad_out, unit, norm, index, count, mask, mode, normalize, shape, dtype):
        grad_hidden = torch.empty(shape, dtype=dtype, device=grad_out.device)
        self.ext.pooling_backward(grad_out.contiguous(), unit, norm, index, count, mask, POOLING_MODE_CODES[mode],
                                  normalize, grad_hidden)  # fmt: skip
        return grad_hidden


@functools.cache
def pooling_kernels(backend: str):
    """The kernel set of a resolved backend (one instance per backend)."""
    if backend == "cpu":
        return CpuPoolingKernels(load_extension())
    if backend == "triton":
        from mmfast.kernels.pooling import TritonPoolingKernels  # needs triton: imported when asked

        return TritonPoolingKernels()
    return TorchPoolingKernels()
