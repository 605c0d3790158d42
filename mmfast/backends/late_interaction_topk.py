"""The search of mmfast.late_interaction_topk: the target scores every backend shares, the tile loop,
and the choice of kernels (the Triton one is kernels/late_interaction_topk.py).

Tile loop, corpus chunks outside, query chunks inside:

    S = MaxSim(queries[rows], documents[cols])    one [rows, cols] tile of document scores: on torch
                                                  and cpu from one GEMM of token scores
                                                  [rows·L_q, cols·L_d] (the only buffer of its size:
                                                  the score budget sizes it) and a max per (query
                                                  token, document); on triton in registers
    merge(S)                                      mmfast.similarity_topk's merge, unchanged: each
                                                  query's running top-k (ties to the lower document
                                                  index) and its count of scores above its target's

so memory grows with neither Q × G × L_q nor Q × G. With normalize_scores, S is divided by each
query's number of real tokens before the merge, as the float64 oracle does.

The target score of a query is the best MaxSim of its target set, computed first by gathering those
documents. The count leaves the target set out, as similarity_topk's does.
"""

from __future__ import annotations

import math

import torch

from mmfast._extension import load_extension
from mmfast.backends import autocast_disabled
from mmfast.backends.chunked import chunk_rows, scratch, work_copy
from mmfast.backends.similarity_topk import CpuSimilarityTopk, TorchSimilarityTopk
from mmfast.kernel_contract import compute_dtype


def tile_shape(n_queries: int, n_documents: int, query_tokens: int, doc_tokens: int, dtype, device) -> tuple[int, int]:
    """(queries, documents) per tile within the score budget: a square of (query, document) pairs,
    widened when one side is short; at least one pair."""
    pairs = chunk_rows(1 << 62, query_tokens * doc_tokens, 4, dtype, device)
    rows = min(n_queries, max(1, math.isqrt(pairs)))
    cols = min(n_documents, max(1, pairs // rows))
    return min(n_queries, max(rows, pairs // cols)), cols


def document_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[n·L]: 0 at a real token, -inf at padding, added to the token scores before the max."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf")).view(-1)


def target_scores(query, query_mask, corpus, corpus_mask, targets, divisor, dtype) -> torch.Tensor:
    """[Q]: the best MaxSim score (divided by `divisor` when given) of each query's target set
    (targets [Q, P], -1 padding), in `dtype`."""
    (n_queries, query_tokens, dim), doc_tokens = query.shape, corpus.shape[1]
    slots = targets.shape[1]
    per_query = slots * doc_tokens * (dim + query_tokens)  # the gathered documents and their token scores
    rows = chunk_rows(n_queries, per_query, 4, dtype, query.device)
    best = torch.empty(n_queries, dtype=dtype, device=query.device)
    for start in range(0, n_queries, rows):
        span = slice(start, start + rows)
        chunk = targets[span].clamp_min(0)
        members = corpus[chunk].to(dtype)  # [r, P, L_d, D]
        tokens = torch.einsum("rqd,rpsd->rpqs", query[span].to(dtype), members)
        tokens.masked_fill_(~corpus_mask[chunk][:, :, None, :], float("-inf"))
        maxima = tokens.amax(dim=3).masked_fill_(~query_mask[span][:, None, :], 0)
        scores = maxima.sum(dim=2)  # [r, P]
        if divisor is not None:
            scores = scores / divisor[span, None]
        torch.amax(scores.masked_fill(targets[span] < 0, -math.inf), dim=1, out=best[span])
    return best


class TorchMaxsim:
    """torch.mm into the token-score scratch, then a max over the tile viewed [r·L_q, c, L_d]."""

    def tile_scores(self, queries, documents, bias, real_query, divisor, out):
        """queries [r·L_q, D] and documents [c·L_d, D] in the compute dtype, bias [c·L_d], real_query
        [r·L_q] (0/1), divisor [r] or None: writes the [r, c] MaxSim scores into `out`."""
        tile = scratch("scores", queries.shape[0], documents.shape[0], queries.dtype, queries.device)
        torch.mm(queries, documents.T, out=tile)
        self.maxsim(tile, bias, real_query, divisor, out)

    def maxsim(self, tile, bias, real_query, divisor, out):
        n_docs = out.shape[1]
        tile.add_(bias)
        best = tile.view(tile.shape[0], n_docs, -1).amax(dim=2)
        best.masked_fill_(real_query[:, None] == 0, 0)
        torch.sum(best.view(out.shape[0], -1, n_docs), dim=1, out=out)
        if divisor is not None:
            out.div_(divisor[:, None])


class CpuMaxsim(TorchMaxsim):
    """The max and the sum of csrc/late_interaction_topk.cpp over the MKL tile, OpenMP over pairs."""

    def __init__(self, extension):
        self.ext = extension

    def maxsim(self, tile, bias, real_query, divisor, out):
        self.ext.late_interaction_topk_maxsim(tile, bias, real_query, divisor, out)


class LateInteractionSearch:
    """A MaxSim kernel (`maxsim`: tile_scores) and a top-k merge (`merger`: similarity_topk's)."""

    def __init__(self, maxsim, merger, native_low_precision: bool = False):
        self.maxsim, self.merger, self.native_low_precision = maxsim, merger, native_low_precision

    def search(self, query, query_mask, corpus, corpus_mask, k, targets, target_score, divisor):
        """(values [Q, k], indices [Q, k] int64, count [Q] int64 or None) over the whole corpus."""
        score_dtype = compute_dtype(query.dtype)
        (n_queries, query_tokens, dim), (n_docs, doc_tokens, _) = query.shape, corpus.shape
        device = query.device
        rows, cols = tile_shape(n_queries, n_docs, query_tokens, doc_tokens, score_dtype, device)
        values = torch.empty(n_queries, k, dtype=score_dtype, device=device)
        indices = torch.empty(n_queries, k, dtype=torch.int64, device=device)
        count = None if targets is None else torch.zeros(n_queries, dtype=torch.int64, device=device)
        queries = work_copy(query, score_dtype, self.native_low_precision).view(-1, dim)
        real_query = query_mask.to(score_dtype).view(-1)
        bias = document_bias(corpus_mask, score_dtype)
        tile = torch.empty(rows * cols, dtype=score_dtype, device=device)
        for col in range(0, n_docs, cols):
            docs = slice(col, min(col + cols, n_docs))
            documents = work_copy(corpus[docs], score_dtype, self.native_low_precision).view(-1, dim)
            doc_bias = bias[docs.start * doc_tokens : docs.stop * doc_tokens]
            for row in range(0, n_queries, rows):
                rs = slice(row, min(row + rows, n_queries))
                scores = tile[: (rs.stop - rs.start) * (docs.stop - docs.start)].view(rs.stop - rs.start, -1)
                self.maxsim.tile_scores(queries[rs.start * query_tokens : rs.stop * query_tokens], documents, doc_bias,
                                        real_query[rs.start * query_tokens : rs.stop * query_tokens],
                                        None if divisor is None else divisor[rs], scores)  # fmt: skip
                self.merger.merge(scores, col, values[rs], indices[rs], *(None if targets is None else t[rs]
                                  for t in (targets, target_score, count)), last=docs.stop >= n_docs)  # fmt: skip
        return values, indices, count


def late_interaction_topk_kernels(requested: str, backend: str, dtype: torch.dtype) -> LateInteractionSearch:
    """The kernels for the resolved `backend`. Triton takes float32/bf16/fp16; float64 goes to torch
    under "auto", and is an error for an explicit backend="triton"."""
    if backend == "cpu":
        extension = load_extension()
        return LateInteractionSearch(CpuMaxsim(extension), CpuSimilarityTopk(extension))
    if backend == "triton":
        from mmfast.kernels.late_interaction_topk import TritonMaxsim  # needs triton: imported when used

        if dtype in TritonMaxsim.dtypes:
            return LateInteractionSearch(TritonMaxsim(), TorchSimilarityTopk(), native_low_precision=True)
        if requested == "triton":
            raise ValueError(f"backend='triton' is unavailable for this search: its kernel takes float32, bfloat16 "
                             f"and float16, got {dtype}; use backend='torch'")  # fmt: skip
    return LateInteractionSearch(TorchMaxsim(), TorchSimilarityTopk())


def search(kernels: LateInteractionSearch, query, query_mask, corpus, corpus_mask, k, targets, normalize: bool):
    """(values, indices, count or None): see LateInteractionSearch.search."""
    score_dtype = compute_dtype(query.dtype)
    with torch.no_grad(), autocast_disabled(query.device):
        divisor = query_mask.sum(dim=1).to(score_dtype) if normalize else None
        score = None
        if targets is not None:
            score = target_scores(query, query_mask, corpus, corpus_mask, targets, divisor, score_dtype)
        return kernels.search(query, query_mask, corpus, corpus_mask, k, targets, score, divisor)
