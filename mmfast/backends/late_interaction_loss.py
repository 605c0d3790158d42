"""The MaxSim scores of mmfast.late_interaction_loss and their gradient: the chunk loops of the torch
and cpu backends, and the choice of kernels (the Triton ones are kernels/late_interaction_loss.py).

Forward, per (query chunk, document chunk) tile, for each piece of candidates (documents, negatives)
(the torch backend; the cpu backend hands each document chunk to one C++ call that does the same
per thread in L2-sized blocks, csrc/late_interaction_loss.cpp, so no tile reaches memory):

    T = Q_tokens[rows·L_q, D] · D_tokens[docs·L, D]ᵀ      one GEMM into the scratch (the only buffer
                                                          of token scores; the score budget sizes it)
    maxsim(T)   for every (query token, document): the max over the document's real tokens and its
                arg-max (the first maximal token: ties go to the lower token index), summed over the
                query's real tokens into S[rows, docs]; the arg-max into argmax[rows, L_q, docs]

Backward, from G = dLoss/dS [B, N] and the stored int32 arg-max (no token score is recomputed):

    dQ[i, t]          += G[i, j] · D_j[argmax[i, t, j]]      for every real query token t
    dD_j[argmax[i,t,j]] += G[i, j] · Q[i, t]

which reads B·L_q·N document rows: 1/L of the forward GEMM's work. The torch backend gathers and
index_add_s, the cpu backend's C++ loops over query tokens then documents; the triton backend
(_sparse_grads) gathers for dQ and, for dD, sorts the pairs by winning token and sums each token's
segment (kernels/late_interaction_loss_grads.py): no atomics, deterministic.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from mmfast._extension import load_extension
from mmfast.backends.chunked import chunk_rows, scratch, work_copy
from mmfast.kernel_contract import compute_dtype


class GradientNeeds(NamedTuple):
    """Which inputs of the scores want a gradient."""

    query: bool
    document: bool
    negatives: bool


class Piece(NamedTuple):
    """A block of candidate documents: [n, L, D] tokens and their [n, L] bool mask."""

    tokens: torch.Tensor
    mask: torch.Tensor


def tile_shape(n_queries: int, n_documents: int, query_tokens: int, document_tokens: int, device) -> tuple[int, int]:
    """(queries, documents) per tile of float32 token scores within the score budget: a square of
    (query, document) pairs, widened when one side is short; at least one pair."""
    pairs = chunk_rows(1 << 62, query_tokens * document_tokens, 4, torch.float32, device)
    rows = min(n_queries, max(1, math.isqrt(pairs)))
    cols = min(n_documents, max(1, pairs // rows))
    return min(n_queries, max(rows, pairs // cols)), cols


def _document_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[n·L]: 0 at a real token, -inf at padding, added to the token scores before the max."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf")).view(-1)


class TorchLateInteractionKernels:
    """torch ops: a max over the tile viewed [rows·L_q, docs, L]; gathers and index_add_ backward."""

    native_low_precision = False

    def maxsim(self, tile, bias, query_mask, scores, argmax):
        """tile [r·L_q, c·L] (+= bias, in place); query_mask [r·L_q] float 0/1; writes scores [r, c]
        and argmax [r·L_q, c] int32 (0 at a padding query token)."""
        n_docs = scores.shape[1]
        tile.add_(bias)
        best, index = tile.view(tile.shape[0], n_docs, -1).max(dim=2)
        real = query_mask[:, None] != 0
        argmax.copy_(index.masked_fill_(~real, 0))
        per_token = best.masked_fill_(~real, 0).view(scores.shape[0], -1, n_docs)
        torch.sum(per_token, dim=1, out=scores)

    def grads(self, grad_scores, query, query_mask, documents, argmax, grad_query, grad_documents):
        """Accumulates one piece's gradients: grad_scores [B, n], query [B, L_q, D], query_mask
        [B, L_q] bool, documents [n, L, D], argmax [B, L_q, n] int32, grad_query [B, L_q, D] and
        grad_documents [n, L, D] (either None), all in the compute dtype."""
        (n_queries, query_tokens, dim), (n_docs, doc_tokens, _) = query.shape, documents.shape
        flat_documents = documents.view(-1, dim)
        # The gathered rows are the scratch here: [rows, L_q, docs, D] per chunk.
        rows = chunk_rows(n_queries, query_tokens * n_docs * dim, 8, query.dtype, query.device)
        first_token = (torch.arange(n_docs, device=query.device) * doc_tokens)[None, None, :]
        for start in range(0, n_queries, rows):
            span = slice(start, start + rows)
            token = argmax[span].long() + first_token  # [r, L_q, n] rows of flat_documents
            weight = grad_scores[span, None, :] * query_mask[span, :, None].to(grad_scores.dtype)
            if grad_query is not None:
                grad_query[span] += torch.einsum("rqn,rqnd->rqd", weight, flat_documents[token])
            if grad_documents is not None:
                contribution = weight[..., None] * query[span, :, None, :]
                grad_documents.view(-1, dim).index_add_(0, token.reshape(-1), contribution.reshape(-1, dim))


class CpuLateInteractionKernels(TorchLateInteractionKernels):
    """csrc/late_interaction_loss.cpp: GEMM and max fused per thread in cache-sized blocks (one call per
    document chunk, scores_chunk), and the sparse backward, OpenMP."""

    def __init__(self, extension):
        self.ext = extension

    def scores_chunk(self, query_rows, real_query, doc_rows, bias_rows, doc_tokens, scores, argmax):
        """MaxSim of every query (query_rows [B·L_q, D], real_query [B·L_q] float 0/1) against one chunk
        of documents (doc_rows [c·L, D], bias_rows [c·L]): writes scores [B, c] and argmax [B·L_q, c]."""
        self.ext.late_interaction_scores(query_rows, real_query, doc_rows, bias_rows, doc_tokens, scores, argmax)

    def maxsim(self, tile, bias, query_mask, scores, argmax):
        self.ext.late_interaction_maxsim(tile, bias, query_mask, scores, argmax)

    def grads(self, grad_scores, query, query_mask, documents, argmax, grad_query, grad_documents):
        dim = query.shape[2]
        self.ext.late_interaction_grads(
            grad_scores, query.view(-1, dim), query_mask.view(-1).to(query.dtype), documents.view(-1, dim),
            argmax.view(-1, argmax.shape[2]), documents.shape[1],
            None if grad_query is None else grad_query.view(-1, dim),
            None if grad_documents is None else grad_documents.view(-1, dim),
        )  # fmt: skip


@functools.cache
def late_interaction_kernels(backend: str):
    if backend == "cpu":
        return CpuLateInteractionKernels(load_extension())
    if backend == "triton":
        from mmfast.kernels.late_interaction_loss import TritonLateInteractionKernels  # needs triton

        return TritonLateInteractionKernels(fallback=TorchLateInteractionKernels())
    return TorchLateInteractionKernels()


def late_interaction_scores(backend: str, query, query_mask, pieces: list[Piece]):
    """(scores [B, N] in the compute dtype, argmax [B, L_q, N] int32) of query [B, L_q, D] with its
    bool mask against the pieces' documents, in order."""
    kernels = late_interaction_kernels(backend)
    if hasattr(kernels, "scores"):  # a fused kernel (Triton) does the tile loop itself, in its dtypes
        if query.dtype in kernels.dtypes:
            return kernels.scores(query, query_mask, pieces)
        kernels = kernels.fallback
    compute = compute_dtype(query.dtype)
    (n_queries, query_tokens, dim), device = query.shape, query.device
    n_total = sum(p.tokens.shape[0] for p in pieces)
    scores = torch.empty(n_queries, n_total, dtype=compute, device=device)
    argmax = torch.empty(n_queries, query_tokens, n_total, dtype=torch.int32, device=device)
    query_rows = work_copy(query, compute, kernels.native_low_precision).view(-1, dim)
    real_query = query_mask.to(compute).view(-1)
    flat_argmax = argmax.view(-1, n_total)
    col = 0
    fused = hasattr(kernels, "scores_chunk")
    for piece in pieces:
        n_docs, doc_tokens, _ = piece.tokens.shape
        if fused:  # no tile of token scores: chunks of documents in the compute dtype, within the budget
            rows, cols = n_queries, chunk_rows(n_docs, doc_tokens * dim, 4, compute, device)
        else:
            rows, cols = tile_shape(n_queries, n_docs, query_tokens, doc_tokens, device)
            buffer = scratch("scores", rows * query_tokens, cols * doc_tokens, compute, device)
        bias = _document_bias(piece.mask, compute)
        for first_doc in range(0, n_docs, cols):
            docs = slice(first_doc, min(first_doc + cols, n_docs))
            doc_tokens_rows = work_copy(piece.tokens[docs], compute, kernels.native_low_precision).view(-1, dim)
            bias_rows = bias[docs.start * doc_tokens : docs.stop * doc_tokens]
            out_cols = slice(col + docs.start, col + docs.stop)
            if fused:
                kernels.scores_chunk(query_rows, real_query, doc_tokens_rows, bias_rows, doc_tokens,
                                     scores[:, out_cols], flat_argmax[:, out_cols])  # fmt: skip
                continue
            for first in range(0, n_queries, rows):
                span = slice(first * query_tokens, min(first + rows, n_queries) * query_tokens)
                tile = buffer[: span.stop - span.start, : doc_tokens_rows.shape[0]]
                torch.mm(query_rows[span], doc_tokens_rows.T, out=tile)
                kernels.maxsim(tile, bias_rows, real_query[span], scores[first : first + rows, out_cols],
                               flat_argmax[span, out_cols])  # fmt: skip
        col += n_docs
    return scores, argmax


def late_interaction_grads(backend: str, grad_scores, query, query_mask, pieces: list[Piece], argmax,
                           needs: GradientNeeds):  # fmt: skip
    """(grad query, grad of each piece's tokens): None where not needed, in the inputs' dtypes."""
    kernels = late_interaction_kernels(backend)
    if hasattr(kernels, "grad_documents"):  # the Triton kernels, in their dtypes
        if query.dtype in kernels.dtypes:
            return _sparse_grads(kernels, grad_scores, query, query_mask, pieces, argmax, needs)
        kernels = kernels.fallback
    compute = compute_dtype(query.dtype)
    query_work = query.to(compute).contiguous()
    grad_scores = grad_scores.to(compute).contiguous()
    grad_query = torch.zeros_like(query_work) if needs.query else None
    piece_grads, col = [], 0
    for piece, need in zip(pieces, (needs.document, needs.negatives), strict=False):
        n_docs = piece.tokens.shape[0]
        documents = piece.tokens.to(compute).contiguous()
        grad_documents = torch.zeros_like(documents) if need else None
        cols = slice(col, col + n_docs)
        kernels.grads(grad_scores[:, cols].contiguous(), query_work, query_mask, documents,
                      argmax[:, :, cols].contiguous(), grad_query, grad_documents)  # fmt: skip
        piece_grads.append(None if grad_documents is None else grad_documents.to(piece.tokens.dtype))
        col += n_docs
    return (None if grad_query is None else grad_query.to(query.dtype)), piece_grads


# Bytes per (query token, document) pair of the dD sort: its int32 key, the sorted keys and the int64
# order (torch.sort's), and slack for its own scratch.
SORT_BYTES_PER_PAIR = 24


def _sparse_grads(kernels, grad_scores, query, query_mask, pieces: list[Piece], argmax, needs: GradientNeeds):
    """The Triton backward (kernels/late_interaction_loss_grads.py): dQ by a gather over each piece's
    candidates, accumulated in float32; dD per chunk of documents (its sort within the score budget)
    by a segmented sum over the pairs sorted by winning token. Deterministic, no atomics."""
    (n_queries, query_tokens, dim), device = query.shape, query.device
    query_rows = query.reshape(-1, dim).contiguous()
    real = query_mask.reshape(-1).to(torch.float32)
    flat_argmax = argmax.reshape(n_queries * query_tokens, -1).contiguous()
    grad_scores = grad_scores.to(torch.float32).contiguous()
    grad_query = torch.empty(query_rows.shape, dtype=torch.float32, device=device) if needs.query else None
    piece_grads, col = [], 0
    for piece, need in zip(pieces, (needs.document, needs.negatives), strict=False):
        n_docs, documents = piece.tokens.shape[0], piece.tokens.contiguous()
        if grad_query is not None:
            kernels.grad_query(grad_scores, flat_argmax, real, documents, col, grad_query, accumulate=col > 0)
        grad_documents = torch.empty_like(documents) if need else None
        if need:
            _grad_documents(kernels, grad_scores, query_rows, query_mask, flat_argmax, col, grad_documents)
        piece_grads.append(grad_documents)
        col += n_docs
    return (None if grad_query is None else grad_query.view(query.shape).to(query.dtype)), piece_grads


def _grad_documents(kernels, grad_scores, query_rows, query_mask, flat_argmax, col: int, out) -> None:
    """out [n, L, D] = the gradient of the piece whose columns start at col, a chunk of documents at a
    time: its (query token, document) pairs sorted (stably: deterministic) by the key doc·L + winning
    token, a padding query token's pairs keyed past the end, each token's segment by searchsorted."""
    n_docs, doc_tokens, _ = out.shape
    n_rows = flat_argmax.shape[0]
    cols = chunk_rows(n_docs, n_rows, SORT_BYTES_PER_PAIR, torch.float32, out.device)
    padding = ~query_mask.reshape(-1, 1)
    for first in range(0, n_docs, cols):
        chunk = min(cols, n_docs - first)
        first_token = torch.arange(chunk, dtype=torch.int32, device=out.device) * doc_tokens
        keys = flat_argmax[:, col + first : col + first + chunk] + first_token
        keys.masked_fill_(padding, chunk * doc_tokens)  # past every token's segment
        sorted_keys, order = torch.sort(keys.view(-1), stable=True)
        tokens = torch.arange(chunk * doc_tokens + 1, dtype=torch.int32, device=out.device)
        offsets = torch.searchsorted(sorted_keys, tokens)
        kernels.grad_documents(grad_scores, query_rows, order, offsets, chunk, col + first,
                               out[first : first + chunk].view(-1, out.shape[2]))  # fmt: skip
