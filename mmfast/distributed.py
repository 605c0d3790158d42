"""Cross-device negatives: all-gather with gradient ("local loss, gather with grad", as LLaVE and
open_clip do), for ranks whose batch sizes may differ.

Every rank gathers the candidates of all ranks, computes the loss of its local rows against them,
and reduces over its local rows. In backward, every rank holds a gradient for the whole gathered
tensor, and each rank needs only its own rows of the sum of those gradients over ranks: a
reduce-scatter, so that each rank receives its own slice and never the whole tensor. After every rank
has called backward, each rank's tensors hold the gradient of the sum of all ranks' losses. DDP then
averages parameter gradients over ranks, which turns that sum of per-rank means into the global-batch
mean (exactly so when the per-rank batches are equal).

How the reduce-scatter is done depends on the backend, because its bytes do. Per rank, for a gathered
gradient of n bytes over p ranks, a ring all-reduce sends 2(p−1)/p·n and a ring reduce-scatter
(p−1)/p·n. On gloo (torch 2.13) the reduce-scatter (`reduce_scatter_single`) sends as many bytes as
the all-reduce (counted with the process's write counter: benchmarks/contrastive_loss_cross_device.py),
so there each rank sends every other rank that rank's rows with `all_to_all_single` and sums what it
receives: (ΣB − B_rank)·row bytes sent and (p−1)·B_rank·row received, the ring reduce-scatter's
(p−1)/p·n for equal batches, and no padding for uneven ones. Other backends (NCCL) get the
reduce-scatter, each rank's rows padded with zeros to the largest batch. Only gloo is tested here
(both ways, same values); the reduce-scatter has never run on NCCL or GPUs in this project.
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


def _sum_to_owner(grad: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """This rank's rows of Σ over ranks of each rank's `grad` (laid out as the gathered tensor: every
    rank's rows in rank order), receiving only those rows."""
    if dist.get_backend() == dist.Backend.GLOO:
        return _sum_to_owner_by_all_to_all(grad, sizes)
    return _sum_to_owner_by_reduce_scatter(grad, sizes)


def _sum_to_owner_by_all_to_all(grad: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Each rank's rows go to it (uneven splits, no padding), and it sums the p copies it receives."""
    rows = sizes[dist.get_rank()]
    received = grad.new_empty((len(sizes) * rows, *grad.shape[1:]))
    dist.all_to_all_single(received, grad.contiguous(), output_split_sizes=[rows] * len(sizes),
                           input_split_sizes=sizes)  # fmt: skip
    return received.view(len(sizes), rows, *grad.shape[1:]).sum(0)


def _sum_to_owner_by_reduce_scatter(grad: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """reduce_scatter_tensor needs equal slices: each rank's rows are padded with zeros to the largest."""
    largest, world = max(sizes), len(sizes)
    if all(n == largest for n in sizes):
        padded = grad.contiguous()
    else:
        padded = grad.new_zeros((world * largest, *grad.shape[1:]))
        rows = torch.cat([torch.arange(n) + rank * largest for rank, n in enumerate(sizes)])
        padded.index_copy_(0, rows.to(grad.device), grad)
    mine = grad.new_empty((largest, *grad.shape[1:]))
    # torch 2.13 renames reduce_scatter_tensor (and warns on the old name); torch >= 2.4 has the old one
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    reduce_scatter(mine, padded)
    return mine[: sizes[dist.get_rank()]]


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes):
        ctx.sizes = sizes
        return _gather_known(x, sizes)

    @staticmethod
    def backward(ctx, grad):
        # Σ over ranks of each rank's d(its loss)/d(this rank's rows)
        return _sum_to_owner(grad, ctx.sizes), None


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
