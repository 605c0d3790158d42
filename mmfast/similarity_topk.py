"""mmfast.similarity_topk: each query's k best gallery items by dot product, and the rank of its
target, without the Q × G score matrix. For retrieval evaluation: no gradient.

The gallery may be larger than memory: a memory-mapped embedding file, as a torch tensor
(torch.from_file(...).view(G, D)) or a numpy array (numpy.load(path, mmap_mode="r"), numpy.memmap),
is read chunk by chunk and never copied whole (the cpu and torch backends).

Layers: similarity_topk() -> mmfast/backends/similarity_topk.py (target scores, the chunk loop of the
torch and cpu backends, the choice of kernels) -> csrc/similarity_topk.cpp, kernels/similarity_topk.py
or torch ops.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from mmfast.backends import resolve_backend
from mmfast.backends.similarity_topk import check_finite_rows, screens, search, similarity_topk_kernels
from mmfast.kernel_contract import compute_dtype
from mmfast.reference.similarity_topk import similarity_topk_reference
from mmfast.validation import check_backend_name, check_float_dtype

# The non-finite check reads the inputs in blocks this size: its temporaries take ~7 bytes per element.
FINITE_CHECK_ELEMENTS = 1 << 20
NUMPY_DTYPES = (np.float32, np.float64, np.float16)
SCREENS = ("auto", "bf16", "off")


class SimilarityTopK(NamedTuple):
    values: torch.Tensor  # [Q, k] float32 (float64 for float64 inputs), best first
    indices: torch.Tensor  # [Q, k] int64 gallery indices
    target_rank: torch.Tensor | None  # [Q] int64, 1 = the best target beats every other item; None without target


@dataclass(frozen=True)
class SimilarityTopkOptions:
    k: int
    backend: str = "auto"
    progress: bool = False  # a tqdm bar over the gallery items searched
    screen: str = "auto"  # "auto", "bf16" or "off": the cpu backend's bf16-screened float32 search

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, numbers.Integral):
            raise TypeError(f"k must be an int, got {type(self.k).__name__}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        check_backend_name(self.backend)
        if not isinstance(self.progress, bool):
            raise TypeError(f"progress must be True or False, got {type(self.progress).__name__}")
        if self.screen not in SCREENS:
            raise ValueError(f"screen must be one of {', '.join(map(repr, SCREENS))}, got {self.screen!r}")


def _gallery_tensor(gallery):
    """A numpy gallery (a memmap: numpy.load(path, mmap_mode="r")) as a tensor over the same memory,
    never a copy; anything else is returned as it is."""
    if not isinstance(gallery, np.ndarray):
        return gallery
    if gallery.ndim != 2:
        raise ValueError(f"gallery must be 2-D [G, D], got a numpy array of shape {gallery.shape}")
    if gallery.dtype.type not in NUMPY_DTYPES:
        raise TypeError(f"gallery must be float32, float16 or float64, got a numpy array of {gallery.dtype}")
    if not gallery.dtype.isnative:
        raise TypeError(f"gallery has byte order {gallery.dtype.byteorder!r}, not this machine's: convert the file")
    if any(stride < 0 or stride % gallery.itemsize for stride in gallery.strides):
        raise ValueError(f"gallery's strides {gallery.strides} are negative or not whole items: pass a view of rows")
    with warnings.catch_warnings():
        # A read-only memmap: torch warns that the tensor would be writable; nothing here writes to it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(gallery)


def _progress_bar(enabled: bool, total: int):
    """advance(n) and close() of a tqdm bar over `total` gallery items, or no-ops."""
    if not enabled:
        return (lambda n: None), (lambda: None)
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError("progress=True needs tqdm: pip install tqdm") from error
    bar = tqdm(total=total, unit="item", unit_scale=True, desc="similarity_topk")
    return bar.update, bar.close


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
    # NaN has no place in an order: every backend would rank it differently. The gallery is checked
    # as the search reads it (a memory-mapped one is then read once).
    rows = max(1, FINITE_CHECK_ELEMENTS // query.shape[1])
    for start in range(0, query.shape[0], rows):
        check_finite_rows("query", query[start : start + rows], start)


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


def _check_screen(backend: str, dtype: torch.dtype, target) -> None:
    """screen="bf16" applies to the cpu backend's float32 search without target ranks."""
    if backend != "cpu":
        raise ValueError(f"screen='bf16' is a cpu-backend search; this one runs on the {backend!r} backend")
    if compute_dtype(dtype) != torch.float32:
        raise ValueError(f"screen='bf16' screens float32 scores; {dtype} inputs score in {compute_dtype(dtype)}")
    if target is not None:
        raise ValueError("screen='bf16' does not count target ranks: use screen='auto' or 'off' with target")


def similarity_topk(
    query: torch.Tensor,
    gallery: torch.Tensor | np.ndarray,
    k: int,
    *,
    target: torch.Tensor | None = None,
    backend: str = "auto",
    progress: bool = False,
    screen: str = "auto",
) -> SimilarityTopK:
    """The k gallery items with the highest scores `query[q] · gallery[g]` for each query.

    Args:
        query: [Q, D] float32, bfloat16, float16 or float64 (any strides; nothing is normalised).
        gallery: [G, D], same dtype and device; or a numpy array (float32/float16/float64) such as a
            memory-mapped file, numpy.load(path, mmap_mode="r"), read chunk by chunk without a copy.
        k: how many per query, >= 1; a k above G is clamped to G.
        target: optional [Q] gallery indices, or [Q, P] index sets padded with -1 (several correct
            items per query, e.g. an image's five captions); every row needs a valid entry.
        backend: "auto", "triton", "cpu", "torch" or "reference" (as the losses').
        progress: show a tqdm progress bar over the gallery items searched.
        screen: "auto", "bf16" or "off". "bf16" (the cpu backend, float32 scores, no target): the GEMMs
            run on bf16 copies, about twice the float32 rate where the CPU multiplies bf16 in hardware, and
            only items whose bf16 score could enter a row's top-k (within a proven bound on its error) are
            scored in float32; every returned value is the float32 score of its item, computed in one fixed
            order. "auto" takes it on the cpu backend for float32 scores without target, D >= 64, on CPUs
            with bf16 dot products (AVX512-BF16, AMX); "off" never.

    Returns SimilarityTopK(values, indices, target_rank): values [Q, k] best first (float32, float64
    for float64 inputs), ties broken towards the lower gallery index on every backend; indices [Q, k]
    int64; target_rank [Q] int64 (None without target), 1 + the number of gallery items scoring
    strictly higher than the query's best-scoring target. Scores accumulate in float32 (float64).

    Evaluation only: no gradient. Inputs may require grad; the outputs never do. The [Q, G] matrix is
    never held: the torch and cpu backends walk it in tiles of the score budget
    (MMFAST_SCORE_CHUNK_BYTES), the Triton kernel keeps its tiles in registers.
    """
    options = SimilarityTopkOptions(k, backend, progress, screen)
    gallery = _gallery_tensor(gallery)
    _check_embeddings(query, gallery)
    resolved = resolve_backend(options.backend, query.device)
    n_queries, n_gallery = query.shape[0], gallery.shape[0]
    targets = None if target is None else _target_sets(target, n_queries, n_gallery, query.device)
    k = min(options.k, n_gallery)
    query, gallery = query.detach(), gallery.detach()
    if resolved == "reference":
        rows = max(1, FINITE_CHECK_ELEMENTS // gallery.shape[1])
        for start in range(0, n_gallery, rows):
            check_finite_rows("gallery", gallery[start : start + rows], start)
        values, indices, rank = similarity_topk_reference(query, gallery, k, target)
        return SimilarityTopK(values.to(compute_dtype(query.dtype)), indices, rank)
    if options.screen == "bf16":
        _check_screen(resolved, query.dtype, target)
    screened = screens(options.screen, resolved, query.dtype, query.shape[1], targets)
    kernels = similarity_topk_kernels(options.backend, resolved, query.dtype, n_gallery, k, screened)
    advance, close = _progress_bar(options.progress, n_gallery)
    try:
        values, indices, count = search(kernels, query, gallery, k, targets, advance)
    finally:
        close()
    return SimilarityTopK(values, indices, None if count is None else count + 1)
