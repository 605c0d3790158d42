"""mmfast.last_token_pool / mean_pool / Pooler: the embedding of an MLLM embedder, fused.

Last-token pooling takes, in each row, the hidden state at the last position whose mask is 1, so it
is right for left padding, right padding, no padding and any mix; mean pooling takes the
mask-weighted mean. Both optionally L2-normalise (as F.normalize, eps = 1e-12). One kernel reads
each needed hidden row once, accumulates in float32 and writes the output in the input dtype; the
backward writes the dense gradient of hidden_states and allocates nothing else of that size.

Layers: last_token_pool() / mean_pool() / Pooler -> PoolingFunction -> the backend's kernels
(csrc/pooling.cpp, kernels/pooling.py, or torch ops in mmfast/backends/pooling.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmfast.backends import autocast_disabled, resolve_backend
from mmfast.backends.pooling import pooling_kernels
from mmfast.fused_gradients import once_differentiable
from mmfast.kernel_contract import pooling_forward_outputs
from mmfast.reference.pooling import pool_reference
from mmfast.validation import check_backend_name, check_float_dtype

MODES = ("last", "mean")


@dataclass(frozen=True)
class PoolingOptions:
    mode: str = "last"
    normalize: bool = True
    backend: str = "auto"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(self.normalize).__name__}")
        check_backend_name(self.backend)


def _check_inputs(hidden_states, attention_mask) -> None:
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be 3-D [B, T, D], got shape {tuple(hidden_states.shape)}")
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be 2-D [B, T], got shape {tuple(attention_mask.shape)}")
    if attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"attention_mask must have shape [B, T] = {list(hidden_states.shape[:2])} to match hidden_states, "
            f"got {list(attention_mask.shape)}"
        )
    check_float_dtype("hidden_states", hidden_states)
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(
            f"attention_mask must be bool or an integer dtype (1 = a real token), got {attention_mask.dtype}"
        )
    if attention_mask.device != hidden_states.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but hidden_states is on {hidden_states.device}")
    if hidden_states.shape[0] == 0 or hidden_states.shape[2] == 0:
        raise ValueError(f"hidden_states needs B >= 1 and D >= 1, got shape {tuple(hidden_states.shape)}")
    if torch.compiler.is_compiling():
        return  # the empty-row check below reads data (a host sync); compiled code skips it
    empty = ~(attention_mask != 0).any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten()[:8].tolist()
        raise ValueError(f"attention_mask has rows with no real token (all zeros): rows {rows}; nothing to pool")


@torch.library.custom_op("mmfast::pool_forward", mutates_args=())
def _pool_forward_op(
    hidden_states: torch.Tensor, mask: torch.Tensor, mode: str, normalize: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with autocast_disabled(hidden_states.device):
        return pooling_kernels(backend).forward(hidden_states, mask, mode, normalize)


@_pool_forward_op.register_fake
def _(hidden_states, mask, mode, normalize, backend):
    return pooling_forward_outputs(hidden_states, mode)


@torch.library.custom_op("mmfast::pool_backward", mutates_args=())
def _pool_backward_op(
    grad_output: torch.Tensor,
    unit: torch.Tensor,
    norm: torch.Tensor,
    index: torch.Tensor,
    count: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    normalize: bool,
    backend: str,
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    with autocast_disabled(grad_output.device):
        return pooling_kernels(backend).backward(grad_output, unit, norm, index, count, mask, mode, normalize,
                                                 tuple(shape), dtype)  # fmt: skip


@_pool_backward_op.register_fake
def _(grad_output, unit, norm, index, count, mask, mode, normalize, backend, shape, dtype):
    return grad_output.new_empty(shape, dtype=dtype)


class PoolingFunction(torch.autograd.Function):
    """One Function for every backend: forward saves the float32 output and its norm, backward
    writes the whole gradient of hidden_states in one pass. The kernels are torch.library custom
    ops, so torch.compile traces a model's forward through the pooling without a graph break."""

    @staticmethod
    def forward(ctx, hidden_states, attention_mask, options: PoolingOptions, backend: str):
        mask = (attention_mask != 0).to(torch.int32).contiguous()
        out, unit, norm, index, count = _pool_forward_op(hidden_states, mask, options.mode, options.normalize, backend)
        ctx.save_for_backward(unit, norm, index, count, mask)
        ctx.options, ctx.backend, ctx.shape, ctx.dtype = (
            options,
            backend,
            list(hidden_states.shape),
            hidden_states.dtype,
        )
        return out

    @staticmethod
    @once_differentiable("last_token_pool / mean_pool")
    def backward(ctx, grad_output):
        unit, norm, index, count, mask = ctx.saved_tensors
        grad = _pool_backward_op(grad_output, unit, norm, index, count, mask, ctx.options.mode, ctx.options.normalize,
                                 ctx.backend, ctx.shape, ctx.dtype)  # fmt: skip
        return grad, None, None, None


def _pool(hidden_states, attention_mask, options: PoolingOptions) -> torch.Tensor:
    _check_inputs(hidden_states, attention_mask)
    backend = resolve_backend(options.backend, hidden_states.device)
    if backend == "reference":
        return pool_reference(hidden_states, attention_mask, mode=options.mode, normalize=options.normalize)
    return PoolingFunction.apply(hidden_states, attention_mask, options, backend)


def last_token_pool(hidden_states, attention_mask, *, normalize: bool = True, backend: str = "auto") -> torch.Tensor:
    """[B, D] hidden state of each row's last real token (mask 1), L2-normalised if `normalize`.

    hidden_states: [B, T, D] float32/bf16/fp16 (float64 too), any strides (e.g. a slice of a model
    output). attention_mask: [B, T] bool or integer, nonzero = a real token; left, right or no
    padding, mixed freely. Every row needs at least one real token.
    """
    return _pool(hidden_states, attention_mask, PoolingOptions("last", normalize, backend))


def mean_pool(hidden_states, attention_mask, *, normalize: bool = True, backend: str = "auto") -> torch.Tensor:
    """[B, D] mask-weighted mean of hidden_states over T, L2-normalised if `normalize`."""
    return _pool(hidden_states, attention_mask, PoolingOptions("mean", normalize, backend))


class Pooler(torch.nn.Module):
    """nn.Module form: Pooler(mode="last" | "mean", normalize=True)(hidden_states, attention_mask)."""

    def __init__(self, mode: str = "last", normalize: bool = True, backend: str = "auto"):
        super().__init__()
        self.options = PoolingOptions(mode, normalize, backend)

    def forward(self, hidden_states, attention_mask):
        return _pool(hidden_states, attention_mask, self.options)

    def extra_repr(self) -> str:
        return f"mode={self.options.mode!r}, normalize={self.options.normalize}, backend={self.options.backend!r}"
