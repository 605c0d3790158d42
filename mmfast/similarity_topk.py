"""mmfast.similarity_topk: each query's k best gallery items by dot product, and the rank of its
target, without the Q × G score matrix. For retrieval evaluation: no gradient.

Layers: similarity_topk() -> mmfast/backends/similarity_topk.py (target scores, the chunk loop of the
torch and cpu backends, the choice of kernels) -> csrc/similarity_topk.cpp, kernels/similarity_topk.py
or torch ops.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch

from mmfast.backends import resolve_backend
from mmfast.backends.similarity_topk import search, similarity_topk_kernels
from mmfast.kernel_contract import compute_dtype
from mmfast.reference.similarity_topk import similarity_topk_reference
from mmfast.validation import check_backend_name, check_float_dtype

# The non-finite check reads the inputs in blocks this size: its temporaries take ~7 bytes per element.
FINITE_CHECK_ELEMENTS = 1 << 20


class SimilarityTopK(NamedTuple):
    values: torch.Tensor  # [Q, k] float32 (float64 for float64 inputs), best first
    indices: torch.Tensor  # [Q, k] int64 gallery indices
    target_rank: torch.Tensor | None  # [Q] int64, 1 = the best target beats every other item; None without target


@dataclass(frozen=True)
class SimilarityTopkOptions:
    k: int
    backend: str = "auto"

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, numbers.Integral):
            raise TypeError(f"k must be an int, got {type(self.k).__name__}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        check_backend_name(self.backend)


def _check_embeddings(query, gallery) -> None:
    for name, t in (("query", query), ("gallery", gallery)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [{name[0].upper()}, D], got shape {tuple(t.shape)}")
        check_float_dtype(name, t)
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} needs at least one row and D >= 1, got shape {tuple(t.shape)}")
    if gallery.device != query.device:
        raise ValueError(f"gallery is on {gallery.device} but query is on {query.device}")
    if gallery.dtype != query.dtype:
        raise TypeError(f"gallery has dtype {gallery.dtype} but query has {query.dtype}")
    if gallery.shape[1] != query.shape[1]:
        raise ValueError(f"gallery has D = {gallery.shape[1]} but query has D = {query.shape[1]}")
    if query.device.type == "meta":
        return  # resolve_backend refuses meta tensors with a clear message
    for name, t in (("query", query), ("gallery", gallery)):
        # NaN has no place in an order: every backend would rank it differently.
        rows = max(1, FINITE_CHECK_ELEMENTS // t.shape[1])
        for start in range(0, t.shape[0], rows):
            bad = ~torch.isfinite(t[start : start + rows]).all(dim=1)
            if bool(bad.any()):
                raise ValueError(f"{name} row {start + int(bad.nonzero()[0, 0])} has a NaN or infinite value")


def _target_sets(target, n_queries: int, n_gallery: int, device) -> torch.Tensor:
    """[Q, P] int64 gallery indices, -1 for padding, each index at most once per row."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of gallery indices or None, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer gallery indices, got {target.dtype}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but query is on {device}")
    if target.dim() not in (1, 2) or target.shape[0] != n_queries or (target.dim() == 2 and target.shape[1] == 0):
        raise ValueError(f"target must be [Q] or [Q, P] with Q = {n_queries} and P >= 1, got {tuple(target.shape)}")
    sets = target.to(torch.int64).reshape(n_queries, -1)
    lowest = 0 if target.dim() == 1 else -1
    bad = (sets < lowest) | (sets >= n_gallery)
    if bool(bad.any()):
        where = tuple(bad.nonzero()[0].tolist())[: target.dim()]
        padding = "" if target.dim() == 1 else " or -1 (padding)"
        raise ValueError(f"target[{', '.join(map(str, where))}] = {int(target[where])} is not a gallery index "
                         f"in [0, {n_gallery}){padding}")  # fmt: skip
    empty = (sets < 0).all(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero()[:8, 0].tolist()
        raise ValueError(f"target rows {rows} have no valid entry (all -1): such a query has no rank")
    sets = sets.sort(dim=1).values
    repeated = torch.zeros_like(sets, dtype=torch.bool)
    repeated[:, 1:] = sets[:, 1:] == sets[:, :-1]
    return sets.masked_fill(repeated, -1).contiguous()


def similarity_topk(
    query: torch.Tensor, gallery: torch.Tensor, k: int, *, target: torch.Tensor | None = None, backend: str = "auto"
) -> SimilarityTopK:
    """The k gallery items with the highest scores `query[q] · gallery[g]` for each query.

    Args:
        query: [Q, D] float32, bfloat16, float16 or float64 (any strides; nothing is normalised).
        gallery: [G, D], same dtype and device.
        k: how many per query, >= 1; a k above G is clamped to G.
        target: optional [Q] gallery indices, or [Q, P] index sets padded with -1 (several correct
            items per query, e.g. an image's five captions); every row needs a valid entry.
        backend: "auto", "triton", "cpu", "torch" or "reference" (as the losses').

    Returns SimilarityTopK(values, indices, target_rank): values [Q, k] best first (float32, float64
    for float64 inputs), ties broken towards the lower gallery index on every backend; indices [Q, k]
    int64; target_rank [Q] int64 (None without target), 1 + the number of gallery items scoring
    strictly higher than the query's best-scoring target. Scores accumulate in float32 (float64).

    Evaluation only: no gradient. Inputs may require grad; the outputs never do. The [Q, G] matrix is
    never held: the torch and cpu backends walk it in tiles of the score budget
    (MMFAST_SCORE_CHUNK_BYTES), the Triton kernel keeps its tiles in registers.
    """
    options = SimilarityTopkOptions(k, backend)
    _check_embeddings(query, gallery)
    resolved = resolve_backend(options.backend, query.device)
    n_queries, n_gallery = query.shape[0], gallery.shape[0]
    targets = None if target is None else _target_sets(target, n_queries, n_gallery, query.device)
    k = min(options.k, n_gallery)
    query, gallery = query.detach(), gallery.detach()
    if resolved == "reference":
        values, indices, rank = similarity_topk_reference(query, gallery, k, target)
        return SimilarityTopK(values.to(compute_dtype(query.dtype)), indices, rank)
    kernels = similarity_topk_kernels(options.backend, resolved, query.dtype, n_gallery, k)
    values, indices, count = search(kernels, query, gallery, k, targets)
    return SimilarityTopK(values, indices, None if count is None else count + 1)
