"""Cross-device negatives: all-gather with gradient ("local loss, gather with grad", as LLaVE and
open_clip do), for ranks whose batch sizes may differ.

Every rank gathers the candidates of all ranks, computes the loss of its local rows against them,
and reduces over its local rows. In backward, each rank's gradient for the gathered tensor is summed
over ranks (all_reduce) and the rank keeps its own slice, so after every rank has called backward
each rank's tensors hold the gradient of the sum of all ranks' losses. DDP then averages parameter
gradients over ranks, which turns that sum of per-rank means into the global-batch mean (exactly so
when the per-rank batches are equal).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.distributed as dist

_warned: set[str] = set()


class Gathered(NamedTuple):
    """The candidates of a cross-device contrastive loss: every rank's tensors, concatenated in rank
    order. The op builds it (`gather_candidates`) and the reference takes it as it is."""

    targets: torch.Tensor  # [ΣB, D]
    negatives: torch.Tensor | None  # [ΣM, D], flattened; None without negatives
    queries: torch.Tensor | None  # [ΣB, D] for the symmetric half; None otherwise
    offset: int  # this rank's first row: query i's positive is targets[offset + i]


def process_group_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def warn_single_process(op: str) -> None:
    if op not in _warned:
        _warned.add(op)
        warnings.warn(
            f"mmfast.{op}(cross_device=True) without an initialised torch.distributed process group (or with one "
            "process): computing on this process's batch only.",
            stacklevel=3,
        )


def _sizes(x: torch.Tensor) -> list[int]:
    """Every rank's x.shape[0]."""
    size = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _gather_known(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All ranks' x concatenated along dim 0; all_gather needs equal shapes, so pad to the largest."""
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes):
        rank = dist.get_rank()
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return _gather_known(x, sizes)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # Σ over ranks of each rank's d(its loss)/d(gathered)
        return grad[ctx.start : ctx.stop], None


def gather(x: torch.Tensor, *, with_grad: bool) -> tuple[torch.Tensor, int]:
    """(x of every rank concatenated along dim 0, this rank's offset in it). Differentiable when
    `with_grad`: the gradient of the sum of all ranks' losses flows back to each rank's x."""
    sizes = _sizes(x)
    offset = sum(sizes[: dist.get_rank()])
    if with_grad:
        return _GatherWithGrad.apply(x, sizes), offset
    with torch.no_grad():
        return _gather_known(x.detach(), sizes), offset


def gather_candidates(
    query: torch.Tensor, target: torch.Tensor, negatives: torch.Tensor | None, *, symmetric: bool
) -> Gathered:
    """Every rank's targets and [M, D] negatives (and, for `symmetric`, queries), with gradient."""
    targets, offset = gather(target, with_grad=True)
    queries = gather(query, with_grad=True)[0] if symmetric else None
    gathered_negatives = None if negatives is None else gather(negatives, with_grad=True)[0]
    return Gathered(targets=targets, negatives=gathered_negatives, queries=queries, offset=offset)
