"""The search of mmfast.similarity_topk: the target scores every backend shares, the chunked loop of
the torch and cpu backends, and the choice of kernels (the Triton ones are kernels/similarity_topk.py).

Chunk loop (torch, cpu), gallery chunks outside, query chunks inside:

    S = query[rows] · gallery[cols]ᵀ     one [rows, cols] tile, float32 (float64 for float64 inputs)
    merge(S)                              into each query's running top-k (the [Q, k] outputs) and
                                          its count of scores strictly above its target score

The tile is the only scratch of its size: rows × cols comes from the score budget
(MMFAST_SCORE_CHUNK_BYTES; 32 MiB on CPU), so memory does not grow with Q × G. Each gallery chunk is
read, and converted to float32 when it is bf16/fp16, once. The cpu backend hands each gallery chunk
to one C++ call that does the GEMMs and the merge in cache-sized blocks (csrc/similarity_topk.cpp).

The gallery is only ever read a chunk at a time, in order, so it may be larger than memory: a
memory-mapped file (torch.from_file, or a numpy memmap wrapped by mmfast.similarity_topk) is paged in
chunk by chunk. For the same reason its NaN/inf check runs on each chunk as it is read (the Triton
kernel reads the whole gallery at once: it is checked before).

The target score of a query is the best score of its target set, computed first as row-wise dot
products (float32 accumulation). The count leaves the target set out: its members' scores in the
tiles come from another summation order, and none of them is above the best one.
"""

from __future__ import annotations

import math

import torch

from mmfast._extension import load_extension
from mmfast.backends import autocast_disabled
from mmfast.backends.chunked import chunk_rows
from mmfast.kernel_contract import compute_dtype as score_dtype_for  # float64 stays float64, else float32

# The up-front NaN/inf check (of a gallery a kernel reads whole) takes this many rows at a time.
FINITE_CHECK_ROWS = 4096
# The bf16 screen under "auto" from this D (below it the GEMMs are too thin for bf16 to pay), and for
# chunks whose largest possible score ||q|| ||g|| stays below this (far from float32's 2^128).
SCREEN_MIN_DIM = 64
SCREEN_SCORE_LIMIT = 2.0**100


def tile_shape(n_queries: int, n_gallery: int, bytes_per_score: int, score_dtype, device) -> tuple[int, int]:
    """(rows, cols) of the score tile: a square of the budget, widened when one side is short."""
    capacity = chunk_rows(1 << 62, 1, bytes_per_score, score_dtype, device)  # scores per budget
    rows = min(n_queries, max(1, math.isqrt(capacity)))
    cols = min(n_gallery, max(1, capacity // rows))
    return min(n_queries, max(rows, capacity // cols)), cols


def target_scores(query, gallery, targets, score_dtype) -> torch.Tensor:
    """[Q]: max over p with targets[q, p] >= 0 of query[q] · gallery[targets[q, p]], in score_dtype."""
    n_queries, slots = targets.shape
    rows = chunk_rows(n_queries, slots * query.shape[1], 4, score_dtype, query.device)
    best = torch.empty(n_queries, dtype=score_dtype, device=query.device)
    for start in range(0, n_queries, rows):
        chunk = targets[start : start + rows]
        members = gallery[chunk.clamp_min(0)].to(score_dtype)  # [rows, P, D]
        q = query[start : start + rows].to(score_dtype)
        scores = torch.bmm(members, q[:, :, None])[:, :, 0]
        torch.amax(scores.masked_fill(chunk < 0, -math.inf), dim=1, out=best[start : start + rows])
    return best


def check_finite_rows(name: str, rows: torch.Tensor, first_row: int = 0) -> None:
    """ValueError naming the first row of `rows` (numbered from `first_row`) with a NaN or an inf.
    NaN has no place in an order: every backend would rank it differently."""
    bad = ~torch.isfinite(rows).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"{name} row {first_row + int(bad.nonzero()[0, 0])} has a NaN or infinite value")


def gallery_chunk(gallery, col: int, cols: int, score_dtype) -> torch.Tensor:
    """Rows col:col+cols of the gallery in the score dtype, with contiguous rows, checked for NaN/inf."""
    items = gallery[col : col + cols].to(score_dtype)
    items = items if items.stride(1) == 1 else items.contiguous()
    check_finite_rows("gallery", items, col)
    return items


class TorchSimilarityTopk:
    """Tiles from torch.mm; merged with torch.topk, ties settled exactly by stable sorts."""

    bytes_per_score = 8  # the tile + the comparison masks of the merge and the count
    checks_gallery = True  # reads the gallery chunk by chunk, checking each (gallery_chunk)

    def outputs(self, n_queries, k, score_dtype, targets, device):
        values = torch.empty(n_queries, k, dtype=score_dtype, device=device)
        indices = torch.empty(n_queries, k, dtype=torch.int64, device=device)
        count = None if targets is None else torch.zeros(n_queries, dtype=torch.int64, device=device)
        return values, indices, count

    def search(self, query, gallery, k, targets, target_score, advance):
        """(values [Q, k], indices [Q, k] int64, count [Q] int64 or None) of the whole gallery;
        advance(n) after each chunk of n gallery items."""
        score_dtype = score_dtype_for(query.dtype)
        (n_queries, _), n_gallery = query.shape, gallery.shape[0]
        rows, cols = tile_shape(n_queries, n_gallery, self.bytes_per_score, score_dtype, query.device)
        values, indices, count = self.outputs(n_queries, k, score_dtype, targets, query.device)
        queries = query.to(score_dtype).contiguous()
        scratch = torch.empty(rows * cols, dtype=score_dtype, device=query.device)
        for col in range(0, n_gallery, cols):
            items = gallery_chunk(gallery, col, cols, score_dtype)
            for row in range(0, n_queries, rows):
                rs = slice(row, row + rows)
                tile = scratch[: queries[rs].shape[0] * items.shape[0]].view(queries[rs].shape[0], items.shape[0])
                torch.mm(queries[rs], items.T, out=tile)
                self.merge(tile, col, values[rs], indices[rs], *(None if targets is None else t[rs]
                           for t in (targets, target_score, count)), last=col + cols >= n_gallery)  # fmt: skip
            advance(items.shape[0])
        return values, indices, count

    def merge(self, tile, col_offset, values, indices, targets, target_score, count, last):
        """values/indices hold each row's best min(k, col_offset) so far, best first."""
        k = values.shape[1]
        filled, taken = min(k, col_offset), min(k, tile.shape[1])
        top, position = tile.topk(taken, dim=1)
        # topk picks arbitrarily among scores tied at the k-th: where more tie than it took, take
        # the lowest indices (a stable sort of those rows).
        kth = top[:, -1:]
        ambiguous = ((tile == kth).sum(dim=1) > (top == kth).sum(dim=1)).nonzero()[:, 0]
        if ambiguous.numel():
            top[ambiguous], position[ambiguous] = (t[:, :taken] for t in _sort_desc(tile[ambiguous]))
        # Best first with ties to the lower index: order by index, then a stable sort by score.
        position, by_index = position.sort(dim=1)
        top, order = _sort_desc(top.gather(1, by_index))
        position = position.gather(1, order)
        # The kept entries all have lower indices than the tile's: the stable sort keeps them first on ties.
        merged, order = _sort_desc(torch.cat([values[:, :filled], top], dim=1))
        both = torch.cat([indices[:, :filled], position + col_offset], dim=1)
        keep = min(k, filled + taken)
        values[:, :keep] = merged[:, :keep]
        indices[:, :keep] = both.gather(1, order[:, :keep])
        if targets is not None:
            threshold = target_score[:, None]
            local = targets - col_offset
            inside = (targets >= 0) & (local >= 0) & (local < tile.shape[1])
            own = (tile.gather(1, local.clamp(0, tile.shape[1] - 1)) > threshold) & inside
            count += (tile > threshold).sum(dim=1) - own.sum(dim=1)


def _sort_desc(t: torch.Tensor):
    return t.sort(dim=1, descending=True, stable=True)


class CpuSimilarityTopk(TorchSimilarityTopk):
    """csrc/similarity_topk.cpp, one call per gallery chunk: per block of up to 512 queries × 512 items,
    one GEMM (MKL, on the thread) into a cache-sized scratch and the merge into each row's heap at once.
    With `screen` (float32 scores, no target ranks), the GEMMs run on bf16 copies and only the items whose
    bf16 score could enter a row's top-k, within a proven error bound, are scored in float32: the results
    are exact float32 scores (see the screened kernel's note in the C++ source)."""

    # Gallery items per chunk, in multiples of the kernel's 512-item blocks: about 32 MiB of float32
    # rows. Every block of queries re-reads the chunk, but a 512-query block does 256 flops per byte
    # read, so it need not stay in the last-level cache; a larger chunk means fewer of the waits at the
    # end of a chunk, where the threads meet (costly with few query blocks: Q = 500 on 2 threads).
    chunk_bytes = 32 << 20
    block_items = 512

    def __init__(self, extension, screen: bool = False):
        self.ext = extension
        self.screen = screen

    def chunk_items(self, n_gallery: int, dim: int, score_dtype) -> int:
        per_item = dim * torch.finfo(score_dtype).bits // 8
        blocks = max(1, self.chunk_bytes // (per_item * self.block_items))
        return min(n_gallery, blocks * self.block_items)

    def search(self, query, gallery, k, targets, target_score, advance):
        score_dtype = score_dtype_for(query.dtype)
        if self.screen and targets is None and score_dtype == torch.float32:
            return self.search_screened(query, gallery, k, advance)
        (n_queries, dim), n_gallery = query.shape, gallery.shape[0]
        values, indices, count = self.outputs(n_queries, k, score_dtype, targets, query.device)
        queries = query.to(score_dtype).contiguous()
        cols = self.chunk_items(n_gallery, dim, score_dtype)
        for col in range(0, n_gallery, cols):
            items = gallery_chunk(gallery, col, cols, score_dtype)
            self.ext.similarity_topk_search(queries, items, col, values, indices, targets, target_score, count,
                                            col + cols >= n_gallery)  # fmt: skip
            advance(items.shape[0])
        return values, indices, count

    def screen_rows(self, rows):
        """(bf16 copy, [n, 3] float64 norms ||x||, ||x - bf16(x)||, ||bf16(x)||) of float32 rows."""
        copy = torch.empty(rows.shape, dtype=torch.bfloat16)
        norms = torch.empty(rows.shape[0], 3, dtype=torch.float64)
        self.ext.similarity_topk_screen_rows(rows, copy, norms)
        return copy, norms

    def search_screened(self, query, gallery, k, advance):
        (n_queries, dim), n_gallery = query.shape, gallery.shape[0]
        values, indices, _ = self.outputs(n_queries, k, torch.float32, None, query.device)
        queries = query.to(torch.float32).contiguous()
        query_copy, query_norms = self.screen_rows(queries)
        largest_query = float(query_norms[:, 0].max())
        cols = self.chunk_items(n_gallery, dim, torch.float32)
        for col in range(0, n_gallery, cols):
            items = gallery_chunk(gallery, col, cols, torch.float32)
            last = col + cols >= n_gallery
            item_copy, item_norms = self.screen_rows(items)
            if largest_query * float(item_norms[:, 0].max()) < SCREEN_SCORE_LIMIT:
                self.ext.similarity_topk_search_screened(queries, query_copy, query_norms, items, item_copy,
                                                         item_norms, col, values, indices, last)  # fmt: skip
            else:  # scores near float32's range: the bound's margins would not hold; this chunk in float32
                self.ext.similarity_topk_search(queries, items, col, values, indices, None, None, None, last)
            advance(items.shape[0])
        return values, indices, None


def bf16_dot_products() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where the screened search's bf16
    GEMMs run at about twice the float32 rate (elsewhere they are emulated, and slower)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers of torch.cpu; a torch without them: no screen under "auto"
        return False


def screens(screen: str, backend: str, dtype: torch.dtype, dim: int, targets) -> bool:
    """Whether the search runs the bf16 screen: always with screen="bf16" (similarity_topk checks that it
    applies); under "auto", on the cpu backend for float32 scores without target ranks, at D >= SCREEN_MIN_DIM,
    on CPUs with bf16 dot products. Target ranks keep the float32 kernel: a low-ranked target's count would
    need every item within the bound of its score rescored, a large share of the gallery."""
    if screen != "auto":
        return screen == "bf16"
    return (backend == "cpu" and targets is None and score_dtype_for(dtype) == torch.float32
            and dim >= SCREEN_MIN_DIM and bf16_dot_products())  # fmt: skip


def similarity_topk_kernels(requested: str, backend: str, dtype: torch.dtype, n_gallery: int, k: int,
                            screen: bool = False):  # fmt: skip
    """The kernels for the resolved `backend`. Triton declines what its kernel cannot do (float64, a
    large k): "auto" then takes the torch backend, an explicit backend="triton" is an error. `screen`:
    the cpu backend's bf16-screened search (`screens`)."""
    if backend == "cpu":
        return CpuSimilarityTopk(load_extension(), screen)
    if backend == "triton":
        from mmfast.kernels.similarity_topk import TritonSimilarityTopk  # needs triton: imported when used

        reason = TritonSimilarityTopk.unsupported_reason(dtype, n_gallery, k)
        if reason is None:
            return TritonSimilarityTopk()
        if requested == "triton":
            raise ValueError(f"backend='triton' is unavailable for this search: {reason}; use backend='torch'")
    return TorchSimilarityTopk()


def search(kernels, query, gallery, k, targets, advance):
    """(values, indices, count or None): see TorchSimilarityTopk.search."""
    if not getattr(kernels, "checks_gallery", False):
        for start in range(0, gallery.shape[0], FINITE_CHECK_ROWS):
            check_finite_rows("gallery", gallery[start : start + FINITE_CHECK_ROWS], start)
    with torch.no_grad(), autocast_disabled(query.device):
        score = None if targets is None else target_scores(query, gallery, targets, score_dtype_for(query.dtype))
        return kernels.search(query, gallery, k, targets, score, advance)
